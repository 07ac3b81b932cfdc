"""End-to-end: the access log, one JSON line per exchange or refusal, as the real proxy writes it.

Owns: one JSON line per request with time, client subject and fingerprint, matched rule, method, path, status,
bytes in/out, total and upstream duration and error code; lines for refused and failed requests; and that no
header value, body or other secret a client sent ever reaches a log (access log or the proxy's own logger).

The in-process proxy writes its access log into a pipe (``RunningProxy.access()`` flushes and parses it; the raw
text is ``RunningProxy.log.buf``).
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from collections.abc import Awaitable, Callable

import pytest

from tests.e2e.kit import CountingUpstream
from tests.harness import RawClient, RunningProxy, client_ctx, free_port, get
from tests.pki import Pki

ProxyFactory = Callable[..., Awaitable[RunningProxy]]
FIELDS = {"time", "client", "vpce", "subject", "fingerprint", "rule", "method", "path", "status", "bytes_in",
          "bytes_out", "duration_ms", "upstream_ms", "error"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
RULES = [{"name": "partner-a", "subject_cn": ["client-a"], "paths": ["/ok/**"]}]


def raw_log(rp: RunningProxy) -> str:
    rp.access()  # flush and read
    return rp.log.buf.decode("utf-8")


async def test_one_line_per_request_with_every_field(pki: Pki, auth_proxy: ProxyFactory,
                                                     auth_upstream: CountingUpstream) -> None:
    rp = await auth_proxy(rules=RULES)
    good = pki.clients["good"]
    upload = bytes(range(256)) * 5
    chunks = [b"a" * 100, b"b" * 200, b"c" * 3]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:  # all on one keep-alive connection
        answers = [
            await client.request(get("/ok/a?x=1")),
            await client.request(b"POST /ok/up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                           % (len(upload), upload)),
            await client.request(b"PUT /ok/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + chunked),
            await client.request(get("/denied")),
            await client.request(b"HEAD /ok/h HTTP/1.1\r\nHost: x\r\n\r\n", head_request=True),
        ]
    finally:
        await client.close()
    assert [a.status for a in answers] == [200, 200, 200, 403, 200]
    text = raw_log(rp)
    assert text.endswith("\n") and len(text.splitlines()) == len(answers)  # one line per request, nothing else
    lines = [json.loads(line) for line in text.splitlines()]
    expected = [  # method, path as received, status, rule, bytes_in, error
        ("GET", "/ok/a?x=1", 200, "partner-a", 0, None),
        ("POST", "/ok/up", 200, "partner-a", len(upload), None),
        ("PUT", "/ok/chunks", 200, "partner-a", sum(map(len, chunks)), None),
        ("GET", "/denied", 403, None, 0, "forbidden"),
        ("HEAD", "/ok/h", 200, "partner-a", 0, None),
    ]
    for line, answer, (method, path, status, rule, bytes_in, error) in zip(lines, answers, expected):
        assert set(line) == FIELDS, line
        assert TIME.fullmatch(line["time"]), line
        assert line["client"] == "127.0.0.1" and line["vpce"] is None
        assert line["subject"] == good.subject and line["fingerprint"] == good.fingerprint
        assert (line["method"], line["path"], line["status"], line["rule"], line["bytes_in"], line["error"]) == (
            method, path, status, rule, bytes_in, error)
        assert line["bytes_out"] == len(answer.body), line  # the body the client received (none for HEAD)
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        if status == 200:  # forwarded: the upstream part is inside the total
            assert 0 <= line["upstream_ms"] <= line["duration_ms"], line
        else:  # refused before anything was sent upstream
            assert line["upstream_ms"] is None
    assert len(auth_upstream.requests) == 4


async def test_a_streamed_download_is_logged_with_every_byte(pki: Pki, auth_proxy: ProxyFactory) -> None:
    """A body that arrives in many reads (not the one-read fast path) is counted piece by piece."""
    rp = await auth_proxy(rules=[{"name": "partner-a", "subject_cn": ["client-a"], "paths": ["/bytes/*"]}])
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        resp = await client.request(get("/bytes/1000000"), timeout=30)
    finally:
        await client.close()
    assert resp.status == 200 and len(resp.body) == 1_000_000
    [line] = rp.access()
    assert (line["path"], line["status"], line["bytes_out"]) == ("/bytes/1000000", 200, 1_000_000)


async def test_upstream_failure_is_logged_with_its_code(pki: Pki, auth_proxy: ProxyFactory) -> None:
    rp = await auth_proxy(upstream_port=free_port(), rules=RULES)  # nothing listens there
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        resp = await client.request(get("/ok/down"))
    finally:
        await client.close()
    assert resp.status == 502
    [line] = rp.access()
    assert (line["status"], line["error"], line["rule"], line["path"]) == (502, "upstream_unreachable", "partner-a",
                                                                           "/ok/down")
    assert line["bytes_out"] == len(resp.body)


async def test_handshake_failures_are_not_requests(pki: Pki, auth_proxy: ProxyFactory,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A refused certificate writes no access line (there was no request); the proxy's own log says why."""
    caplog.set_level(logging.INFO, logger="mtls_proxy")
    rp = await auth_proxy(rules=RULES)
    ctx = client_ctx(pki, "revoked", tls_max=ssl.TLSVersion.TLSv1_2)  # TLS 1.2: the handshake itself fails
    with pytest.raises(ssl.SSLError):
        await RawClient.connect(rp.port, ctx)
    assert rp.access() == []
    [fields] = [getattr(r, "fields") for r in caplog.records if r.getMessage() == "tls handshake failed"]
    assert fields["reason"] == "revoked" and fields["client"] == "127.0.0.1"


SECRETS = {
    "authorization": "Bearer SECRET-bearer-7f3a9c",
    "proxy-authorization": "Basic SECRET-proxyauth-2b8d",
    "cookie": "session=SECRET-cookie-5e1f",
    "x-api-key": "SECRET-apikey-9c4e",
    "x-amz-security-token": "SECRET-sts-token-3d2a",
}


@pytest.mark.parametrize("target", ["/ok/private", "/denied"])
async def test_no_header_values_or_bodies_in_any_log(pki: Pki, auth_proxy: ProxyFactory, target: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mtls_proxy")
    rp = await auth_proxy(rules=RULES)
    headers = b"".join(f"{k}: {v}\r\n".encode() for k, v in SECRETS.items())
    body = b'{"password": "SECRET-body-4a7b"}'
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        resp = await client.request(b"POST " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers
                                    + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    finally:
        await client.close()
    assert resp.status == (200 if target.startswith("/ok") else 403)
    text = raw_log(rp)
    assert len(text.splitlines()) == 1
    logs = text + "\n".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in caplog.records)
    assert "SECRET" not in logs, logs
    assert "PRIVATE KEY" not in logs


async def test_weird_subject_stays_one_ascii_json_line(pki: Pki, auth_proxy: ProxyFactory) -> None:
    """Quotes, commas, CR/LF and non-ASCII in a certificate cannot split or break a log line."""
    weird = pki.clients["weird"]
    rp = await auth_proxy(rules=RULES)  # no rule names the weird certificate: a 403 line
    client = await RawClient.connect(rp.port, client_ctx(pki, "weird"))
    try:
        resp = await client.request(get("/ok/x"))
    finally:
        await client.close()
    assert resp.status == 403
    text = raw_log(rp)
    assert text.isascii() and text.count("\n") == 1 and "\r" not in text
    [line] = [json.loads(x) for x in text.splitlines()]
    assert line["subject"] == resp.json()["subject"]  # the same escaped RFC 4514 text as the 403 body
    assert line["fingerprint"] == weird.fingerprint
    assert "\\0D\\0A" in line["subject"] and "\r" not in line["subject"]
