"""TLS abuse against the real proxy process: garbage handshakes, hostile certificates, resets everywhere.

Owns the gaps tests/e2e/test_tls_auth.py (bad certificate classes, legacy versions, CBC, renegotiation) and
tests/e2e/test_limits.py (handshake and header timeouts) leave:

* garbage instead of a ClientHello (plaintext HTTP, random bytes, SSLv2, records of the wrong type or size):
  refused in the handshake with an alert or a close, counted, never an HTTP answer;
* hostile client certificates through a real handshake, issued by a CA the proxy trusts
  (tests/adversarial/hostile_certs.py): a chain of 20 certificates, a leaf followed by 19 junk certificates, an
  unknown extension of 30 KiB and of 100 KiB, thousands of SANs, and subjects in odd or invalid string encodings.
  Identity parsing must neither crash nor hang: each connection gets a response (and the upstream one clean request
  whose identity headers are printable ASCII) or a clean refusal (and the upstream nothing);
* close_notify, FIN and TCP resets at every stage of a connection: mid-handshake, after the handshake, mid-head,
  mid-body upload, while waiting for the upstream, mid-response download.  The proxy survives, its file
  descriptors return to the baseline, and the upstream connection of an interrupted exchange is dropped, never
  reused dirty (the strict recorder would see stray bytes as an anomaly).

One proxy process (uvloop, like production) for the module, with ``allow_all_verified`` so every verified
certificate reaches the upstream, a short pool idle timeout so descriptors settle quickly, and no CRL (the hostile CA
publishes none).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from proxy.wire import proxy_protocol as pp
from tests.adversarial.hostile_certs import PLACEHOLDER, Credential, HostileCA, attribute
from tests.adversarial.recorder import Received, RecordingUpstream
from tests.adversarial.target import metrics, settled_fds, spawn, wait_fds
from tests.e2e.kit import MemTLSClient, eventually
from tests.harness import ProxyProcess, client_ctx
from tests.pki import Pki

H = b"Host: api.test\r\n"
REFUSAL_WITHIN = 15.0  # seconds: far below handshake_timeout (60) -- a close this fast is a refusal, not a timeout


@dataclass
class Env:
    pki: Pki
    ca: HostileCA
    recorder: RecordingUpstream
    proxy: ProxyProcess
    baseline_fds: int


@pytest.fixture(scope="module")
def env(pki: Pki, recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("tls-abuse")
    ca = HostileCA(tmp / "hostile")
    client_ca = tmp / "client-ca.crt"
    client_ca.write_bytes(pki.client_ca.read_bytes() + ca.root_pem.read_bytes())
    proc = spawn(tmp, pki, recorder.port, "tls-abuse", rules=[], top={"allow_all_verified": True},
                 server={"client_ca": str(client_ca), "crl": None, "handshake_timeout": 60.0,
                         "header_timeout": 60.0},  # a connection the proxy failed to notice would sit a minute
                 upstream={"pool_idle_timeout": 0.3})
    yield Env(pki, ca, recorder, proc, settled_fds(proc.proc.pid))
    proc.stop()
    assert "Traceback" not in proc.stderr(), proc.stderr()[-4000:]


def handshake_failures(env: Env) -> float:
    return sum(metrics(env.proxy).series("mtls_proxy_tls_handshake_failures_total").values())


async def assert_healthy(env: Env) -> None:
    """The proxy still serves a good client, and its descriptors are back to where they started."""
    c = await MemTLSClient.connect(env.proxy.port, client_ctx(env.pki))
    await c.handshake()
    resp = await c.request(b"GET /c/alive HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\n")
    assert resp.status == 200 and resp.body == b"/prod/c/alive"
    await c.close()
    after = await asyncio.to_thread(wait_fds, env.proxy.proc.pid, env.baseline_fds)
    assert after <= env.baseline_fds, f"fd leak: {after} open, baseline {env.baseline_fds}"
    assert env.proxy.proc.poll() is None


# ---- garbage instead of a ClientHello ------------------------------------------------------------------------


def _client_hello(pki: Pki) -> bytes:
    tls = client_ctx(pki).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def tls_record_types(data: bytes) -> set[int]:
    """Content types of the TLS records ``data`` consists of; AssertionError if it is not only whole records."""
    types, pos = set(), 0
    while pos < len(data):
        assert pos + 5 <= len(data) and data[pos + 1] == 3, data[pos:pos + 20]
        types.add(data[pos])
        pos += 5 + int.from_bytes(data[pos + 3:pos + 5], "big")
    assert pos == len(data), data[-20:]
    return types


GARBAGE: dict[str, Callable[[Pki], bytes]] = {
    "plaintext-http": lambda _: b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n",
    "plaintext-connect": lambda _: b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test\r\n\r\n",
    "random-4k": lambda _: bytes((i * 7919 + 13) % 256 for i in range(4096)),
    "nul-bytes": lambda _: b"\x00" * 1024,
    "sslv2-client-hello": lambda _: b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x07\x00\xc0" * 7
                                     + b"\x00" * 16,
    "record-length-64k": lambda _: b"\x16\x03\x01\xff\xff" + b"\x01" * 65535,
    "alert-first": lambda _: b"\x15\x03\x03\x00\x02\x02\x28",
    "application-data-first": lambda _: b"\x17\x03\x03\x00\x10" + b"\xaa" * 16,
    "change-cipher-spec-first": lambda _: b"\x14\x03\x03\x00\x01\x01",
    "heartbeat-first": lambda _: b"\x18\x03\x03\x00\x03\x01\x40\x00",
    "unknown-content-type": lambda _: b"\x63\x03\x03\x00\x04abcd",
    "empty-handshake-records": lambda _: b"\x16\x03\x01\x00\x00" * 64,
    "handshake-not-client-hello": lambda _: b"\x16\x03\x01\x00\x08\x02\x00\x00\x04\x03\x03\x00\x00",
    "client-hello-length-lies": lambda pki: (lambda h: h[:6] + b"\xff\xff\xff" + h[9:])(_client_hello(pki)),
    "client-hello-twice": lambda pki: _client_hello(pki) * 2,
    "proxy-v2-header-on-a-tls-port": lambda pki: pp.build(("192.0.2.1", 1), ("192.0.2.2", 443)) + _client_hello(pki),
}


@pytest.mark.parametrize("name", list(GARBAGE))
async def test_garbage_instead_of_client_hello_is_refused(name: str, env: Env) -> None:
    data = GARBAGE[name](env.pki)
    mark = env.recorder.mark()
    before = handshake_failures(env)
    reader, writer = await asyncio.open_connection("127.0.0.1", env.proxy.port)
    writer.write(data)
    reply = b""
    try:
        async with asyncio.timeout(REFUSAL_WITHIN):
            while chunk := await reader.read(65536):
                reply += chunk
    except ConnectionResetError:
        pass
    writer.close()
    assert b"HTTP/" not in reply, reply[:200]
    assert tls_record_types(reply) <= {0x14, 0x15, 0x16, 0x17}, reply[:40]  # TLS records (an alert) or nothing

    async def counted() -> bool:
        return handshake_failures(env) == before + 1

    await eventually(counted)
    assert env.recorder.since(mark) == []
    await assert_healthy(env)


# ---- hostile client certificates through a real handshake -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attempt:
    status: int | None  # the HTTP status, or None when refused
    detail: str


async def attempt(port: int, ctx: ssl.SSLContext, request: bytes) -> Attempt:
    """One request over a fresh TLS connection presenting ``ctx``'s certificate; a refusal is not an error."""
    try:
        async with asyncio.timeout(REFUSAL_WITHIN):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
    except (ssl.SSLError, ConnectionError) as exc:
        return Attempt(None, f"handshake: {getattr(exc, 'reason', None) or exc!r}")
    raw = b""
    detail = "closed without a response"
    try:
        writer.write(request)
        async with asyncio.timeout(REFUSAL_WITHIN):
            while chunk := await reader.read(65536):
                raw += chunk
    except ssl.SSLError as exc:  # TLS 1.3: the server judges the certificate after the client's handshake
        detail = f"alert: {exc.reason}"
    except ConnectionError as exc:
        detail = f"connection: {exc!r}"
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass
    if raw:
        return Attempt(int(raw.split(b" ", 2)[1]), raw[:200].decode("latin-1"))
    return Attempt(None, detail)


def _ctx(pki: Pki, cred: Credential, tls: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=pki.server_ca)
    ctx.load_cert_chain(cred.cert, cred.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2 if tls == "1.2" else ssl.TLSVersion.TLSv1_3
    return ctx


CN = NameOID.COMMON_NAME
Issue = Callable[[HostileCA, str], Credential]
# served: a 200, and the upstream got one clean request;  refused: OpenSSL refused it in the handshake;
# unusable: the handshake verified it but the identity parser cannot render it -> closed without a response,
# logged, nothing forwarded;  unsendable: OpenSSL will not even load it, so no handshake can carry it (the same
# decoder would reject it on the proxy's side before identity parsing; tests/test_identity.py feeds such bytes
# to the parser directly);  too large: its identity headers alone push the request past API Gateway's 10,240
# bytes of request line and headers -> 431 identity_too_large from the proxy, nothing forwarded.
SERVED, REFUSED, UNUSABLE, UNSENDABLE, TOO_LARGE = "served", "refused", "unusable", "unsendable", "too_large"
HOSTILE: dict[str, tuple[Issue, str]] = {
    # chains: verify_depth (2) bounds real chains; certificates that chain to nothing are ignored
    "chain-of-20-certificates": (lambda ca, n: ca.chain(n, 19), REFUSED),
    "chain-within-depth": (lambda ca, n: ca.chain(n, 2), SERVED),
    "leaf-plus-19-junk-certificates": (lambda ca, n: ca.with_junk(n, 19), SERVED),
    # size: OpenSSL's certificate-list limit (100 KiB by default) bounds what one handshake may make us read
    "unknown-extension-30k": (lambda ca, n: ca.big_extension(n, 30_000), SERVED),
    "unknown-extension-100k": (lambda ca, n: ca.big_extension(n, 100 * 1024), REFUSED),
    "2000-dns-sans": (lambda ca, n: ca.many_sans(n, 2000), TOO_LARGE),
    "10000-dns-sans": (lambda ca, n: ca.many_sans(n, 10_000), REFUSED),
    # subject encodings the builder can make
    "cn-bmpstring": (lambda ca, n: ca.subject(n, [attribute(CN, "Zürich 漢字 ☃", _ASN1Type.BMPString)]), SERVED),
    "cn-universalstring": (lambda ca, n: ca.subject(n, [attribute(CN, "emoji 🎉 𝔘", _ASN1Type.UniversalString)]),
                           SERVED),
    "cn-nul-crlf-header-injection": (lambda ca, n: ca.subject(n, [attribute(
        CN, "a\x00b\r\nX-Client-Cert-Subject: CN=admin\r\n")]), SERVED),
    "cn-bidi-override": (lambda ca, n: ca.subject(n, [attribute(CN, "\u202egnp.exe\u202c \u200b\ufeff")]), SERVED),
    "cn-log4shell-and-format": (lambda ca, n: ca.subject(n, [attribute(CN, '${jndi:ldap://x/a} %s%n {0} "}\\')]),
                                SERVED),
    "cn-10k": (lambda ca, n: ca.subject(n, [attribute(CN, "c" * 10_000)]), TOO_LARGE),
    "500-rdns": (lambda ca, n: ca.subject(n, [attribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"ou{i},+;")
                                              for i in range(500)]), TOO_LARGE),
    "empty-subject": (lambda ca, n: ca.subject(n, []), SERVED),
    # encodings only byte surgery can make (then re-signed, so the chain still verifies)
    "cn-invalid-utf8": (lambda ca, n: ca.raw_cn(n, 0x0C, b"\xff\xfe\xc0\x80" + b"a" * (len(PLACEHOLDER) - 4)),
                        UNSENDABLE),
    "cn-bmpstring-odd-length": (lambda ca, n: ca.raw_cn(n, 0x1E, b"\x00a" * 15 + b"\x00"), UNSENDABLE),
    "cn-octet-string": (lambda ca, n: ca.raw_cn(n, 0x04, b"\x00\x01" * 15 + b"\x02"), UNSENDABLE),
    "cn-teletex-high-bytes": (lambda ca, n: ca.raw_cn(n, 0x14, bytes(range(0xA0, 0xA0 + len(PLACEHOLDER)))),
                              UNUSABLE),
    "cn-printablestring-with-illegal-chars": (lambda ca, n: ca.raw_cn(n, 0x13, b"a@b*c\x00" + b"d" * 25),
                                              UNUSABLE),
}
IDENTITY_HEADERS = ("x-client-cert-subject", "x-client-cert-fingerprint", "x-client-cert-serial",
                    "x-forwarded-client-cert")


@pytest.fixture(scope="module")
def hostile(env: Env) -> dict[str, Credential]:
    return {name: issue(env.ca, name) for name, (issue, _) in HOSTILE.items()}


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_certificate_gets_a_response_or_a_clean_refusal(
        name: str, tls: str, env: Env, hostile: dict[str, Credential]) -> None:
    cred = hostile[name]
    expected = HOSTILE[name][1]
    if expected == UNSENDABLE:
        with pytest.raises(ssl.SSLError):
            _ctx(env.pki, cred, tls)
        return
    mark = env.recorder.mark()
    unusable_before = env.proxy.stderr().count("unusable client certificate")
    target = f"/c/{name}-{tls}"
    got = await attempt(env.proxy.port, _ctx(env.pki, cred, tls),
                        f"GET {target} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n".encode())
    seen = env.recorder.since(mark)
    if expected == UNUSABLE:
        await until(lambda: env.proxy.stderr().count("unusable client certificate") == unusable_before + 1)
    if expected == SERVED:
        assert got.status == 200, got
        (req,) = seen
        assert req.kind == "request" and req.target == "/prod" + target
        for header in IDENTITY_HEADERS:
            (value,) = req.header(header)
            assert all(0x20 <= ord(ch) <= 0x7E for ch in value), (header, value[:200])
        assert req.header("x-client-cert-fingerprint") == [hashlib.sha256(cred.leaf_der).hexdigest()]
        assert req.header("x-client-cert-subject")[0] != "CN=admin"
    elif expected == TOO_LARGE:
        assert got.status == 431, got  # the request itself is a few bytes: only the identity can be too large
        assert seen == [], seen
    else:
        assert got.status is None, got
        # refused: OpenSSL's alert during the handshake; unusable: closed right after it, without an answer
        assert got.detail.startswith(("handshake:", "alert:") if expected == REFUSED else "connection:"), got
        assert seen == [], seen
    await assert_healthy(env)


# ---- close_notify, FIN and resets at every stage ----------------------------------------------------------------


async def end_connection(c: MemTLSClient, how: str) -> None:
    if how == "close_notify":
        try:
            c.tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass  # our close_notify is in the BIO; we do not wait for the proxy's
        try:
            await c.send_raw(c.outgoing.read())
        except ConnectionError:
            pass
        c.writer.close()
    elif how == "fin":
        c.writer.write_eof()
        c.writer.close()
    else:  # a TCP reset: SO_LINGER 0 then close
        sock = c.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.writer.transport.abort()
    try:
        await c.writer.wait_closed()
    except (ConnectionError, ssl.SSLError):
        pass


async def send(c: MemTLSClient, data: bytes) -> None:
    c.tls.write(data)
    await c.send_raw(c.outgoing.read())


async def until(probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    async def check() -> Any:
        return probe()

    return await eventually(check, timeout=timeout)


def conn_of(env: Env, target: str) -> int:
    (req,) = [r for r in env.recorder.since() if r.kind == "request" and r.target == target]
    return req.conn


def assert_dropped_after(env: Env, conn: int, target: str) -> None:
    """The upstream connection that carried ``target`` ended and carried nothing after it."""
    records = [r for r in env.recorder.since() if r.conn == conn]
    assert records[-1].target == target or records[-1].kind == "incomplete", records[-3:]
    (info,) = [c for c in env.recorder.connections() if c.id == conn]
    assert info.end in ("reset", "eof", "closed-while-holding"), info


Stage = Callable[[Env, MemTLSClient, str], Awaitable[None]]


async def mid_handshake(env: Env, c: MemTLSClient, case: str) -> None:
    await c.send_raw(c.client_hello())
    first_flight = await asyncio.wait_for(c.reader.read(65536), REFUSAL_WITHIN)  # ServerHello ... (then we vanish)
    assert first_flight[:1] == b"\x16", first_flight[:20]


async def after_handshake(env: Env, c: MemTLSClient, case: str) -> None:
    await c.handshake()


async def mid_head(env: Env, c: MemTLSClient, case: str) -> None:
    await c.handshake()
    await send(c, f"GET /c/{case} HTTP/1.1\r\nHost: api.test\r\nX-Pad: abc".encode())


async def mid_body(env: Env, c: MemTLSClient, case: str) -> None:
    await c.handshake()
    before = env.recorder.bytes_received()
    await send(c, f"POST /c/{case} HTTP/1.1\r\nHost: api.test\r\nContent-Length: 400000\r\n\r\n".encode())
    await send(c, b"u" * 200_000)
    await until(lambda: env.recorder.bytes_received() - before > 150_000)  # the upload is streaming upstream


async def waiting_for_upstream(env: Env, c: MemTLSClient, case: str) -> None:
    await c.handshake()
    env.recorder.hold()
    await send(c, f"GET /hold/{case} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
    await until(lambda: env.recorder.holding == 1)


async def mid_response(env: Env, c: MemTLSClient, case: str) -> None:
    await c.handshake()
    await send(c, f"GET /big/64000000/{case} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
    got = 0
    async with asyncio.timeout(REFUSAL_WITHIN):
        while got < 300_000:
            got += len(await c._recv())  # noqa: SLF001 - MemTLSClient's plaintext reader


STAGES: dict[str, tuple[Stage, tuple[str, ...]]] = {
    "mid-handshake": (mid_handshake, ("fin", "reset")),  # no close_notify before the handshake completes
    "after-handshake": (after_handshake, ("close_notify", "fin", "reset")),
    "mid-head": (mid_head, ("close_notify", "fin", "reset")),
    "mid-body-upload": (mid_body, ("close_notify", "fin", "reset")),
    "waiting-for-upstream": (waiting_for_upstream, ("close_notify", "fin", "reset")),
    "mid-response-download": (mid_response, ("close_notify", "fin", "reset")),
}
STAGE_CASES = [(stage, how) for stage, (_, hows) in STAGES.items() for how in hows]


@pytest.mark.parametrize(("stage", "how"), STAGE_CASES, ids=[f"{s}-{h}" for s, h in STAGE_CASES])
async def test_client_vanishing_at_any_stage(stage: str, how: str, env: Env) -> None:
    case = f"{stage}-{how}"
    mark = env.recorder.mark()
    c = await MemTLSClient.connect(env.proxy.port, client_ctx(env.pki))
    await STAGES[stage][0](env, c, case)
    await end_connection(c, how)

    if stage == "mid-body-upload":
        # the aborted upload reaches the upstream as an incomplete request on a connection the proxy reset
        seen: list[Received] = await until(lambda: [r for r in env.recorder.since(mark) if r.kind != "request"])
        assert [r.kind for r in seen] == ["incomplete"], seen
        assert [r for r in env.recorder.since(mark) if r.kind == "request"] == []
        (info,) = [x for x in env.recorder.connections() if x.id == seen[0].conn]
        assert info.end == "reset", info
    elif stage == "waiting-for-upstream":
        target = f"/prod/hold/{case}"
        conn = conn_of(env, target)
        await until(lambda: [x for x in env.recorder.connections() if x.id == conn][0].end != "open")
        env.recorder.release()
        assert_dropped_after(env, conn, target)
    elif stage == "mid-response-download":
        target = f"/prod/big/64000000/{case}"
        conn = conn_of(env, target)
        await until(lambda: [x for x in env.recorder.connections() if x.id == conn][0].end != "open")
        assert_dropped_after(env, conn, target)
    else:
        assert [r for r in env.recorder.since(mark)] == []  # nothing complete was sent: nothing reached it
    assert [r for r in env.recorder.since() if r.kind == "anomaly"] == []
    await assert_healthy(env)
    env.recorder.release()


async def test_nothing_left_open_after_the_module(env: Env) -> None:
    """After every abuse above (pytest keeps file order), no descriptor, connection or upstream exchange is left."""
    after = await asyncio.to_thread(wait_fds, env.proxy.proc.pid, env.baseline_fds)
    assert after <= env.baseline_fds
    assert metrics(env.proxy).get("mtls_proxy_connections_active") == 0
    assert env.recorder.holding == 0
    assert [r for r in env.recorder.since() if r.kind == "anomaly"] == []
