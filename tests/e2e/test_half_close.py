"""End-to-end: a client that sends its request and then close_notify (a TLS half-close).

Owns what the proxy does with a close_notify that arrives while a request is in flight:
* TLS 1.3 closes only the sender's side (RFC 8446 §6.1): the complete request is answered -- also when the upstream
  answers long after the close_notify -- with ``Connection: close``, then the proxy sends its own close_notify and
  closes.  A request pipelined before the close_notify is not started (nothing after the first exchange is read),
  and a request body cut short by the close_notify is answered 400, its upstream request aborted;
* TLS 1.2 requires the receiver of a close_notify to answer with its own at once and discard pending writes
  (RFC 5246 §7.2.1): the proxy closes at once, the exchange is logged as ``client_closed``.
Either way the slot comes back and nothing waits for a timeout.

The client is Python's ssl on a real socket, in a thread: ``sendall`` the request, then ``unwrap()`` on the
non-blocking socket -- it sends close_notify and returns control at once (waiting for the peer's close_notify
would make OpenSSL discard the response) -- then read until the proxy's close_notify.  OpenSSL lets the server
write after a received close_notify on both versions; the proxy chooses per version, as the RFCs say.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass, field

import pytest

from tests.e2e.kit import InProcess, Ops, eventually, parse_response, scrape
from tests.harness import client_ctx, read_request

BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
TLS13, TLS12 = ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2


@dataclass
class Result:
    data: bytes
    end: str  # "close_notify", "eof" (TCP FIN without close_notify), "reset"


def half_close(port: int, ctx: ssl.SSLContext, request: bytes) -> Result:
    """Send ``request``, then close_notify; read everything until the proxy ends the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    tls = ctx.wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)
    try:
        tls.sendall(request)
        tls.setblocking(False)
        try:
            tls.unwrap()  # first SSL_shutdown: our close_notify goes out; the read side stays open
        except ssl.SSLWantReadError:
            pass
        tls.settimeout(20)
        data = b""
        while True:
            try:
                chunk = tls.recv(65536)
            except ssl.SSLZeroReturnError:  # the proxy's close_notify (after ours, OpenSSL raises rather than b"")
                return Result(data, "close_notify")
            except ssl.SSLEOFError:
                return Result(data, "eof")
            except ConnectionResetError:
                return Result(data, "reset")
            if not chunk:
                return Result(data, "close_notify")
            data += chunk
    finally:
        tls.close()


@dataclass
class Recording:
    """A scripted upstream handler: records each request line; ``/slow`` waits for ``gate``."""

    lines: list[bytes] = field(default_factory=list)
    got_slow: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    ends: list[str] = field(default_factory=list)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await read_request(reader)
                line = head.split(b"\r\n", 1)[0]
                self.lines.append(line)
                if b"/slow" in line:
                    self.got_slow.set()
                    await asyncio.wait_for(self.gate.wait(), 30)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(line), line))
                await writer.drain()
        except asyncio.IncompleteReadError as exc:
            self.ends.append("incomplete" if exc.partial else "eof")
            raise
        except (ConnectionError, ssl.SSLError):
            self.ends.append("reset")
            raise


async def setup(ops: Ops) -> tuple[InProcess, Recording]:
    handler = Recording()
    up = await ops.scripted(handler)
    ip = await ops.start(ops.config(up.port, server={"idle_timeout": 60.0, "header_timeout": 60.0}))
    return ip, handler


async def close_notify_seen(ip: InProcess) -> None:
    """Until the proxy has read the client's close_notify (its one connection is finishing, not reading)."""
    await eventually(lambda: asyncio.sleep(0, any(c.closing for c in ip.server.state.connections)))


async def slot_back(ip: InProcess) -> None:
    async def probe() -> bool:
        return (await scrape(ip.admin_addr)).get("mtls_proxy_connections_active") == 0

    await eventually(probe, timeout=10)


H = b"Host: api.test\r\n"


@BOTH_LOOPS
async def test_tls13_request_then_close_notify_is_answered_then_closed(ops: Ops) -> None:
    ip, up = await setup(ops)
    # The answer waits until the proxy has read the close_notify: the client writes the request and the
    # close_notify separately, and a proxy that answered before reading the second could not know of it.
    client = asyncio.create_task(asyncio.to_thread(half_close, ip.port, client_ctx(ops.pki, tls_max=TLS13),
                                                   b"GET /slow/one HTTP/1.1\r\n" + H + b"\r\n"))
    await asyncio.wait_for(up.got_slow.wait(), 10)
    await close_notify_seen(ip)
    up.gate.set()
    r = await client
    resp = parse_response(r.data)
    assert (resp.status, resp.body, r.end) == (200, b"GET /prod/slow/one HTTP/1.1", "close_notify"), r
    assert resp.header("connection") == "close"
    await slot_back(ip)
    (line,) = ip.access()
    assert (line["status"], line["error"]) == (200, None)


@BOTH_LOOPS
async def test_tls13_close_notify_while_the_upstream_is_still_working(ops: Ops) -> None:
    ip, up = await setup(ops)
    exchange = asyncio.ensure_future(asyncio.to_thread(
        half_close, ip.port, client_ctx(ops.pki, tls_max=TLS13), b"GET /hc/slow HTTP/1.1\r\n" + H + b"\r\n"))
    await asyncio.wait_for(up.got_slow.wait(), 10)
    await close_notify_seen(ip)  # the close_notify is in: the proxy must still be waiting for the answer
    assert not exchange.done() and len(ip.server.state.connections) == 1
    up.gate.set()
    r = await asyncio.wait_for(exchange, 20)
    resp = parse_response(r.data)
    assert (resp.status, resp.body, r.end) == (200, b"GET /prod/hc/slow HTTP/1.1", "close_notify"), r
    await slot_back(ip)


@BOTH_LOOPS
async def test_tls13_nothing_after_the_first_exchange_is_started(ops: Ops) -> None:
    ip, up = await setup(ops)
    two = b"GET /hc/slow-first HTTP/1.1\r\n" + H + b"\r\nGET /hc/second HTTP/1.1\r\n" + H + b"\r\n"
    exchange = asyncio.ensure_future(asyncio.to_thread(half_close, ip.port, client_ctx(ops.pki, tls_max=TLS13), two))
    await asyncio.wait_for(up.got_slow.wait(), 10)  # the first is in flight when the close_notify comes
    await close_notify_seen(ip)
    up.gate.set()
    r = await asyncio.wait_for(exchange, 20)
    resp = parse_response(r.data)
    assert resp.status == 200 and resp.body == b"GET /prod/hc/slow-first HTTP/1.1"
    assert r.data.count(b"HTTP/1.1 200") == 1 and r.end == "close_notify", r
    await slot_back(ip)
    assert up.lines == [b"GET /prod/hc/slow-first HTTP/1.1"]


@BOTH_LOOPS
async def test_tls13_body_cut_short_by_close_notify_is_400_and_the_upstream_request_aborted(ops: Ops) -> None:
    ip, up = await setup(ops)
    warm = await asyncio.to_thread(half_close, ip.port, client_ctx(ops.pki, tls_max=TLS13),
                                   b"GET /hc/warm HTTP/1.1\r\n" + H + b"\r\n")
    assert parse_response(warm.data).status == 200  # a pooled upstream connection: the head goes up at once
    r = await asyncio.to_thread(half_close, ip.port, client_ctx(ops.pki, tls_max=TLS13),
                                b"POST /hc/upload HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nabc")
    resp = parse_response(r.data)
    assert resp.status == 400 and resp.json()["error"] == "bad_request", r
    await slot_back(ip)
    await eventually(lambda: asyncio.sleep(0, up.ends in (["incomplete"], ["reset"])))  # cut, never completed
    assert up.lines == [b"GET /prod/hc/warm HTTP/1.1"]
    _, line = ip.access()
    assert (line["status"], line["error"], line["upstream_aborted"], line["bytes_in"]) == (400, "bad_request", True, 3)


@BOTH_LOOPS
async def test_tls12_close_notify_closes_at_once(ops: Ops) -> None:
    ip, up = await setup(ops)
    exchange = asyncio.ensure_future(asyncio.to_thread(
        half_close, ip.port, client_ctx(ops.pki, tls_max=TLS12), b"GET /hc/slow HTTP/1.1\r\n" + H + b"\r\n"))
    await asyncio.wait_for(up.got_slow.wait(), 10)
    r = await asyncio.wait_for(exchange, 10)  # without waiting for the upstream
    assert (r.data, r.end) == (b"", "close_notify"), r
    await slot_back(ip)
    up.gate.set()
    (line,) = ip.access()
    assert (line["status"], line["error"]) == (499, "client_closed")
