"""proxy.sources.material: fail-closed first read, conditional polling, last good copy kept, health per source.

Sources are real: files in tmp_path, a distribution point on loopback, moto for the AWS kinds.  The validator is
a stand-in for "parses as PEM": content must start with ``good``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ConfigErrors
from proxy.sources.location import Location, parse_location
from proxy.sources.material import Material
from tests.remote import DistributionPoint, MotoServer
from tests.sources.conftest import unique


def must_be_good(data: bytes) -> None:
    if not data.startswith(b"good"):
        raise ValueError("not good")


def replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def material(locations: dict[str, Location], environ: dict[str, str] | None = None) -> Material:
    return Material(locations, dict.fromkeys(locations, must_be_good), environ=environ or {})


def test_first_read_fails_closed_naming_every_bad_key(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_bytes(b"junk")
    (tmp_path / "ok.pem").write_bytes(b"good")
    m = material({"server.cert": Location(path=tmp_path / "ok.pem"),
                  "server.key": Location(path=tmp_path / "missing.pem"),
                  "server.client_ca": Location(path=tmp_path / "bad.pem"),
                  "server.crl": Location(env="UNSET")})
    with pytest.raises(ConfigErrors) as info:
        m.load()
    assert [str(e) for e in info.value.errors] == [
        f"server.key: {tmp_path / 'missing.pem'}: file not found",
        f"server.client_ca: {tmp_path / 'bad.pem'}: not good",
        "server.crl: environment variable UNSET is not set or empty",
    ]


def test_unchanged_sources_poll_quietly_and_stay_fresh(tmp_path: Path, dp: DistributionPoint) -> None:
    (tmp_path / "cert.pem").write_bytes(b"good cert")
    dp.put("/crl", b"good crl")
    m = material({"server.cert": Location(path=tmp_path / "cert.pem"),
                  "server.crl": parse_location(dp.url("/crl")),
                  "server.key": Location(env="KEY")}, {"KEY": "good key"})
    m.load()
    loaded = m.health()
    assert set(loaded) == {"server.cert", "server.crl"}  # env: read once, never polled
    time.sleep(0.01)
    result = m.poll()
    assert (result.changed, dict(result.failing), dict(result.refused)) == ((), {}, {})
    assert dp.statuses("/crl") == [200, 304]
    after = m.health()
    assert all(after[k].last_ok > loaded[k].last_ok and after[k].errors == 0 for k in after)
    assert (m["server.cert"], m["server.crl"], m["server.key"]) == (b"good cert", b"good crl", b"good key")


def test_a_changed_source_is_reported_and_becomes_the_good_copy(tmp_path: Path) -> None:
    path = tmp_path / "ca.pem"
    path.write_bytes(b"good 1")
    m = material({"server.client_ca": Location(path=path)})
    m.load()
    replace(path, b"good 2")
    assert m.poll().changed == ("server.client_ca",)
    assert m["server.client_ca"] == b"good 2"
    assert m.poll().changed == ()


def test_refused_content_keeps_the_last_good_copy_and_is_not_fetched_again(dp: DistributionPoint) -> None:
    dp.put("/crl", b"good 1")
    m = material({"server.crl": parse_location(dp.url("/crl"))})
    m.load()
    dp.put("/crl", b"garbage")
    first = m.poll()
    problem = f"{dp.url('/crl')}: not good"
    assert dict(first.refused) == {"server.crl": problem}
    assert dict(first.became_failing) == {"server.crl": problem}
    assert first.changed == ()
    assert m["server.crl"] == b"good 1"  # the door never opens: the last good CRL stays
    second = m.poll()
    assert (dict(second.refused), dict(second.became_failing)) == ({}, {})  # logged and counted once as a change
    assert dict(second.failing) == {"server.crl": problem}  # ... but still failing
    assert dp.statuses("/crl") == [200, 200, 304]  # the refused version is asked for conditionally
    assert m.health()["server.crl"].errors == 2
    stale = m.health()["server.crl"].last_ok
    dp.put("/crl", b"good 2")
    third = m.poll()
    assert (third.changed, third.recovered, dict(third.failing)) == (("server.crl",), ("server.crl",), {})
    assert m["server.crl"] == b"good 2"
    assert m.health()["server.crl"].last_ok > stale


def test_an_unreadable_source_keeps_the_last_good_copy_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_bytes(b"good rules")
    m = material({"allow_from": Location(path=path)})
    m.load()
    saved = path.read_bytes()
    path.unlink()
    first = m.poll()
    assert dict(first.became_failing) == {"allow_from": f"{path}: file not found"}
    assert first.refused == {}  # nothing new was refused: the source could not be read
    assert m["allow_from"] == b"good rules"
    assert m.poll().became_failing == {}
    assert m.health()["allow_from"].errors == 2
    assert m.health()["allow_from"].problem == f"{path}: file not found"
    path.write_bytes(saved)
    back = m.poll()
    assert back.recovered == ("allow_from",) and back.changed == ()  # same bytes: nothing to reload
    assert m.health()["allow_from"].problem is None


def test_two_keys_naming_one_location_share_each_fetch(dp: DistributionPoint) -> None:
    dp.put("/bundle", b"good bundle")
    loc = parse_location(dp.url("/bundle"))
    m = material({"server.client_ca": loc, "upstream.ca_bundle": loc})
    m.load()
    m.poll()
    dp.put("/bundle", b"good bundle 2")
    assert m.poll().changed == ("server.client_ca", "upstream.ca_bundle")
    assert dp.statuses("/bundle") == [200, 304, 200]  # one request per round for both keys


def test_reconfigured_keeps_unchanged_sources_and_reads_new_ones(tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    a.write_bytes(b"good a")
    b.write_bytes(b"good b")
    m = material({"server.cert": Location(path=a), "server.crl": Location(path=b)})
    m.load()
    a.unlink()  # unreadable now: a reconfiguration must not try to read an unchanged source again
    with pytest.raises(ConfigErrors) as info:
        m.reconfigured({"server.cert": Location(path=a), "server.crl": Location(path=c)})
    assert [e.key for e in info.value.errors] == ["server.crl"]
    assert m["server.crl"] == b"good b"  # the old Material is untouched
    c.write_bytes(b"good c")
    fresh = m.reconfigured({"server.cert": Location(path=a), "server.crl": Location(path=c)})
    assert (fresh["server.cert"], fresh["server.crl"]) == (b"good a", b"good c")


def test_aws_sources_through_moto(aws_env: MotoServer, aws: Callable[[str], Any]) -> None:
    bucket, secret, param = unique("crl-bucket"), unique("server-key"), "/" + unique("rules")
    aws("s3").create_bucket(Bucket=bucket)
    aws("s3").put_object(Bucket=bucket, Key="crl.pem", Body=b"good crl")
    aws("secretsmanager").create_secret(Name=secret, SecretString="good key")
    aws("ssm").put_parameter(Name=param, Value="good rules", Type="SecureString")
    m = material({"server.crl": parse_location(f"s3://{bucket}/crl.pem"),
                  "server.key": parse_location(f"secretsmanager:{secret}"),
                  "allow_from": parse_location(f"ssm:{param}")})
    assert m.aws_clients is not None  # one set of clients for all three
    m.load()
    assert m.poll().changed == ()
    aws("s3").put_object(Bucket=bucket, Key="crl.pem", Body=b"good crl 2")
    aws("secretsmanager").put_secret_value(SecretId=secret, SecretString="junk")
    aws("ssm").put_parameter(Name=param, Value="good rules 2", Type="SecureString", Overwrite=True)
    result = m.poll()
    assert result.changed == ("server.crl", "allow_from")
    assert list(result.refused) == ["server.key"]
    assert (m["server.crl"], m["server.key"], m["allow_from"]) == (b"good crl 2", b"good key", b"good rules 2")
    aws("s3").delete_object(Bucket=bucket, Key="crl.pem")
    gone = m.poll()
    assert gone.became_failing["server.crl"].startswith(f"s3://{bucket}/crl.pem: NoSuchKey")
    assert m["server.crl"] == b"good crl 2"
