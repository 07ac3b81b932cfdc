"""Local sources: files and environment variables.

Owns: ``FileSource`` (the version is the file's mtime, size and inode, so an unchanged file costs one stat and
a file replaced by rename is noticed even within the same second) and ``EnvSource`` (the value of a variable in
the environment handed to it; fixed for the life of the process, as ECS injects secrets once at task start).

Must not: read ``os.environ`` itself (the environment is passed in by the caller).
"""

from __future__ import annotations

from collections.abc import Mapping

from . import MAX_BYTES, Fetched, SourceError
from .location import Location


class FileSource:
    def __init__(self, location: Location) -> None:
        assert location.path is not None
        self.location = location
        self._path = location.path

    def fetch(self, known: str | None) -> Fetched | None:
        try:
            st = self._path.stat()
            version = f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}"
            if version == known:
                return None
            if st.st_size > MAX_BYTES:
                raise SourceError(f"{self._path}: larger than {MAX_BYTES} bytes")
            return Fetched(self._path.read_bytes(), version)
        except FileNotFoundError:
            raise SourceError(f"{self._path}: file not found") from None
        except IsADirectoryError:
            raise SourceError(f"{self._path}: is a directory") from None
        except OSError as exc:
            raise SourceError(f"{self._path}: cannot read: {exc.strerror}") from None


class EnvSource:
    def __init__(self, location: Location, environ: Mapping[str, str]) -> None:
        assert location.env is not None
        self.location = location
        self._value = environ.get(location.env)

    def fetch(self, known: str | None) -> Fetched | None:
        if known is not None:
            return None  # read once: a process's environment does not change
        if not self._value:
            raise SourceError(f"environment variable {self.location.env} is not set or empty")
        return Fetched(self._value.encode(), "env")

