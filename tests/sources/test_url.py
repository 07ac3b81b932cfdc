"""proxy.sources.url against a real HTTP(S) server on loopback: conditional GETs, errors, TLS, redirects."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.sources import MAX_BYTES, SourceError
from proxy.sources.location import parse_location
from proxy.sources.url import UrlSource
from tests.remote import DistributionPoint


def source(url: str, **kw: object) -> UrlSource:
    return UrlSource(parse_location(url), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("etag", "last_modified", "sent"), [
    (True, True, "if-none-match"),
    (True, False, "if-none-match"),
    (False, True, "if-modified-since"),
])
def test_unchanged_is_one_conditional_request_answered_304(dp: DistributionPoint, etag: bool, last_modified: bool,
                                                           sent: str) -> None:
    dp.put("/crl", b"crl-1", etag=etag, last_modified=last_modified)
    src = source(dp.url("/crl"))
    first = src.fetch(None)
    assert first is not None and first.data == b"crl-1"
    assert src.fetch(first.version) is None
    assert src.fetch(first.version) is None
    assert dp.statuses("/crl") == [200, 304, 304]
    assert sent in dp.seen[1].headers
    dp.put("/crl", b"crl-2", etag=etag, last_modified=last_modified)
    second = src.fetch(first.version)
    assert second is not None and second.data == b"crl-2" and second.version != first.version
    assert dp.statuses("/crl")[-1] == 200


def test_server_without_validators_is_downloaded_each_time(dp: DistributionPoint) -> None:
    dp.put("/ca", b"ca", etag=False, last_modified=False)
    src = source(dp.url("/ca"))
    first = src.fetch(None)
    assert first is not None
    again = src.fetch(first.version)
    assert again is not None and again.version == first.version  # same content: same version (a sha256)
    assert "if-none-match" not in dp.seen[1].headers and "if-modified-since" not in dp.seen[1].headers


@pytest.mark.parametrize(("how", "reason"), [
    ("missing", "HTTP 404"),
    ("cut", "body cut short"),
    ("refused", "Connection refused"),
])
def test_failures_are_one_line_source_errors(dp: DistributionPoint, how: str, reason: str) -> None:
    url = dp.url("/crl?token=s3cr3t")
    if how == "cut":
        dp.put("/crl?token=s3cr3t", b"partial", lie_length=1000)
    if how == "refused":
        dp.stop()
    with pytest.raises(SourceError) as info:
        source(url).fetch(None)
    message = info.value.message
    assert reason in message and "\n" not in message
    assert "s3cr3t" not in message  # the query is never shown
    assert f"127.0.0.1:{dp.port}/crl?..." in message


def test_oversized_body_is_refused(dp: DistributionPoint) -> None:
    dp.put("/big", b"x" * (MAX_BYTES + 1))
    with pytest.raises(SourceError, match="larger than"):
        source(dp.url("/big")).fetch(None)


def test_https_is_verified_with_the_system_trust_store(tls_dp: tuple[DistributionPoint, Path],
                                                       tmp_path: Path) -> None:
    point, ca_file = tls_dp
    point.put("/ca.pem", b"bundle")
    url = point.url("/ca.pem")
    # Not trusted by the system store: refused.
    with pytest.raises(SourceError, match="TLS certificate not trusted"):
        source(url).fetch(None)
    # Trusted once the system store holds the CA (SSL_CERT_FILE is how OpenSSL's default paths are overridden);
    # a fresh interpreter, because OpenSSL reads the variable when a default context is made.
    code = ("import sys; from proxy.sources.url import UrlSource; from proxy.sources.location import "
            "parse_location; got = UrlSource(parse_location(sys.argv[1])).fetch(None); print(got.data.decode())")
    out = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=30,
                         env={"SSL_CERT_FILE": str(ca_file), "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "bundle"


def test_https_with_an_explicit_context(tls_dp: tuple[DistributionPoint, Path]) -> None:
    point, ca_file = tls_dp
    point.put("/ca.pem", b"bundle")
    got = source(point.url("/ca.pem"), context=ssl.create_default_context(cafile=str(ca_file))).fetch(None)
    assert got is not None and got.data == b"bundle"


def test_redirect_from_https_to_http_is_refused(tls_dp: tuple[DistributionPoint, Path],
                                                dp: DistributionPoint) -> None:
    point, ca_file = tls_dp
    dp.put("/crl", b"plain")
    point.redirects["/crl"] = dp.url("/crl")
    ctx = ssl.create_default_context(cafile=str(ca_file))
    with pytest.raises(SourceError, match="refused a redirect from https:// to a non-https URL"):
        source(point.url("/crl"), context=ctx).fetch(None)
    assert dp.statuses("/crl") == []  # never asked over plain HTTP


def test_redirect_within_http_is_followed(dp: DistributionPoint) -> None:
    dp.put("/new.crl", b"moved")
    dp.redirects["/old.crl"] = dp.url("/new.crl")
    got = source(dp.url("/old.crl")).fetch(None)
    assert got is not None and got.data == b"moved"
