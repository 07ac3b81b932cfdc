"""proxy.sources.local: files (versioned by stat) and environment variables (read once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from proxy.sources import SourceError
from proxy.sources.local import EnvSource, FileSource
from proxy.sources.location import Location


def test_file_is_read_then_unchanged_costs_nothing_until_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(b"one")
    src = FileSource(Location(path=path))
    first = src.fetch(None)
    assert first is not None and first.data == b"one"
    assert src.fetch(first.version) is None
    new = tmp_path / "ca.pem.new"
    new.write_bytes(b"two")
    os.replace(new, path)  # the rotation pattern: rename over the old file (new inode, same second)
    second = src.fetch(first.version)
    assert second is not None and second.data == b"two" and second.version != first.version


@pytest.mark.parametrize("how", ["missing", "directory"])
def test_unreadable_file_is_a_source_error_naming_it(tmp_path: Path, how: str) -> None:
    path = tmp_path / "x.pem"
    if how == "directory":
        path.mkdir()
    with pytest.raises(SourceError) as info:
        FileSource(Location(path=path)).fetch(None)
    assert str(path) in info.value.message
    assert ("file not found" if how == "missing" else "is a directory") in info.value.message


def test_env_is_read_once_from_the_environment_it_was_given() -> None:
    env = {"PEM": "-----BEGIN X-----"}
    src = EnvSource(Location(env="PEM"), env)
    got = src.fetch(None)
    assert got is not None and got.data == b"-----BEGIN X-----"
    env["PEM"] = "changed"
    assert src.fetch(got.version) is None  # a process's environment is fixed


@pytest.mark.parametrize("environ", [{}, {"PEM": ""}])
def test_unset_or_empty_env_is_a_source_error(environ: dict[str, str]) -> None:
    with pytest.raises(SourceError, match="environment variable PEM is not set or empty"):
        EnvSource(Location(env="PEM"), environ).fetch(None)
