"""forward: the UpstreamPool against real TLS upstreams (tests.harness.ScriptedUpstream and plain sockets).

Dialling and verification (the URL's host name, even when dialling ``connect_to``), the errors a failed connect
becomes, TLS session reuse, and the idle pool: LIFO reuse, the ``pool_max_idle`` bound, the idle timeout, and
never handing out a connection the upstream closed while it was idle.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from proxy import tls
from proxy.config import Address, PemSource, UpstreamConfig
from proxy.errors import ProxyError, UpstreamConnectError, UpstreamTLSError
from proxy.upstream import UpstreamConnection, UpstreamPool
from proxy.wire.http1 import ResponseHead
from tests.harness import Handler, ScriptedUpstream, read_request
from tests.pki import Pki, UpstreamKind

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def upstream_cfg(pki: Pki, port: int, **changes: Any) -> UpstreamConfig:
    values: dict[str, Any] = {"url": "https://api.test/prod", "scheme": "https", "host": "api.test", "port": 443,
                              "base_path": "/prod", "connect_to": Address("127.0.0.1", port),
                              "ca_bundle": PemSource(pki.upstream_ca), "connect_timeout": 5.0, "read_timeout": 5.0}
    values.update(changes)
    return UpstreamConfig(**values)


def make_pool(pki: Pki, port: int, **changes: Any) -> UpstreamPool:
    cfg = upstream_cfg(pki, port, **changes)
    return UpstreamPool(asyncio.get_running_loop(), cfg, tls.build_upstream_context(cfg))


@dataclass
class _Presenting:
    """Stands in for ``Pki`` inside ScriptedUpstream: the server presents the ``which`` certificate."""

    pki: Pki
    which: UpstreamKind

    def upstream_server_context(self) -> ssl.SSLContext:
        return self.pki.upstream_server_context(self.which)


async def serve_requests(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A keep-alive origin: answers every request with 200 "ok" until the proxy side closes."""
    while True:
        try:
            await read_request(reader)
        except asyncio.IncompleteReadError:
            return
        writer.write(OK)
        await writer.drain()


Start = Callable[..., Awaitable[ScriptedUpstream]]


@pytest.fixture
async def upstream(pki: Pki) -> AsyncIterator[Start]:
    started: list[ScriptedUpstream] = []

    async def start(handler: Handler = serve_requests, which: UpstreamKind = "good") -> ScriptedUpstream:
        source: Any = pki if which == "good" else _Presenting(pki, which)
        up = await ScriptedUpstream(source, handler).start()
        started.append(up)
        return up

    yield start
    for up in started:
        await up.stop()


@pytest.fixture
async def pools() -> AsyncIterator[list[UpstreamPool]]:
    """Pools a test makes are closed at teardown (their connections aborted)."""
    made: list[UpstreamPool] = []
    yield made
    for pool in made:
        pool.close()
        for conn in list(pool._all):
            conn.close()
    await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes


async def until(probe: Callable[[], object], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not probe():
            await asyncio.sleep(0.01)


class Exchange:
    """The client connection's side of one request (proxy.upstream.Exchange)."""

    def __init__(self) -> None:
        self.done: asyncio.Future[tuple[int, bytes, bool]] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.body = b""

    def on_response_head(self, resp: ResponseHead, has_body: bool) -> None:
        self.status = resp.status

    def on_response_body(self, pieces: list[bytes]) -> None:
        self.body += b"".join(pieces)

    def on_response_end(self, reusable: bool) -> None:
        self.done.set_result((self.status, self.body, reusable))

    def on_response_complete(self, resp: ResponseHead, body: bytes, reusable: bool) -> None:
        self.done.set_result((resp.status, body, reusable))

    def on_upstream_error(self, exc: ProxyError, retryable: bool) -> None:
        self.done.set_exception(exc)

    def on_upstream_writable(self, writable: bool) -> None:
        pass


async def get(conn: UpstreamConnection, path: str = "/") -> tuple[int, bytes, bool]:
    ex = Exchange()
    conn.begin(ex, False, f"GET {path} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
    return await asyncio.wait_for(ex.done, 10)


# ---- connecting -------------------------------------------------------------------------------------------------


async def test_connect_verifies_the_url_host_while_dialling_connect_to(pki: Pki, upstream: Start,
                                                                       pools: list[UpstreamPool]) -> None:
    up = await upstream()
    pool = make_pool(pki, up.port)  # dials 127.0.0.1, verifies "api.test"
    pools.append(pool)
    conn = await pool.connect()
    assert conn.transport is not None
    ssl_object = conn.transport.get_extra_info("ssl_object")
    assert ssl_object.server_hostname == "api.test"
    assert await get(conn) == (200, b"ok", True)


@pytest.mark.parametrize("which, host, message", [
    ("good", "wrong.test", "Hostname mismatch"),  # the certificate names api.test, localhost, 127.0.0.1
    ("wrong_name", "api.test", "Hostname mismatch"),
    ("untrusted", "api.test", "unable to get local issuer certificate"),
])
async def test_wrong_certificate_is_an_upstream_tls_error(pki: Pki, upstream: Start, which: UpstreamKind, host: str,
                                                          message: str) -> None:
    up = await upstream(which=which)
    pool = make_pool(pki, up.port, host=host)
    with pytest.raises(UpstreamTLSError) as info:
        await pool.connect()
    assert message in str(info.value)
    assert info.value.kind == "tls" and info.value.status == 502


async def test_peer_that_does_not_speak_tls_is_an_upstream_tls_error(pki: Pki) -> None:
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setblocking(False)

        async def answer_in_plain_http() -> None:
            conn, _ = await loop.sock_accept(lsock)
            with conn:
                await loop.sock_recv(conn, 65536)  # the ClientHello
                await loop.sock_sendall(conn, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        server = asyncio.ensure_future(answer_in_plain_http())
        pool = make_pool(pki, lsock.getsockname()[1])
        with pytest.raises(UpstreamTLSError):
            await pool.connect()
        await server


async def test_refused_is_an_upstream_connect_error(pki: Pki) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        pool = make_pool(pki, port)
        with pytest.raises(UpstreamConnectError) as info:
            await pool.connect()
    assert f"127.0.0.1:{port}" in str(info.value) and info.value.kind == "connect"


async def test_connect_timeout_is_an_upstream_connect_error(pki: Pki) -> None:
    """The TCP connect succeeds (the kernel's backlog) but nobody ever answers the ClientHello."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        pool = make_pool(pki, silent.getsockname()[1], connect_timeout=0.2)
        with pytest.raises(UpstreamConnectError) as info:
            await pool.connect()
    assert "timed out" in str(info.value)


async def test_unresolvable_name_is_an_upstream_connect_error(pki: Pki) -> None:
    pool = make_pool(pki, 443, connect_to=Address("no-such-host.invalid", 443))
    with pytest.raises(UpstreamConnectError):
        await pool.connect()


async def test_new_connections_resume_the_tls_session(pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    up = await upstream()
    pool = make_pool(pki, up.port)
    pools.append(pool)
    first = await pool.connect()
    assert await get(first) == (200, b"ok", True)  # TLS 1.3: the ticket arrives after the handshake
    assert first.transport is not None
    assert not first.transport.get_extra_info("ssl_object").session_reused
    pool.release(first)
    second = await pool.connect()
    assert second.transport is not None
    assert second.transport.get_extra_info("ssl_object").session_reused
    assert await get(second) == (200, b"ok", True)


async def test_dial_address_is_resolved_again_after_its_ttl(pki: Pki, upstream: Start, pools: list[UpstreamPool],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """connect_to names a VPC endpoint whose DNS answers change: new connections must not use a stale answer."""
    import proxy.upstream as forward

    up = await upstream()
    pool = make_pool(pki, up.port, connect_to=Address("localhost", up.port))
    pools.append(pool)
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real = loop.getaddrinfo

    async def counting(host: str, *args: Any, **kw: Any) -> Any:
        lookups.append(host)
        return await real(host, *args, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    for _ in range(2):
        (await pool.connect()).close()
    assert lookups == ["localhost"]  # within the TTL: one lookup serves both dials
    monkeypatch.setattr(forward, "ADDRESS_TTL", 0.0)
    await asyncio.sleep(0.01)
    (await pool.connect()).close()
    assert lookups == ["localhost", "localhost"]


# ---- the idle pool ----------------------------------------------------------------------------------------------


async def test_release_and_acquire_are_lifo(pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    up = await upstream()
    pool = make_pool(pki, up.port)
    pools.append(pool)
    assert pool.acquire_idle() is None
    a, b, c = [await pool.connect() for _ in range(3)]
    assert not any(x.reused for x in (a, b, c))
    for conn in (a, b, c):
        pool.release(conn)
    assert pool.idle_count == 3
    # the most recently used first: its TCP window and the upstream's keep-alive timer are the freshest
    assert [pool.acquire_idle() for _ in range(3)] == [c, b, a]
    assert pool.acquire_idle() is None and pool.idle_count == 0
    assert a.reused and b.reused and c.reused
    assert await get(a) == (200, b"ok", True)  # a reused connection works
    assert up.connections == 3


async def test_pool_max_idle_bounds_the_idle_connections(pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    up = await upstream()
    pool = make_pool(pki, up.port, pool_max_idle=2)
    pools.append(pool)
    conns = [await pool.connect() for _ in range(3)]
    for conn in conns:
        pool.release(conn)
    assert pool.idle_count == 2
    await until(lambda: conns[2].closed)  # the one over the bound is closed, not kept
    assert [pool.acquire_idle(), pool.acquire_idle(), pool.acquire_idle()] == [conns[1], conns[0], None]


async def test_idle_timeout_closes_pooled_connections(pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    ends: list[bytes] = []

    async def record_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ends.append(await reader.read())  # b"": the proxy side went away
        except (ConnectionError, ssl.SSLError):
            ends.append(b"reset")

    up = await upstream(record_end)
    pool = make_pool(pki, up.port, pool_idle_timeout=0.1)
    pools.append(pool)
    conn = await pool.connect()
    pool.release(conn)
    assert pool.idle_count == 1
    await until(lambda: conn.closed and pool.idle_count == 0)
    assert pool.acquire_idle() is None
    await until(lambda: ends)  # the upstream saw the connection end


async def test_reused_connection_gets_a_fresh_idle_timer(pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    up = await upstream()
    pool = make_pool(pki, up.port, pool_idle_timeout=0.2)
    pools.append(pool)
    conn = await pool.connect()
    pool.release(conn)
    assert pool.acquire_idle() is conn
    assert await get(conn) == (200, b"ok", True)  # the exchange replaced the idle deadline with read_timeout
    await asyncio.sleep(0.4)  # longer than the idle timeout: a busy connection must not be closed by it
    assert not conn.closed
    assert await get(conn) == (200, b"ok", True)


@pytest.mark.parametrize("how", ["close_notify", "fin", "reset", "unsolicited_bytes"])
async def test_connection_closed_by_the_upstream_while_idle_is_never_handed_out(
        pki: Pki, upstream: Start, pools: list[UpstreamPool], how: str) -> None:
    closing = asyncio.Event()

    async def end_when_told(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await closing.wait()
        if how == "close_notify":
            writer.close()
            await writer.wait_closed()
        elif how == "fin":
            sock = writer.get_extra_info("socket")
            sock.shutdown(socket.SHUT_WR)  # TCP FIN without close_notify
            await reader.read()
        elif how == "reset":
            writer.transport.abort()
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")  # nobody asked: never trust it again
            await writer.drain()
            await reader.read()

    up = await upstream(end_when_told)
    pool = make_pool(pki, up.port)
    pools.append(pool)
    keep = await pool.connect()
    gone = await pool.connect()
    pool.release(keep)
    pool.release(gone)
    closing.set()
    await until(lambda: gone.closed and keep.closed)  # both handlers act on the same event
    assert pool.idle_count == 0 and pool.acquire_idle() is None


async def test_closing_connection_is_not_handed_out_before_connection_lost(
        pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    """The read callback that sees the upstream's close ends the transport at once, but ``connection_lost`` (which
    marks the connection closed) runs one loop turn later; a request in between must not get that connection."""
    up = await upstream()
    pool = make_pool(pki, up.port)
    pools.append(pool)
    older, newer = await pool.connect(), await pool.connect()
    pool.release(older)
    pool.release(newer)
    assert newer.transport is not None
    newer.transport.close()  # what _eof() does on the upstream's close_notify (or _fatal on a reset)
    assert pool.acquire_idle() is older
    assert pool.acquire_idle() is None


async def test_closed_pool_keeps_nothing(pki: Pki, upstream: Start, pools: list[UpstreamPool]) -> None:
    up = await upstream()
    pool = make_pool(pki, up.port)
    pools.append(pool)
    idle, busy = await pool.connect(), await pool.connect()
    pool.release(idle)
    pool.close()
    await until(lambda: idle.closed)
    pool.release(busy)  # a connection that finishes its exchange after the pool closed
    await until(lambda: busy.closed)
    assert pool.idle_count == 0 and pool.acquire_idle() is None
