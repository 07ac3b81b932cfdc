"""End-to-end: client authentication happens in the TLS handshake, refused with the right alert.

Owns: every bad-certificate class refused *during* the handshake (the client receives OpenSSL's alert, never an
HTTP status), counted under its ``tls_handshake_failures`` reason, with nothing reaching the upstream; the accepted
classes (ECDSA, RSA, intermediate sent by the client, self-signed anchor); the chain depth limit; TLS versions,
cipher suites, compression and renegotiation; and the partner smoke test with the real ``curl``.

Clients: ``asyncio``/``ssl`` streams (RawClient), aiohttp, ``/usr/bin/curl`` and ``openssl s_client``.
Tests marked with both loop factories also run on uvloop (production's loop; the TLS transport is driven by
readiness callbacks whose timing differs between the two).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import ssl
import threading
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import DEFAULT_CIPHERS
from tests.e2e.kit import CountingUpstream, CurlResult, echo_of, eventually, parse_response
from tests.harness import RawClient, Response, RunningProxy, client_ctx, get
from tests.pki import Pki

ProxyFactory = Callable[..., Awaitable[RunningProxy]]
Curl = Callable[..., Awaitable[CurlResult]]
BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
TLS12, TLS13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


# ---- a client attempt: refused in TLS, or an HTTP response ------------------------------------------------
@dataclass(frozen=True, slots=True)
class Refusal:
    in_handshake: bool  # the client's own handshake call failed (always so for TLS 1.2)
    alert: str  # OpenSSL's reason for what the client received, e.g. SSLV3_ALERT_CERTIFICATE_REVOKED


async def attempt(port: int, ctx: ssl.SSLContext, target: str = "/auth") -> Refusal | Response:
    """Connect, send one GET, read the answer.  A TLS 1.3 client finishes its handshake before the server has
    judged its certificate (RFC 8446 §4.4.2), so there the alert arrives on the first read instead."""
    async with asyncio.timeout(30):
        try:
            client = await RawClient.connect(port, ctx)
        except ssl.SSLError as exc:
            return Refusal(True, str(exc.reason))
        try:
            return await client.request(get(target))
        except ssl.SSLError as exc:
            return Refusal(False, str(exc.reason))
        finally:
            await client.close()


def tls_ctx(pki: Pki, name: str | None, tls: str) -> ssl.SSLContext:
    ctx = client_ctx(pki, name)
    if tls == "1.2":
        ctx.maximum_version = TLS12
    else:
        ctx.minimum_version = TLS13
    return ctx


def failures(rp: RunningProxy) -> dict[str, int]:
    """The non-zero ``tls_handshake_failures`` counters."""
    return {k: v for k, v in rp.server.metrics.snapshot()["handshake_failures"].items() if v}


async def settled(rp: RunningProxy, expected: dict[str, int], timeout: float = 10.0) -> None:
    """Poll until the failure counters equal ``expected`` (the server counts in its own task), then compare."""
    async with asyncio.timeout(timeout):
        while failures(rp) != expected and sum(failures(rp).values()) < sum(expected.values()):
            await asyncio.sleep(0.02)
    assert failures(rp) == expected


def failure_logs(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.getMessage() == "tls handshake failed"]  # type: ignore[attr-defined]


# ---- refused classes --------------------------------------------------------------------------------------
# (client, metric reason, alert the client gets under TLS 1.2, under TLS 1.3)
REFUSED = [
    pytest.param(None, "no_cert", "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV13_ALERT_CERTIFICATE_REQUIRED", id="no_cert"),
    pytest.param("other_ca_same_cn", "untrusted", "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_UNKNOWN_CA",
                 id="other_ca_same_cn"),
    pytest.param("expired", "expired", "SSLV3_ALERT_CERTIFICATE_EXPIRED", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
                 id="expired"),
    pytest.param("not_yet_valid", "expired", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_BAD_CERTIFICATE",
                 id="not_yet_valid"),
    pytest.param("revoked", "revoked", "SSLV3_ALERT_CERTIFICATE_REVOKED", "SSLV3_ALERT_CERTIFICATE_REVOKED",
                 id="revoked"),
    pytest.param("no_client_auth", "bad_purpose", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
                 "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", id="no_client_auth"),
    pytest.param("too_deep", "untrusted", "TLSV1_ALERT_UNKNOWN_CA", "TLSV1_ALERT_UNKNOWN_CA", id="too_deep"),
]


@BOTH_LOOPS
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize(("name", "reason", "alert12", "alert13"), REFUSED)
async def test_bad_certificate_is_refused_during_the_handshake(
        pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream, tls: str, name: str | None,
        reason: str, alert12: str, alert13: str) -> None:
    rp = await auth_proxy()
    out = await attempt(rp.port, tls_ctx(pki, name, tls))
    assert isinstance(out, Refusal), f"{name}: expected a TLS alert, got HTTP {out.status} {out.body[:200]!r}"
    assert out.alert == (alert12 if tls == "1.2" else alert13)
    if tls == "1.2":
        assert out.in_handshake  # the handshake itself failed: no HTTP exchange could even start
    await settled(rp, {reason: 1})
    assert auth_upstream.requests == []
    assert rp.access() == []  # not a request: no access-log line, no HTTP status


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("name", ["good", "rsa", "via_intermediate", "self_signed"])
@BOTH_LOOPS
async def test_accepted_certificate_classes(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream,
                                            name: str, tls: str) -> None:
    rp = await auth_proxy(top={"allow_all_verified": True}, rules=[])
    client = pki.clients[name]
    connector = aiohttp.TCPConnector(ssl=tls_ctx(pki, name, tls))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"https://localhost:{rp.port}/whoami") as resp:
            body = await resp.read()
            assert resp.status == 200, body
        [conn] = rp.server.state.connections  # aiohttp keeps it alive: what did the proxy negotiate?
        version = conn.transport.get_extra_info("ssl_object").version()
    assert version == ("TLSv1.2" if tls == "1.2" else "TLSv1.3")
    echo = echo_of(body)
    assert echo.one("X-Client-Cert-Fingerprint") == client.fingerprint
    assert echo.one("X-Client-Cert-Subject") == client.subject
    assert auth_upstream.requests == [("GET", "/prod/whoami")]
    assert failures(rp) == {}


async def test_intermediate_comes_from_the_client(pki: Pki, auth_proxy: ProxyFactory, tmp_path: Path) -> None:
    """client_ca holds only the root: without the intermediate the client sends, the chain cannot be built."""
    rp = await auth_proxy(top={"allow_all_verified": True}, rules=[])
    client = pki.clients["via_intermediate"]
    pem = client.cert.read_text()
    leaf_only = tmp_path / "leaf-only.crt"
    leaf_only.write_text(pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")] + "\n")
    assert pem.count("BEGIN CERTIFICATE") == 2 and leaf_only.read_text().count("BEGIN CERTIFICATE") == 1
    ctx = client_ctx(pki, None, tls_max=TLS12)
    ctx.load_cert_chain(leaf_only, client.key)
    out = await attempt(rp.port, ctx)
    assert out == Refusal(True, "TLSV1_ALERT_UNKNOWN_CA")
    assert failures(rp) == {"untrusted": 1}
    resp = await attempt(rp.port, client_ctx(pki, "via_intermediate"))
    assert isinstance(resp, Response) and resp.status == 200


async def test_chain_depth_limit(pki: Pki, auth_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture) -> None:
    """too_deep has 3 intermediates: refused for its depth with the default verify_depth 2, accepted with 3."""
    caplog.set_level(logging.INFO, logger="mtls_proxy")
    default = await auth_proxy(top={"allow_all_verified": True}, rules=[])
    out = await attempt(default.port, client_ctx(pki, "too_deep", tls_max=TLS12))
    assert out == Refusal(True, "TLSV1_ALERT_UNKNOWN_CA")
    assert failures(default) == {"untrusted": 1}
    [logged] = failure_logs(caplog)
    assert "chain too long" in logged["detail"], logged  # refused for its depth, not for its issuer

    deeper = await auth_proxy(server={"verify_depth": 3}, top={"allow_all_verified": True}, rules=[])
    resp = await attempt(deeper.port, client_ctx(pki, "too_deep"))
    assert isinstance(resp, Response) and resp.status == 200
    assert echo_of(resp.body).one("X-Client-Cert-Subject") == pki.clients["too_deep"].subject


async def test_expired_crl_refuses_every_client_and_says_so(
        pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mtls_proxy")
    rp = await auth_proxy(server={"crl": str(pki.crl_expired)}, top={"allow_all_verified": True}, rules=[])
    names = ["good", "rsa", "other", "via_intermediate", "self_signed"]
    for name in names:
        out = await attempt(rp.port, client_ctx(pki, name, tls_max=TLS12))
        assert isinstance(out, Refusal) and out.in_handshake and "ALERT" in out.alert, (name, out)
    # X509_V_ERR_CRL_HAS_EXPIRED / UNABLE_TO_GET_CRL are no certificate fault: counted as "other".
    assert failures(rp) == {"other": len(names)}
    details = [f["detail"] for f in failure_logs(caplog)]
    assert len(details) == len(names)
    # Clients of the CA whose CRL expired: the log names the cause.  (The others have no CRL at all.)
    assert [d for d in details if "CRL has expired" in d] == details[:3], details
    assert auth_upstream.requests == []


# ---- the partner smoke test with the real curl -------------------------------------------------------------
def curl_args(pki: Pki, name: str | None, port: int, tls: str | None = None) -> list[str]:
    args = []
    if name is not None:
        client = pki.clients[name]
        args += ["--key", str(client.key), "--cert", str(client.cert)]
    args += ["--cacert", str(pki.server_ca)]
    if tls == "1.2":
        args += ["--tlsv1.2", "--tls-max", "1.2"]
    elif tls == "1.3":
        args += ["--tlsv1.3"]
    return [*args, "--write-out", "\n%{http_code}", f"https://localhost:{port}/smoke"]


async def test_curl_smoke_test_gets_200_with_identity(pki: Pki, auth_proxy: ProxyFactory, auth_curl: Curl) -> None:
    rp = await auth_proxy()
    res = await auth_curl(*curl_args(pki, "good", rp.port))
    assert res.returncode == 0, res.stderr
    body, _, code = res.stdout.rpartition(b"\n")
    assert code == b"200"
    echo = echo_of(body)
    assert echo.path == "/prod/smoke"
    assert echo.one("X-Client-Cert-Subject") == pki.clients["good"].subject
    assert echo.one("X-Client-Cert-Fingerprint") == pki.clients["good"].fingerprint


CURL_REFUSED = {  # (client, tls) -> what curl names
    (None, "1.2"): "alert handshake failure",
    (None, "1.3"): "alert certificate required",
    ("revoked", "1.2"): "alert certificate revoked",
    ("revoked", "1.3"): "alert certificate revoked",
}


@BOTH_LOOPS
@pytest.mark.parametrize(("name", "tls"), list(CURL_REFUSED), ids=[f"{n}-{t}" for n, t in CURL_REFUSED])
async def test_curl_names_the_alert(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream,
                                    auth_curl: Curl, name: str | None, tls: str) -> None:
    """curl exits with a TLS error (35 in the handshake, 56 on the first read under TLS 1.3) naming the alert.

    Repeated: a TCP reset right behind the alert used to overtake curl under TLS 1.3, which then failed with
    ``(55) getpeername() failed`` and never showed the partner why.
    """
    rp = await auth_proxy()
    for _ in range(6):
        res = await auth_curl(*curl_args(pki, name, rp.port, tls))
        assert res.returncode in (35, 56), (res.returncode, res.stderr)
        assert CURL_REFUSED[(name, tls)] in res.stderr, res.stderr
        assert res.stdout == b"\n000"  # no HTTP status at all
    assert sum(failures(rp).values()) == 6
    assert auth_upstream.requests == []


# ---- protocol versions, ciphers, compression --------------------------------------------------------------
async def test_tls12_only_refuses_a_tls13_only_client(pki: Pki, auth_proxy: ProxyFactory,
                                                      auth_upstream: CountingUpstream) -> None:
    rp = await auth_proxy(server={"tls_versions": ["1.2"]})
    out = await attempt(rp.port, tls_ctx(pki, "good", "1.3"))
    assert out == Refusal(True, "TLSV1_ALERT_PROTOCOL_VERSION")
    assert failures(rp) == {"protocol": 1}
    assert auth_upstream.requests == []

    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))  # offers 1.2 and 1.3
    try:
        assert client.writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        assert (await client.request(get("/v"))).status == 200
    finally:
        await client.close()


@dataclass(frozen=True, slots=True)
class Visit:
    session: ssl.SSLSession
    reused: bool
    response: Response


def _visit(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> Visit:
    """One blocking connection: GET /whoami with Connection: close, read to the proxy's close_notify."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls_sock:
            tls_sock.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls_sock.recv(65536):
                data += chunk
            assert tls_sock.session is not None
            return Visit(tls_sock.session, tls_sock.session_reused, parse_response(data))


@BOTH_LOOPS
@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_a_partner_resumes_its_session_from_the_proxys_cache(
        pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream, monkeypatch: pytest.MonkeyPatch,
        tls: str) -> None:
    """The listener resumes a session from the server context's cache (no tickets) and the resumed connection
    carries the same verified identity.  The listener drives each handshake step through the C-level
    do_handshake (proxy.openssl.sslobj_handshake): ssl.SSLSocket.do_handshake is never called on its side."""
    server_side_calls: list[ssl.SSLSocket] = []
    wrapper = ssl.SSLSocket.do_handshake

    def counted(self: ssl.SSLSocket, block: bool = False) -> None:
        if self.server_side:
            server_side_calls.append(self)
        wrapper(self, block)

    monkeypatch.setattr(ssl.SSLSocket, "do_handshake", counted)
    rp = await auth_proxy(top={"allow_all_verified": True}, rules=[])
    ctx = tls_ctx(pki, "good", tls)
    first = await asyncio.to_thread(_visit, rp.port, ctx, None)
    second = await asyncio.to_thread(_visit, rp.port, ctx, first.session)
    assert not first.reused
    assert second.reused
    if tls == "1.2":
        assert not first.session.has_ticket  # resumed by session ID: the proxy issues no ticket
    for visit in (first, second):
        assert visit.response.status == 200, visit.response
        echo = echo_of(visit.response.body)
        assert echo.one("X-Client-Cert-Fingerprint") == pki.clients["good"].fingerprint
    assert rp.server.state.runtime.server_context.session_stats()["hits"] == 1
    assert server_side_calls == []
    assert failures(rp) == {}


async def test_default_versions_negotiate_tls13(pki: Pki, auth_proxy: ProxyFactory) -> None:
    rp = await auth_proxy()
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        assert client.writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    finally:
        await client.close()


def legacy_ctx(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = client_ctx(pki, "good")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python deprecates TLS 1.0/1.1: that is the point
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS < 1.2 above security level 0
    return ctx


async def client_hello(ctx: ssl.SSLContext) -> tuple[bytes, str]:
    """The first TLS record the local OpenSSL sends with ``ctx`` (b"" if it sends none) and the client's error."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(5)
            body = await reader.readexactly(int.from_bytes(head[3:5], "big"))
            record = head + body
        except (asyncio.IncompleteReadError, ConnectionError):
            record = b""
        if not got.done():
            got.set_result(record)
        writer.transport.abort()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    error = ""
    try:
        port = server.sockets[0].getsockname()[1]
        try:
            async with asyncio.timeout(10):
                _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
                writer.transport.abort()
        except (ssl.SSLError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        async with asyncio.timeout(10):
            return await got, error
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(("version", "wire"), [(ssl.TLSVersion.TLSv1, b"\x03\x01"),
                                              (ssl.TLSVersion.TLSv1_1, b"\x03\x02")], ids=["1.0", "1.1"])
async def test_tls10_and_tls11_clients_are_refused(pki: Pki, auth_proxy: ProxyFactory,
                                                   auth_upstream: CountingUpstream, version: ssl.TLSVersion,
                                                   wire: bytes) -> None:
    ctx = legacy_ctx(pki, version)
    hello, error = await client_hello(ctx)
    # A ClientHello record (type 22, handshake type 1) whose client_version is the old protocol (RFC 2246 §7.4.1.2).
    if not (len(hello) > 11 and hello[0] == 22 and hello[5] == 1 and hello[9:11] == wire):
        pytest.skip(f"the local OpenSSL ({ssl.OPENSSL_VERSION}) does not send a {version.name} ClientHello "
                    f"even at @SECLEVEL=0 (first record {hello[:11].hex()}, client error {error!r})")
    rp = await auth_proxy()
    out = await attempt(rp.port, ctx)
    assert out == Refusal(True, "TLSV1_ALERT_PROTOCOL_VERSION")  # the proxy's alert, not a local refusal
    assert failures(rp) == {"protocol": 1}
    assert auth_upstream.requests == []


CBC_SUITE = "ECDHE-ECDSA-AES128-SHA"  # the test server key is ECDSA


async def test_cbc_only_client_is_refused_by_default(pki: Pki, auth_proxy: ProxyFactory,
                                                     auth_upstream: CountingUpstream) -> None:
    rp = await auth_proxy()
    ctx = client_ctx(pki, "good", tls_max=TLS12)
    ctx.set_ciphers(CBC_SUITE)
    out = await attempt(rp.port, ctx)
    assert out == Refusal(True, "SSLV3_ALERT_HANDSHAKE_FAILURE")
    assert failures(rp) == {"protocol": 1}
    assert auth_upstream.requests == []


async def test_cbc_suite_accepted_when_configured(pki: Pki, auth_proxy: ProxyFactory) -> None:
    rp = await auth_proxy(server={"ciphers": DEFAULT_CIPHERS + ":" + CBC_SUITE})
    ctx = client_ctx(pki, "good", tls_max=TLS12)
    ctx.set_ciphers(CBC_SUITE)
    client = await RawClient.connect(rp.port, ctx)
    try:
        assert client.writer.get_extra_info("ssl_object").cipher()[0] == CBC_SUITE
        assert (await client.request(get("/cbc"))).status == 200
    finally:
        await client.close()


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_no_compression(pki: Pki, auth_proxy: ProxyFactory, tls: str) -> None:
    rp = await auth_proxy()
    assert rp.server.state.runtime.server_context.options & ssl.OP_NO_COMPRESSION
    client = await RawClient.connect(rp.port, tls_ctx(pki, "good", tls))
    try:
        assert client.writer.get_extra_info("ssl_object").compression() is None
        assert (await client.request(get("/c"))).status == 200
    finally:
        await client.close()


# ---- renegotiation: openssl s_client's "R" command on a TLS 1.2 connection ---------------------------------
OPENSSL = shutil.which("openssl")
REQUEST = b"GET /reneg HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Renegotiation:
    answered_before: int  # HTTP responses before "R"
    answered_after: int  # HTTP responses to the request sent after "R"
    handshakes: int  # server certificate verifications s_client printed (2 = a renegotiation completed)
    stderr: str
    returncode: int | None


async def renegotiate(pki: Pki, port: int) -> Renegotiation:
    """One request, then ``R`` (SSL_renegotiate: a new ClientHello on the live connection), then one more."""
    assert OPENSSL is not None
    good = pki.clients["good"]
    proc = await asyncio.create_subprocess_exec(
        OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-tls1_2",
        "-cert", str(good.cert), "-key", str(good.key), "-CAfile", str(pki.server_ca),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()

    async def pump(stream: asyncio.StreamReader, buf: bytearray) -> None:
        while chunk := await stream.read(65536):
            buf += chunk

    pumps = [asyncio.create_task(pump(proc.stdout, out)), asyncio.create_task(pump(proc.stderr, err))]

    async def until(buf: bytearray, marker: bytes, count: int = 1) -> bool:
        """Poll until ``marker`` shows up ``count`` times, or s_client has exited and said all it will."""
        async def seen() -> bool:
            return buf.count(marker) >= count or all(p.done() for p in pumps)
        await eventually(seen, timeout=20, interval=0.02)
        return buf.count(marker) >= count

    async def send(data: bytes) -> None:
        try:
            proc.stdin.write(data)  # type: ignore[union-attr]
            await proc.stdin.drain()  # type: ignore[union-attr]
        except (BrokenPipeError, ConnectionResetError):
            pass  # s_client already exited

    try:
        assert await until(out, b"Verify return code:"), (bytes(out), bytes(err))
        await send(REQUEST)
        assert await until(out, b"HTTP/1.1 200"), (bytes(out), bytes(err))
        # s_client acts on "R" only when it is the whole read from stdin, so send it alone and wait for it.
        await send(b"R\n")
        assert await until(err, b"RENEGOTIATING"), bytes(err)
        await send(REQUEST)
        await until(out, b"HTTP/1.1 200", 2)
    finally:
        if proc.returncode is None and proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        await asyncio.gather(*pumps)
    return Renegotiation(1, out.count(b"HTTP/1.1 200") - 1, err.count(b"depth=0"),
                         err.decode(errors="replace"), proc.returncode)


@pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool not installed")
async def test_client_initiated_renegotiation_is_refused(pki: Pki, auth_proxy: ProxyFactory) -> None:
    rp = await auth_proxy()
    result = await renegotiate(pki, rp.port)
    assert result.handshakes == 1, result.stderr  # the second handshake never completed
    assert result.answered_after == 0
    assert "no renegotiation" in result.stderr  # the proxy answered the new ClientHello with no_renegotiation
    resp = await attempt(rp.port, client_ctx(pki, "good"))  # and it is still serving
    assert isinstance(resp, Response) and resp.status == 200


@pytest.mark.skipif(OPENSSL is None, reason="openssl command-line tool not installed")
async def test_renegotiation_probe_really_renegotiates(pki: Pki) -> None:
    """Control: against a server that allows it, the same procedure completes a renegotiation and is answered,
    so the test above would fail if the proxy allowed one."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.options |= 0x100  # SSL_OP_ALLOW_CLIENT_RENEGOTIATION (OpenSSL 3 refuses client renegotiation otherwise)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(30)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                while data := tls.recv(65536):
                    if b"GET " in data:
                        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, name="renegotiating-server", daemon=True)
    thread.start()
    try:
        result = await renegotiate(pki, listener.getsockname()[1])
    finally:
        listener.close()
        await asyncio.to_thread(thread.join, 30)
    assert result.handshakes == 2, result.stderr
    assert result.answered_after == 1
