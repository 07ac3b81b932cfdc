"""ClientConnection driven bytes in, bytes out: the request loop, its refusals and its close, without sockets or TLS.

Owns: unit tests of ``proxy.connection`` with ``proxy.exchange`` -- every byte the client sends is fed to
``data_received``; every byte the proxy writes is read back from an in-memory transport -- over a real
``ServerState`` (real metrics, slots, partner gate, access log on a pipe).  The upstream is a real
``UpstreamConnection`` (real response parsing) on an in-memory transport; the only fake is the dial:
``FakePool.connect`` (``UpstreamPool``'s one network call) hands out such connections, or raises.  The e2e tests
(``tests/e2e``) cover the same behaviour over real sockets and TLS; these pin the state machine itself, fast.

Must not: open sockets, start TLS, or sleep on the wall clock (a loop turn or two is all a dial takes here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.accesslog import AccessLog, connection_prefix
from proxy.config import AllowRule, Config, load
from proxy.connection import CONTINUE, GATEWAY_HEAD_LIMIT, ClientConnection
from proxy.errors import UpstreamConnectError
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.partners import Partners, limits_of
from proxy.policy import Policy
from proxy.runtime import Peer
from proxy.sockets import Lingerer
from proxy.slots import ConnectionSlots
from proxy.state import ServerState
from proxy.upstream import UpstreamConnection, UpstreamPool
from proxy.wire import http1
from proxy.wire.headers import connection_block, upstream_block

ENV = {"MTLS_PROXY_SERVER_CERT": "x", "MTLS_PROXY_SERVER_KEY": "x", "MTLS_PROXY_SERVER_CLIENT_CA": "x",
       "MTLS_PROXY_UPSTREAM_URL": "https://api.test/prod",
       "MTLS_PROXY_ALLOW": '[{"name": "orders", "subject_cn": ["client-a"], "paths": ["/orders/**"]}]'}
CFG = load(None, ENV)

IDENT = Identity(subject="CN=client-a,O=partner", common_names=("client-a",), san_dns=(), san_uri=(),
                 serial="1A2B", fingerprint="ab" * 32, not_after=2e9,
                 xfcc='Hash=' + "ab" * 32 + ';Subject="CN=client-a,O=partner"', thumbprint="q" * 43)
RULES = (AllowRule(name="orders", subject_cn=("client-a",), paths=("/orders/**",)),
         AllowRule(name="limited", subject_cn=("client-a",), paths=("/limited",), rate_limit=0.001, burst=1))
POLICY = Policy.compile(RULES, False)
BLOCK = connection_block(upstream_block(CFG.upstream), IDENT, "10.0.0.1", None)


def make_peer(block: bytes = BLOCK) -> Peer:
    return Peer(IDENT, POLICY.for_connection(IDENT, None), block,
                connection_prefix("10.0.0.1", None, IDENT.subject, IDENT.fingerprint), "10.0.0.1", None,
                limits_of(RULES))


def get(path: bytes = b"/orders/1", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"GET " + path + b" HTTP/" + version + b"\r\nHost: proxy.test\r\n" + extra + b"\r\n"


def forwarded(line: bytes, fields: bytes = b"", chunked: bool = False) -> bytes:
    """The head the upstream must get: the request line, the client's end-to-end lines, the proxy's block."""
    return line + b"\r\n" + fields + BLOCK + (b"Transfer-Encoding: chunked\r\n" if chunked else b"") + b"\r\n"


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# ---- the in-memory transport and the fake dial ---------------------------------------------------------------


class FakeSSL:
    """What the connection and the pool ask of the ssl object: the TLS version, the session and its context."""

    def __init__(self, version: str) -> None:
        self._version = version
        self.session = object()
        self.context = None

    def version(self) -> str:
        return self._version


class FakeTransport:
    """An asyncio transport in memory: records writes, says how it was ended, and -- like a real one -- calls the
    protocol's ``connection_lost`` one loop turn after ``close()`` or ``abort()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.BaseProtocol, tls: str = "TLSv1.3") -> None:
        self.loop = loop
        self.protocol = protocol
        self.chunks: list[bytes] = []
        self.late: list[bytes] = []  # written after close/abort: would be lost on a real transport
        self.closed = False  # graceful close (buffered output, then close_notify)
        self.aborted = False  # reset
        self.lingered = False
        self.reading = True
        self.lost = False
        self._ssl = FakeSSL(tls)

    def write(self, data: bytes) -> None:
        (self.late if self.is_closing() else self.chunks).append(bytes(data))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def take(self) -> bytes:
        out = self.data
        self.chunks.clear()
        return out

    def is_reading(self) -> bool:
        return self.reading

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self, linger: bool = False) -> None:
        self.lingered |= linger
        if not self.is_closing():
            self.closed = True
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        first = not self.is_closing()
        self.aborted = True
        if first:
            self.loop.call_soon(self._lose)

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._ssl if name == "ssl_object" else default


class FakePool(UpstreamPool):
    """The real pool (idle list, release, acquire) with the dial replaced: no socket, no TLS."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: Any) -> None:
        super().__init__(loop, cfg, None)  # type: ignore[arg-type]  # no TLS context: nothing is dialled
        self.dialled: list[UpstreamConnection] = []
        self.fail: Exception | None = None

    async def connect(self) -> UpstreamConnection:
        if self.fail is not None:
            raise self.fail
        conn = UpstreamConnection(self)
        conn.connection_made(FakeTransport(self.loop, conn))  # type: ignore[arg-type]
        self._all.add(conn)
        self.dialled.append(conn)
        return conn


def up_tr(conn: UpstreamConnection) -> FakeTransport:
    return conn.transport  # type: ignore[return-value]


class Client:
    def __init__(self, conn: ClientConnection, tr: FakeTransport) -> None:
        self.conn = conn
        self.tr = tr

    def send(self, *pieces: bytes) -> None:
        for p in pieces:
            self.conn.data_received(p)


class Proxy:
    """A real ServerState with a FakePool, real Metrics, slots, partner gate and an access log on a pipe."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: Config) -> None:
        self.loop = loop
        self.metrics = Metrics()
        self.pool = FakePool(loop, cfg.upstream)
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self.log = AccessLog(loop, self._w)
        self.slots = ConnectionSlots(100, self.metrics)
        self.state = ServerState(loop, cfg, None, self.metrics, self.pool, self.log,  # type: ignore[arg-type]
                                 Lingerer(loop), Partners(time.monotonic_ns, time.time), self.slots)
        self.clients: list[Client] = []
        self._lines: list[dict[str, Any]] = []

    def connect(self, tls: str = "TLSv1.3", peer: Peer | None = None) -> Client:
        conn = ClientConnection(self.state, peer or make_peer(), self.slots.take())
        tr = FakeTransport(self.loop, conn, tls)
        conn.connection_made(tr)  # type: ignore[arg-type]
        client = Client(conn, tr)
        self.clients.append(client)
        return client

    def access(self) -> list[dict[str, Any]]:
        self.log.flush()
        try:
            data = os.read(self._r, 1 << 20)
        except BlockingIOError:
            data = b""
        self._lines += [json.loads(x) for x in data.decode().splitlines()]
        return self._lines

    def upstream_bytes(self) -> bytes:
        return b"".join(up_tr(c).data for c in self.pool.dialled)

    def close(self) -> None:
        self.log.close()
        os.close(self._r)
        os.close(self._w)


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Proxy]]:
    made: list[Proxy] = []
    loop = asyncio.get_running_loop()

    def make(**server: Any) -> Proxy:
        cfg = dataclasses.replace(CFG, server=dataclasses.replace(CFG.server, **server)) if server else CFG
        p = Proxy(loop, cfg)
        made.append(p)
        return p

    yield make
    for p in made:
        for c in p.clients:  # an invariant of every test: nothing is ever written to a transport already ended
            assert c.tr.late == [], c.tr.late
        for conn in p.pool.dialled:
            assert up_tr(conn).late == []
        p.close()


@pytest.fixture
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy()


async def settle() -> None:
    """Let the loop run what the connection scheduled (the dial task, connection_lost of an ended transport)."""
    for _ in range(4):
        await asyncio.sleep(0)


# ---- reading what the client got ------------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, head: bytes, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.head = head
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, values
        return values[0] if values else None

    def json(self) -> dict[str, Any]:
        assert self.header("content-type") == "application/json"
        return json.loads(self.body)


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """An independent strict reading of a chunked body: (body, bytes after it).  Fails on incomplete framing."""
    body = b""
    while True:
        line, sep, data = data.partition(b"\r\n")
        assert sep and line, "incomplete chunked framing"
        size = int(line, 16)
        if size == 0:
            assert data.startswith(b"\r\n"), "trailers or incomplete last chunk"
            return body, data[2:]
        assert data[size:size + 2] == b"\r\n", "chunk data not followed by CRLF"
        body += data[:size]
        data = data[size + 2:]


def responses(data: bytes, close_delimited: bool = False) -> list[Response]:
    """Every complete response in ``data`` (all of it must be consumed)."""
    out: list[Response] = []
    while data:
        end = data.index(b"\r\n\r\n") + 4
        head, data = data[:end], data[end:]
        lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        assert lines[0].startswith("HTTP/1.1 ")
        headers = [(k.lower(), v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:])]
        r = Response(status, head, headers, b"")
        if status == 100:
            out.append(r)
            continue
        if r.header("transfer-encoding") == "chunked":
            r.body, data = dechunk(data)
        elif r.header("content-length") is not None:
            n = int(r.header("content-length") or 0)
            assert len(data) >= n, "incomplete body"
            r.body, data = data[:n], data[n:]
        else:
            assert close_delimited, "a response without framing"
            r.body, data = data, b""
        out.append(r)
    return out


def one(data: bytes, close_delimited: bool = False) -> Response:
    (r,) = responses(data, close_delimited)
    return r


def assert_closed_gracefully(c: Client) -> None:
    assert c.tr.closed and not c.tr.aborted


def assert_open(c: Client) -> None:
    assert not c.tr.is_closing()


async def exchange(p: Proxy, c: Client, request: bytes, response: bytes = ok()) -> Response:
    """One request through an upstream connection (the pooled one, or the next dialled) and its answer."""
    before = len(c.tr.chunks)
    c.send(request)
    await settle()
    conn = p.pool.dialled[-1]
    conn.data_received(response)
    return one(b"".join(c.tr.chunks[before:]))


# ---- forwarding ------------------------------------------------------------------------------------------------


async def test_get_is_forwarded_with_the_identity_block_and_the_answer_relayed_byte_exact(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(b"GET /orders/1?b=2&a=1 HTTP/1.1\r\nHost: proxy.test\r\nAccept: */*\r\nX-Trace: t1\r\n\r\n")
    assert proxy.pool.dialled == []  # the dial is a task: nothing is sent before the loop runs it
    await settle()
    (conn,) = proxy.pool.dialled
    # The client's Host is replaced by the API's; its other lines pass byte-exact; the target gets the base path.
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1?b=2&a=1 HTTP/1.1", b"Accept: */*\r\nX-Trace: t1\r\n")
    assert b"Host: api.test\r\nX-Client-Cert-Subject: CN=client-a,O=partner\r\n" in BLOCK
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
    assert c.tr.data == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    assert_open(c)
    (line,) = proxy.access()
    assert (line["status"], line["rule"], line["method"], line["path"], line["error"]) == \
        (200, "orders", "GET", "/orders/1?b=2&a=1", None)
    assert proxy.pool.idle_count == 1  # a complete keep-alive response: the upstream connection is pooled


@pytest.mark.parametrize("spoof", [
    b"X-Client-Cert-Subject: CN=admin\r\n",
    b"x-client-cert-fingerprint: 00\r\n",
    b"X_Client_Cert_Subject: CN=admin\r\n",  # the underscore twin some servers read as the same header
    b"X-Forwarded-For: 6.6.6.6\r\n",
    b"X-Forwarded-Client-Cert: Hash=00\r\n",
    b"Forwarded: for=6.6.6.6\r\n",
    b"X-Real-IP: 6.6.6.6\r\n",
    b"x-apigw-api-id: other-api\r\n",
    b"Client-Cert: :AAAA:\r\n",
    b"X-Client-Cert-Thumbprint: spoofed\r\n",
], ids=lambda s: s.split(b":")[0].decode())
async def test_client_sent_identity_headers_are_stripped_before_the_proxys_own(proxy: Proxy, spoof: bytes) -> None:
    c = proxy.connect()
    c.send(get(extra=b"X-Keep: 1\r\n" + spoof + b"X-Keep: 2\r\n"))
    await settle()
    # Exactly the proxy's block and the client's other lines: no copy of the spoofed line, in any spelling.
    assert proxy.upstream_bytes() == forwarded(b"GET /prod/orders/1 HTTP/1.1", b"X-Keep: 1\r\nX-Keep: 2\r\n")


async def test_hop_by_hop_request_headers_and_those_named_in_connection_are_not_forwarded(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(extra=b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
                     b"Upgrade: h2c\r\nProxy-Authorization: Basic x\r\nX-End: e\r\n"))
    await settle()
    assert proxy.upstream_bytes() == forwarded(b"GET /prod/orders/1 HTTP/1.1", b"X-End: e\r\n")


async def test_dot_segments_are_resolved_before_the_policy_and_the_upstream_gets_the_matched_path(
        proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(b"/orders/../admin"))  # resolves to /admin: no rule allows it
    assert one(c.tr.take()).status == 403
    c.send(get(b"/orders/a/../b?q=1"))
    await settle()
    assert proxy.upstream_bytes() == forwarded(b"GET /prod/orders/b?q=1 HTTP/1.1")


# ---- keep-alive and pipelining ------------------------------------------------------------------------------


async def test_keep_alive_two_requests_in_sequence_share_one_upstream_connection(proxy: Proxy) -> None:
    c = proxy.connect()
    r1 = await exchange(proxy, c, get(b"/orders/1"), ok(b"one"))
    r2 = await exchange(proxy, c, get(b"/orders/2"), ok(b"two"))
    assert (r1.status, r1.body, r2.status, r2.body) == (200, b"one", 200, b"two")
    assert len(proxy.pool.dialled) == 1  # the second request reused the pooled connection
    assert proxy.upstream_bytes() == (forwarded(b"GET /prod/orders/1 HTTP/1.1") +
                                      forwarded(b"GET /prod/orders/2 HTTP/1.1"))
    assert_open(c)
    assert [x["path"] for x in proxy.access()] == ["/orders/1", "/orders/2"]


async def test_pipelined_requests_in_one_read_are_answered_in_order_one_at_a_time(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(b"/orders/1") + get(b"/orders/2") + get(b"/orders/3"))
    await settle()
    (conn,) = proxy.pool.dialled
    # Only the first goes upstream; the others wait in the buffer until its exchange ends.
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1 HTTP/1.1")
    assert c.tr.data == b""
    conn.data_received(ok(b"one"))
    assert up_tr(conn).data.endswith(forwarded(b"GET /prod/orders/2 HTTP/1.1"))  # the pooled connection, at once
    conn.data_received(ok(b"two"))
    conn.data_received(ok(b"three"))
    assert [r.body for r in responses(c.tr.data)] == [b"one", b"two", b"three"]
    assert len(proxy.pool.dialled) == 1
    assert_open(c)


async def test_a_head_split_across_reads_is_assembled(proxy: Proxy) -> None:
    c = proxy.connect()
    request = get(b"/orders/9", b"X-A: a\r\n")
    c.send(*(request[i:i + 1] for i in range(len(request))))
    await settle()
    assert proxy.upstream_bytes() == forwarded(b"GET /prod/orders/9 HTTP/1.1", b"X-A: a\r\n")


# ---- refusals ----------------------------------------------------------------------------------------------------


async def test_request_refused_by_policy_is_a_403_json_and_nothing_goes_upstream(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(b"/admin") + get(b"/orders/1"))  # a refused request, and an allowed one pipelined behind it
    r = one(c.tr.take())
    assert r.status == 403
    assert r.json() == {"error": "forbidden", "message": "GET /admin is not allowed for this client certificate",
                        "reason": "path_not_allowed", "subject": IDENT.subject, "fingerprint": IDENT.fingerprint}
    assert r.header("connection") is None  # a refused GET keeps the connection
    assert proxy.metrics.denied["path_not_allowed"] == 1
    await settle()
    # The pipelined allowed request is the only thing that ever reached the upstream.
    assert proxy.upstream_bytes() == forwarded(b"GET /prod/orders/1 HTTP/1.1")
    assert_open(c)
    assert proxy.access()[0]["status"] == 403 and proxy.access()[0]["error"] == "forbidden"


async def test_refused_request_with_a_body_is_answered_and_the_connection_closed(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(b"POST /admin HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody")
    r = one(c.tr.take())
    assert (r.status, r.header("connection")) == (403, "close")
    assert_closed_gracefully(c)
    await settle()
    assert proxy.pool.dialled == []


H = b"Host: x\r\n"
MALFORMED = {
    "bare-lf": b"GET /orders/1 HTTP/1.1\nHost: x\n\n",
    "bare-lf-in-header": b"GET /orders/1 HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
    "cl-and-te": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n",
    "te-and-cl": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
                 b"0\r\n\r\n",
    "duplicate-cl": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "cl-not-a-number": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
    "obs-fold": b"GET /orders/1 HTTP/1.1\r\n" + H + b"X-A: b\r\n  c\r\n\r\n",
    "space-before-colon": b"GET /orders/1 HTTP/1.1\r\nHost : x\r\n\r\n",
    "bad-chunk-size": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3g\r\nabc\r\n0\r\n\r\n",
    "chunk-size-bare-lf": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "bad-chunk-extension": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                           b"3;=x\r\nabc\r\n0\r\n\r\n",
    "chunk-data-too-long": b"POST /orders/1 HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
                           b"3\r\nabcd\r\n0\r\n\r\n",
    "missing-host": b"GET /orders/1 HTTP/1.1\r\n\r\n",
    "absolute-form": b"GET https://api.test/orders/1 HTTP/1.1\r\n" + H + b"\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_framing_is_400_the_connection_closed_and_nothing_sent_upstream(
        proxy: Proxy, data: bytes) -> None:
    c = proxy.connect()
    c.send(data)  # (a bare LF in an unfinished head is refused at once, not buffered until a blank line)
    r = one(c.tr.take())
    assert (r.status, r.json()["error"], r.header("connection")) == (400, "bad_request", "close")
    assert_closed_gracefully(c)
    c.send(get(b"/orders/2"))  # whatever follows can never be trusted as a next request
    assert c.tr.data == b""
    assert c.tr.lingered  # read what the client still sends, so the close is no reset destroying the answer
    await settle()
    assert proxy.pool.dialled == []
    assert [x["status"] for x in proxy.access()] == [400]


async def test_bad_chunk_later_in_a_streamed_body_aborts_the_upstream_request(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await settle()
    (conn,) = proxy.pool.dialled
    assert up_tr(conn).data == forwarded(b"POST /prod/orders/1 HTTP/1.1", chunked=True) + b"5\r\nhello\r\n"
    c.send(b"zz\r\n")
    r = one(c.tr.take())
    assert (r.status, r.header("connection")) == (400, "close")
    assert up_tr(conn).aborted  # the half-sent upstream request is cut, never completed with a last chunk
    assert not up_tr(conn).data.endswith(b"0\r\n\r\n")
    assert proxy.pool.idle_count == 0
    (line,) = proxy.access()
    assert line["upstream_aborted"] is True


async def test_chunked_body_over_max_body_bytes_is_413_by_its_declared_size(make_proxy: Callable[..., Proxy]) -> None:
    p = make_proxy(max_body_bytes=1000)
    c = p.connect()
    c.send(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n" + b"a" * 512 + b"\r\n")
    await settle()
    (conn,) = p.pool.dialled
    c.send(b"3e9\r\n")  # 512 + 1001: over the limit before any of its data arrives
    r = one(c.tr.take())
    assert (r.status, r.json()["error"], r.header("connection")) == (413, "payload_too_large", "close")
    assert up_tr(conn).aborted and not up_tr(conn).data.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("complete", [True, False], ids=["complete", "unfinished"])
async def test_oversize_head_is_431(proxy: Proxy, complete: bool) -> None:
    c = proxy.connect()
    head = b"GET /orders/1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * http1.MAX_HEAD
    c.send(head[:1000], head[1000:] + (b"\r\n\r\n" if complete else b""))
    r = one(c.tr.take())
    assert (r.status, r.json()["error"], r.header("connection")) == (431, "headers_too_large", "close")
    assert_closed_gracefully(c)
    await settle()
    assert proxy.pool.dialled == []


async def test_head_pushed_over_the_gateway_limit_by_the_identity_block_is_431_identity_too_large(
        proxy: Proxy) -> None:
    c = proxy.connect()
    fits = GATEWAY_HEAD_LIMIT - len(forwarded(b"GET /prod/orders/1 HTTP/1.1", b"X-Pad: \r\n"))
    c.send(get(extra=b"X-Pad: " + b"p" * (fits + 1) + b"\r\n"))  # one byte over, with the block counted
    r = one(c.tr.take())
    assert (r.status, r.json()["error"], r.header("connection")) == (431, "identity_too_large", None)
    assert_open(c)
    c.send(get(extra=b"X-Pad: " + b"p" * fits + b"\r\n"))  # exactly at the limit: forwarded
    await settle()
    assert len(proxy.upstream_bytes()) == GATEWAY_HEAD_LIMIT


async def test_content_length_over_max_body_bytes_is_413_before_anything_is_sent(
        make_proxy: Callable[..., Proxy]) -> None:
    p = make_proxy(max_body_bytes=1000)
    c = p.connect()
    c.send(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n")
    data = c.tr.take()
    assert not data.startswith(CONTINUE)  # never invite a body that will be refused
    r = one(data)
    assert (r.status, r.json()["error"], r.header("connection")) == (413, "payload_too_large", "close")
    await settle()
    assert p.pool.dialled == []


async def test_rate_limited_request_is_429_with_retry_after(proxy: Proxy) -> None:
    c = proxy.connect()
    r1 = await exchange(proxy, c, get(b"/limited"))
    c.tr.take()
    c.send(get(b"/limited"))
    r2 = one(c.tr.take())
    assert r1.status == 200
    assert (r2.status, r2.json()["reason"], r2.header("connection")) == (429, "rate_limited", None)
    assert int(r2.header("retry-after") or 0) >= 1
    assert proxy.metrics.denied["rate_limited"] == 1
    assert len(proxy.upstream_bytes().split(b"GET ")) == 2  # only the first went upstream


# ---- request bodies ---------------------------------------------------------------------------------------------


async def test_chunked_body_is_decoded_strictly_and_forwarded_reframed_with_the_same_bytes(proxy: Proxy) -> None:
    c = proxy.connect()
    body = bytes(range(256)) * 3
    wire = (b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"100;ext=\"v\"\r\n" + body[:256] + b"\r\n" + b"200\r\n" + body[256:] + b"\r\n0\r\nX-Trailer: t\r\n\r\n")
    c.send(*(wire[i:i + 7] for i in range(0, len(wire), 7)))  # framing split everywhere, in 7-byte reads
    await settle()
    (conn,) = proxy.pool.dialled
    head = forwarded(b"POST /prod/orders/1 HTTP/1.1", chunked=True)
    sent = up_tr(conn).data
    assert sent.startswith(head)
    got, after = dechunk(sent[len(head):])
    assert (got, after) == (body, b"")
    assert b"ext" not in sent and b"X-Trailer" not in sent  # extensions and trailers are not forwarded
    conn.data_received(ok(b"done"))
    assert one(c.tr.data).body == b"done"
    assert proxy.access()[0]["bytes_in"] == len(body)


async def test_content_length_body_split_across_many_reads_is_forwarded_byte_exact(proxy: Proxy) -> None:
    c = proxy.connect()
    body = os.urandom(3000)
    c.send(b"PUT /orders/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n" + body[:10])
    for i in range(10, 2000, 97):  # part of the body arrives while the dial is in progress ...
        c.send(body[i:min(i + 97, 2000)])
    await settle()
    (conn,) = proxy.pool.dialled
    for i in range(2000, 2999, 13):  # ... and part after it
        c.send(body[i:min(i + 13, 2999)])
    c.send(body[2999:] + get(b"/orders/next"))  # the bytes after the body are the next request, not more body
    assert up_tr(conn).data == forwarded(b"PUT /prod/orders/1 HTTP/1.1", b"Content-Length: 3000\r\n") + body
    conn.data_received(ok(b"stored"))
    assert up_tr(conn).data.endswith(forwarded(b"GET /prod/orders/next HTTP/1.1"))


@pytest.mark.parametrize("dialled", [True, False], ids=["after-dial", "during-dial"])
async def test_client_eof_mid_body_never_lets_the_upstream_take_the_request_as_complete(
        proxy: Proxy, dialled: bool) -> None:
    c = proxy.connect()
    c.send(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)
    if dialled:
        await settle()
    assert c.conn.eof_received() is True  # TLS 1.3 close_notify: the client still reads
    r = one(c.tr.take())
    assert (r.status, r.header("connection")) == (400, "close")
    assert_closed_gracefully(c)
    await settle()
    if dialled:
        (conn,) = proxy.pool.dialled
        assert up_tr(conn).aborted  # 40 of 100 bytes went up; the connection is reset, never reused
        assert proxy.pool.idle_count == 0
    else:
        assert proxy.pool.dialled == []  # the dial is cancelled: nothing of the request ever went up
    (line,) = proxy.access()
    assert (line["status"], line["bytes_in"], line.get("upstream_aborted")) == (400, 40, True if dialled else None)


async def test_client_reset_mid_body_closes_the_upstream_connection_and_logs_499(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 40)
    await settle()
    (conn,) = proxy.pool.dialled
    c.conn.connection_lost(ConnectionResetError())
    assert up_tr(conn).aborted
    await settle()
    assert proxy.pool.idle_count == 0
    (line,) = proxy.access()
    assert (line["status"], line["error"], line["upstream_aborted"]) == (499, "client_closed", True)


async def test_tls13_close_notify_after_a_complete_request_is_answered_then_closed(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(b"/orders/1") + get(b"/orders/2"))
    await settle()
    assert c.conn.eof_received() is True
    (conn,) = proxy.pool.dialled
    conn.data_received(ok())
    r = one(c.tr.data)
    assert (r.status, r.header("connection")) == (200, "close")
    assert_closed_gracefully(c)
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1 HTTP/1.1")  # the pipelined one is not started


async def test_tls12_close_notify_ends_the_connection_at_once(proxy: Proxy) -> None:
    c = proxy.connect(tls="TLSv1.2")
    c.send(get(b"/orders/1"))
    await settle()
    assert c.conn.eof_received() is False  # the transport closes; RFC 5246 allows no half-close


# ---- Connection: close, HTTP/1.0, Expect ---------------------------------------------------------------------


async def test_connection_close_is_honoured_and_nothing_after_it_is_read(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(b"/orders/1", b"Connection: close\r\n") + get(b"/orders/2"))
    await settle()
    (conn,) = proxy.pool.dialled
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1 HTTP/1.1")  # Connection itself is hop-by-hop
    conn.data_received(ok())
    r = one(c.tr.data)
    assert (r.status, r.header("connection")) == (200, "close")
    assert_closed_gracefully(c)
    await settle()
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1 HTTP/1.1")
    assert proxy.pool.idle_count == 1  # the upstream connection is fine: pooled


async def test_http10_without_keep_alive_is_forwarded_as_http11_and_closed_after_the_answer(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(b"GET /orders/1 HTTP/1.0\r\n\r\n")  # no Host needed in HTTP/1.0
    await settle()
    (conn,) = proxy.pool.dialled
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1 HTTP/1.1")
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    r = one(c.tr.data, close_delimited=True)
    # An HTTP/1.0 client cannot read chunked: the body is close-delimited.
    assert (r.status, r.header("transfer-encoding"), r.header("connection"), r.body) == (200, None, "close", b"hello")
    assert_closed_gracefully(c)


async def test_http10_keep_alive_is_answered_with_connection_keep_alive(proxy: Proxy) -> None:
    c = proxy.connect()
    for i in range(2):
        r = await exchange(proxy, c, b"GET /orders/%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i, ok(b"%d" % i))
        assert (r.status, r.header("connection"), r.body) == (200, "keep-alive", b"%d" % i)
    assert_open(c)
    assert len(proxy.pool.dialled) == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_expect_100_continue_gets_the_interim_answer_and_is_not_forwarded(proxy: Proxy, framing: str) -> None:
    c = proxy.connect()
    if framing == "chunked":
        head, body = b"Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"
    else:
        head, body = b"Content-Length: 5\r\n", b"hello"
    c.send(b"POST /orders/1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n" + head + b"\r\n")
    assert c.tr.take() == CONTINUE
    c.send(body)
    await settle()
    sent = proxy.upstream_bytes()
    assert b"expect" not in sent.lower()
    assert sent.startswith(b"POST /prod/orders/1 HTTP/1.1\r\n") and sent.endswith(body)
    proxy.pool.dialled[0].data_received(ok())
    assert one(c.tr.data).status == 200


# ---- upstream failures --------------------------------------------------------------------------------------


async def test_upstream_that_cannot_be_reached_is_502_and_counted(proxy: Proxy) -> None:
    proxy.pool.fail = UpstreamConnectError("cannot connect to api.test:443: Connection refused")
    c = proxy.connect()
    c.send(get(b"/orders/1"))
    await settle()
    r = one(c.tr.take())
    assert (r.status, r.json()["error"], r.header("connection")) == (502, "upstream_unreachable", None)
    assert proxy.metrics.upstream_errors["connect"] == 1
    assert_open(c)  # a complete GET: the connection stays usable
    proxy.pool.fail = None
    assert (await exchange(proxy, c, get(b"/orders/2"))).status == 200


async def test_bad_upstream_response_head_is_502(proxy: Proxy) -> None:
    c = proxy.connect()
    r = await exchange(proxy, c, get(), b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert (r.status, r.json()["error"]) == (502, "upstream_bad_response")
    assert proxy.metrics.upstream_errors["protocol"] == 1
    assert up_tr(proxy.pool.dialled[0]).aborted


async def test_upstream_lost_mid_response_resets_the_client_so_the_body_never_looks_complete(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get())
    await settle()
    (conn,) = proxy.pool.dialled
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    assert c.tr.data.startswith(b"HTTP/1.1 200 OK\r\n") and c.tr.data.endswith(b"5\r\nhello\r\n")
    conn.connection_lost(ConnectionResetError())
    assert c.tr.aborted and not c.tr.closed
    assert not c.tr.data.endswith(b"0\r\n\r\n")  # no last chunk: the client sees a cut, not a short body
    assert proxy.metrics.upstream_errors["closed"] == 1


async def test_stale_pooled_connection_get_is_retried_once_on_a_new_one(proxy: Proxy) -> None:
    c = proxy.connect()
    await exchange(proxy, c, get(b"/orders/1"))
    c.send(get(b"/orders/2"))
    first = proxy.pool.dialled[0]
    first.connection_lost(None)  # the upstream had closed it: nothing came back
    await settle()
    assert len(proxy.pool.dialled) == 2
    second = proxy.pool.dialled[1]
    assert up_tr(second).data == forwarded(b"GET /prod/orders/2 HTTP/1.1")
    second.data_received(ok(b"again"))
    assert responses(c.tr.data)[-1].body == b"again"


# ---- shared state: counters, drain ------------------------------------------------------------------------------


async def test_connection_counters_and_request_metrics_move_with_the_connection(proxy: Proxy) -> None:
    state = proxy.state
    c = proxy.connect()
    assert state.connections == {c.conn} and proxy.metrics.connections_active == 1
    c2 = proxy.connect()
    assert len(state.connections) == 2 and proxy.metrics.connections_active == 2
    await exchange(proxy, c, get(b"/orders/1"))
    c.send(get(b"/admin"))
    await exchange(proxy, c, get(b"/orders/2", b"Connection: close\r\n"))
    assert proxy.metrics.requests == {("GET", "200", "orders"): 2, ("GET", "403", ""): 1}
    assert proxy.metrics.request_duration.count == 3 and proxy.metrics.upstream_duration.count == 2
    assert c.conn in state.connections  # closed, but the transport has not reported connection_lost yet
    await settle()
    assert state.connections == {c2.conn} and proxy.metrics.connections_active == 1
    assert c.conn.slot is not None and not c.conn.slot.held
    c2.conn.connection_lost(None)
    c2.conn.connection_lost(None)  # a second report must not give a slot back twice
    assert state.connections == set() and proxy.metrics.connections_active == 0


async def test_shutdown_closes_a_keep_alive_connection_after_its_current_response(proxy: Proxy) -> None:
    c = proxy.connect()
    c.send(get(b"/orders/1") + get(b"/orders/2"))
    await settle()
    for live in list(proxy.state.connections):  # what a drain does (after setting draining, tested below)
        live.shutdown()
    assert_open(c)  # the exchange in flight finishes
    (conn,) = proxy.pool.dialled
    conn.data_received(ok())
    r = one(c.tr.data)
    assert (r.status, r.header("connection")) == (200, "close")
    assert_closed_gracefully(c)
    assert up_tr(conn).data == forwarded(b"GET /prod/orders/1 HTTP/1.1")  # the pipelined one is never started


async def test_draining_closes_an_idle_connection_at_once_and_a_new_request_gets_connection_close(
        proxy: Proxy) -> None:
    idle = proxy.connect()
    await exchange(proxy, idle, get(b"/orders/1"))
    fresh = proxy.connect()
    proxy.state.draining = True
    idle.conn.shutdown()
    assert_closed_gracefully(idle)
    r = await exchange(proxy, fresh, get(b"/orders/2"))  # a connection the drain has not reached yet
    assert (r.status, r.header("connection")) == (200, "close")
    assert_closed_gracefully(fresh)
