"""Connection limits and timeouts against slow or greedy clients.

Owns: ``max_connections`` (the next connection is reset at once and counted; the ones inside keep working; a
freed slot is reusable), the slowloris classes (idle TCP, half a ClientHello, request headers trickled one byte
at a time) each closed after its configured timeout while a normal client is served meanwhile, and the
keep-alive idle timeout.

The in-process proxy: limits live in the listener and the connection, the process adds nothing.  Timeouts are
configured short; each test bounds how long a close may take with a generous margin and never asserts a
duration otherwise.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import pytest

from tests.e2e.kit import InProcess, MemTLSClient, Ops, eventually, scrape
from tests.harness import RawClient, client_ctx, get

MARGIN = 10.0  # seconds a close may take beyond its configured timeout on a busy machine
BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])  # production runs on uvloop


async def metric(ip: InProcess, name: str, **labels: str) -> float:
    return (await scrape(ip.admin_addr)).get(name, **labels)


async def request_on_new_connection(ip: InProcess, ops: Ops) -> int:
    c = await ops.client(ip.port)
    try:
        return (await c.request(get("/normal", extra=b"Connection: close\r\n"))).status
    finally:
        await c.close()


# ---- max_connections -----------------------------------------------------------------------------------------


@BOTH_LOOPS
async def test_connection_beyond_max_connections_is_reset_at_once_and_counted(ops: Ops) -> None:
    # handshake_timeout is long: a close within MARGIN can only be the limit, not a timeout
    ip = await ops.start(ops.config(await ops.upstream(), server={"max_connections": 3, "handshake_timeout": 60.0}))
    inside = [await ops.client(ip.port) for _ in range(3)]
    for c in inside:
        assert (await c.request(get("/in"))).status == 200

    try:
        # The reset can come so soon that even the connect call reports it.
        reader, writer = await asyncio.open_connection("127.0.0.1", ip.port)
        try:
            async with asyncio.timeout(MARGIN):
                data = await reader.read()  # the proxy says nothing and closes
            assert data == b""
        finally:
            writer.close()
    except ConnectionResetError:
        pass  # reset (SO_LINGER 0): what the proxy does
    with pytest.raises((ssl.SSLError, ConnectionError)):  # a TLS client sees the same
        await RawClient.connect(ip.port, client_ctx(ops.pki))

    s = await scrape(ip.admin_addr)
    assert s.get("mtls_proxy_connections_rejected_total") == 2
    assert s.get("mtls_proxy_connections_total") == 5
    assert s.get("mtls_proxy_connections_active") == 3
    for c in inside:  # the connections inside the limit are unaffected
        assert (await c.request(get("/still"))).status == 200

    await inside.pop().close()

    async def slot_free() -> bool:
        return await metric(ip, "mtls_proxy_connections_active") == 2

    await eventually(slot_free)
    assert await request_on_new_connection(ip, ops) == 200
    for c in inside:
        await c.close()


# ---- slowloris -----------------------------------------------------------------------------------------------


@dataclass
class Slow:
    """One slow client; ``closed`` is set when the proxy closed it."""

    name: str
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    status: int | None = None  # the response the proxy wrote before closing, if any


async def idle_tcp(port: int, slow: Slow) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.read()
    except ConnectionResetError:
        pass
    slow.closed.set()
    writer.close()


async def half_client_hello(port: int, ctx: ssl.SSLContext, slow: Slow) -> None:
    c = await MemTLSClient.connect(port, ctx)
    hello = c.client_hello()
    await c.send_raw(hello[: len(hello) // 2])
    try:
        await c.reader.read()
    except ConnectionResetError:
        pass
    slow.closed.set()
    await c.close()


async def trickled_headers(port: int, ctx: ssl.SSLContext, slow: Slow, lead: bytes = b"") -> None:
    """Completes TLS, then sends a never-ending request head one byte every 0.3 s."""
    c = await RawClient.connect(port, ctx)
    head = lead + b"GET /slowloris HTTP/1.1\r\nHost: example.test\r\nX-Pad: " + b"a" * 10_000

    async def trickle() -> None:
        for i in range(len(head)):
            try:
                await c.send(head[i:i + 1])
            except (ConnectionError, ssl.SSLError):
                return
            await asyncio.sleep(0.3)

    sender = asyncio.create_task(trickle())
    try:
        resp = await c.read_response(timeout=60)
        slow.status = resp.status
        await c.closed_by_peer(timeout=MARGIN)
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    slow.closed.set()
    sender.cancel()
    await c.close()


@BOTH_LOOPS
async def test_slowloris_clients_are_closed_after_their_timeouts_and_never_delay_others(ops: Ops) -> None:
    timeouts = {"handshake_timeout": 3.0, "header_timeout": 3.0, "idle_timeout": 60.0}
    ip = await ops.start(ops.config(await ops.upstream(), server={"max_connections": 4, **timeouts}))
    ctx = client_ctx(ops.pki)
    slows = [Slow("idle-tcp"), Slow("half-client-hello"), Slow("trickled-headers")]
    tasks = [asyncio.create_task(idle_tcp(ip.port, slows[0])),
             asyncio.create_task(half_client_hello(ip.port, ctx, slows[1])),
             asyncio.create_task(trickled_headers(ip.port, ctx, slows[2]))]

    async def all_three_in() -> bool:
        return await metric(ip, "mtls_proxy_connections_active") == 3

    await eventually(all_three_in)
    # Three of four slots are held by slow clients: a normal client is served while all three still hang on.
    assert await request_on_new_connection(ip, ops) == 200
    assert [s.name for s in slows if s.closed.is_set()] == []

    await asyncio.wait_for(asyncio.gather(*tasks), 3.0 + MARGIN)
    assert slows[2].status == 408  # the trickler gets a Request Timeout, not silence
    s = await scrape(ip.admin_addr)
    assert s.get("mtls_proxy_tls_handshake_failures_total", reason="timeout") == 2  # idle TCP, half hello
    assert s.get("mtls_proxy_requests_total", method="OTHER", status="408", rule="") == 1  # no request line yet

    async def slots_back() -> bool:
        return await metric(ip, "mtls_proxy_connections_active") == 0

    await eventually(slots_back)
    assert await request_on_new_connection(ip, ops) == 200


async def test_header_timeout_is_not_reset_by_leading_empty_lines(ops: Ops) -> None:
    """RFC 9112 §2.2 lets a client send empty lines before a request; they must not postpone the header timeout."""
    ip = await ops.start(ops.config(await ops.upstream(), server={"header_timeout": 2.0, "idle_timeout": 60.0}))
    slow = Slow("crlf-then-trickle")
    await asyncio.wait_for(trickled_headers(ip.port, client_ctx(ops.pki), slow, lead=b"\r\n"), 2.0 + MARGIN)
    assert slow.closed.is_set()


# ---- keep-alive idle timeout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("after_request", [True, False], ids=["after-a-request", "before-the-first-request"])
async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(ops: Ops, after_request: bool) -> None:
    ip = await ops.start(ops.config(await ops.upstream(), server={"idle_timeout": 1.0}))
    c = await ops.client(ip.port)
    if after_request:
        resp = await c.request(get("/once"))
        assert resp.status == 200 and resp.header("connection") is None  # kept alive
    assert await c.closed_by_peer(timeout=1.0 + MARGIN)
    await c.close()

    async def released() -> bool:
        return await metric(ip, "mtls_proxy_connections_active") == 0

    await eventually(released)
    s = await scrape(ip.admin_addr)
    assert sum(v for k, v in s.series("mtls_proxy_requests_total").items() if ("status", "408") in k) == 0
    assert await request_on_new_connection(ip, ops) == 200
