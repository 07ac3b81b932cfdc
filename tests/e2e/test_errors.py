"""Error behaviour end to end: what a client gets when the request or the upstream is bad.

Owns: the status and JSON body (``error``, ``message``) for malformed requests (400), unknown transfer codings
(501), over-long request lines (414) and heads (431), bodies over ``max_body_bytes`` (413, by Content-Length before
anything is sent upstream, and while streaming a chunked body: the upstream request is aborted); an unreachable
upstream or bad upstream TLS (502), no response head within ``read_timeout`` (504), garbage and 1xx storms from
the upstream (502); an upstream that dies mid-body (the client connection is aborted, never a complete-looking
response); and that no request, however malformed, crashes the proxy or leaks a traceback.

Every test runs with ``loop_errors``: an exception escaping a proxy callback onto the event loop fails it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest

from proxy.wire.http1 import MAX_HEAD
from tests.e2e.kit import SniUpstream
from tests.harness import Handler, RawClient, Response, RunningProxy, client_ctx, free_port, get, read_request
from tests.pki import Pki

BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])

StartProxy = Callable[..., Awaitable[RunningProxy]]
StartScripted = Callable[..., Awaitable[SniUpstream]]
Connect = Callable[..., Awaitable[RawClient]]
Alive = Callable[[RunningProxy], Awaitable[None]]
Recorded = list[tuple[bytes, bytes]]


def ok(body: bytes = b"ok") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def recorder(log: Recorded) -> Handler:
    """An origin server that records each complete request and answers 200, keep-alive."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            log.append((head, body))
            writer.write(ok())
            await writer.drain()

    return handler


def fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, value) for each header line of a raw head."""
    return [(n.strip().lower(), v.strip()) for n, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
            if n]


def assert_error_body(resp: Response, status: int, code: str | None = None) -> None:
    assert resp.status == status, resp.body
    assert resp.header("content-type") == "application/json"
    body = json.loads(resp.body)
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["message"], str) and body["message"]
    if code is not None:
        assert body["error"] == code
    assert b"Traceback" not in resp.body and b'File "' not in resp.body


# ---- malformed requests -----------------------------------------------------------------------------------

H = b"Host: x\r\n"


def padded(start: bytes, end: bytes, total: int) -> bytes:
    return start + b"v" * (total - len(start) - len(end)) + end


MALFORMED: dict[str, tuple[bytes, int]] = {
    # framing ambiguities (RFC 9112 §6.3): refused, never guessed
    "cl+te": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te+cl": (b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400),
    "duplicate-cl-same": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "duplicate-cl-differ": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "cl-list": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "cl-plus": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    "cl-negative": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    "cl-hex": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    "cl-overflow": (b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 184467440737095516160\r\n\r\n", 400),
    "te-chunked-twice": (b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    "te-chunked-not-last": (b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    "te-in-http10": (b"POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # bad chunk sizes and chunk framing
    **{f"chunk-size-{name}": (b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n" + line, 400)
       for name, line in {
           "negative": b"-1\r\nx\r\n0\r\n\r\n", "0x-prefix": b"0x3\r\nabc\r\n0\r\n\r\n",
           "plus": b"+3\r\nabc\r\n0\r\n\r\n", "not-hex": b"3g\r\nabc\r\n0\r\n\r\n", "empty": b"\r\nabc\r\n0\r\n\r\n",
           "space-inside": b"3 3\r\nabc\r\n0\r\n\r\n", "leading-space": b" 3\r\nabc\r\n0\r\n\r\n",
           "overflow": b"10000000000000003\r\nabc\r\n0\r\n\r\n", "bare-lf": b"3\nabc\r\n0\r\n\r\n",
           "data-too-long": b"3\r\nabcd\r\n0\r\n\r\n", "bad-extension": b"3;=x\r\nabc\r\n0\r\n\r\n",
       }.items()},
    # head syntax (RFC 9112 §2.2, §5)
    "bare-lf-everywhere": (b"GET /a HTTP/1.1\nHost: x\n\n", 400),
    "bare-lf-in-header": (b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400),
    "bare-cr-in-value": (b"GET /a HTTP/1.1\r\n" + H + b"X-A: b\rc\r\n\r\n", 400),
    "space-before-colon": (b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    "tab-before-colon": (b"GET /a HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n", 400),
    "obs-fold": (b"GET /a HTTP/1.1\r\n" + H + b"X-A: b\r\n  c\r\n\r\n", 400),
    "obs-fold-first-line": (b"GET /a HTTP/1.1\r\n X-A: b\r\n" + H + b"\r\n", 400),
    "nul-in-value": (b"GET /a HTTP/1.1\r\n" + H + b"X-A: b\x00c\r\n\r\n", 400),
    "nul-in-name": (b"GET /a HTTP/1.1\r\n" + H + b"X-\x00A: b\r\n\r\n", 400),
    "nul-in-target": (b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "no-colon": (b"GET /a HTTP/1.1\r\n" + H + b"X-A b\r\n\r\n", 400),
    "missing-host": (b"GET /a HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /a HTTP/1.1\r\n" + H + H + b"\r\n", 400),
    "absolute-form": (b"GET https://api.test/a HTTP/1.1\r\n" + H + b"\r\n", 400),
    "authority-form": (b"CONNECT api.test:443 HTTP/1.1\r\n" + H + b"\r\n", 400),
    "asterisk-form": (b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", 400),
    "fragment": (b"GET /a#frag HTTP/1.1\r\n" + H + b"\r\n", 400),
    "space-in-target": (b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "double-space": (b"GET  /a HTTP/1.1\r\n" + H + b"\r\n", 400),
    "no-version": (b"GET /a\r\n" + H + b"\r\n", 400),
    "lowercase-version": (b"GET /a http/1.1\r\n" + H + b"\r\n", 400),
    "bad-method": (b"GE(T /a HTTP/1.1\r\n" + H + b"\r\n", 400),
    "tls-record": (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400),
    # other statuses
    "http2-version": (b"GET /a HTTP/2.0\r\n" + H + b"\r\n", 505),
    "unknown-coding": (b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "unknown-coding-deflate": (b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: deflate, chunked\r\n\r\n0\r\n\r\n",
                               501),
    "unknown-expectation": (b"POST /a HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\nContent-Length: 1\r\n\r\nx", 417),
    "long-request-line": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    "long-request-line-unfinished": (b"GET /" + b"a" * 9000, 414),
    # (exactly one byte over: the proxy has read everything when it answers, so its close is not a TCP reset that
    # could destroy the answer in flight -- RFC 9112 §9.6)
    "huge-head": (padded(b"GET /a HTTP/1.1\r\n" + H + b"X-Big: ", b"\r\n\r\n", MAX_HEAD + 5), 431),
    "huge-head-unfinished": (padded(b"GET /a HTTP/1.1\r\n" + H + b"X-Big: ", b"", MAX_HEAD + 1), 431),
    "too-many-fields": (b"GET /a HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
                        431),
}


@pytest.mark.parametrize(("data", "status"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_is_refused_and_proxy_survives(
        data: bytes, status: int, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect,
        fwd_assert_alive: Alive) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    resp = await c.request(data)
    assert_error_body(resp, status)
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer()
    assert log == []  # no complete request ever reached the upstream
    access = rp.access()
    assert [line["status"] for line in access] == [status]
    await fwd_assert_alive(rp)
    assert len(log) == 1


@pytest.mark.parametrize("expect", [b"", b"Expect: 100-continue\r\n"], ids=["plain", "expect-100"])
async def test_413_by_content_length_before_anything_is_sent(
        expect: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port, server={"max_body_bytes": 1000})
    c = await fwd_client(rp)
    await c.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n" + expect + b"\r\n")
    head = await read_head(c)
    assert head.startswith(b"HTTP/1.1 413 ")  # a client waiting for 100 Continue is told at once, never invited
    body = json.loads(await c.reader.readexactly(int(dict(fields(head))[b"content-length"])))
    assert body["error"] == "payload_too_large" and body["message"]
    assert await c.closed_by_peer()
    assert up.connections == 0  # not even dialled
    c2 = await fwd_client(rp)
    resp = await c2.request(b"POST /fits HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000)
    assert resp.status == 200 and log[0][1] == b"x" * 1000


def _upload_then_read(port: int, ctx: ssl.SSLContext, body_size: int) -> tuple[bytes, str]:
    """A blocking client that writes its whole request before reading anything (many simple clients do).

    Returns the bytes it could read and how the connection ended: "eof" (close_notify/FIN) or the error.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            head = b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % body_size
            out = b""
            try:
                s.sendall(head + b"x" * body_size)
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        return out, "eof"
                    out += chunk
            except OSError as exc:
                return out, type(exc).__name__


async def test_error_response_survives_a_client_still_uploading(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, pki: Pki) -> None:
    """Lingering close (RFC 9112 §9.6): closing over unread input makes the kernel send a reset instead of a FIN,
    which discards a response still in flight and fails the client's upload.  The proxy shuts down its side and
    keeps discarding for a bounded time instead, so the client finishes writing, reads the 413, then a clean
    end."""
    up = await fwd_scripted(recorder([]))
    rp = await fwd_proxy(up.port, server={"max_body_bytes": 1000})
    ctx = client_ctx(pki, "good")
    loop = asyncio.get_running_loop()
    for _ in range(3):
        out, end = await loop.run_in_executor(None, _upload_then_read, rp.port, ctx, 2_000_000)
        assert out.startswith(b"HTTP/1.1 413 "), out[:80]
        assert end == "eof"
    assert up.connections == 0


@BOTH_LOOPS
async def test_413_while_streaming_chunked_aborts_the_upstream_request(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect, fwd_assert_alive: Alive) -> None:
    got_body = asyncio.Event()
    ended = asyncio.Event()
    received: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if received:  # later connections (the liveness check) are served normally
            await recorder([])(reader, writer)
            return
        raw = await reader.readuntil(b"\r\n\r\n")
        received.append(raw)
        try:
            while chunk := await reader.read(65536):
                received.append(chunk)
                got_body.set()
        except (ConnectionError, ssl.SSLError):
            pass
        ended.set()

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port, server={"max_body_bytes": 100_000})
    c = await fwd_client(rp)
    piece = b"%x\r\n%s\r\n" % (60_000, b"z" * 60_000)
    await c.send(b"POST /stream HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + piece)
    await asyncio.wait_for(got_body.wait(), 10)  # the upstream request is under way ...
    await c.send(b"%x\r\nzzz" % 60_000)  # ... when a chunk size takes the body over max_body_bytes
    resp = await c.read_response()
    assert_error_body(resp, 413, "payload_too_large")
    assert await c.closed_by_peer()
    await asyncio.wait_for(ended.wait(), 10)  # the upstream saw its connection closed ...
    raw = b"".join(received)
    assert not raw.endswith(b"0\r\n\r\n")  # ... without the last chunk: the request was never complete
    assert raw.count(b"z") <= 100_000
    await fwd_assert_alive(rp)


@BOTH_LOOPS
async def test_an_answer_before_the_request_body_ends_closes_both_connections(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect, fwd_assert_alive: Alive) -> None:
    """An API may refuse an upload (401, 413) before reading it.  The answer reaches the client with
    ``Connection: close``, and neither connection is used again: the rest of the body would be read as the next
    request on either side (RFC 9112 §9.3)."""
    bodies: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if bodies:  # later connections (the liveness check) are served normally
            await recorder([])(reader, writer)
            return
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")  # keep-alive, as servers do
        await writer.drain()
        bodies.append(b"")
        while chunk := await reader.read(65536):  # whatever else arrives on this connection
            bodies[0] += chunk

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
    resp = await c.read_response()
    assert (resp.status, resp.body) == (401, b"nope")
    assert resp.header("connection") == "close"
    assert await c.closed_by_peer()
    await fwd_assert_alive(rp)  # served on a new upstream connection, not on the one holding half a body
    assert up.connections == 2
    assert b"HTTP/1.1" not in bodies[0]  # no request was ever sent where the upload's bytes were expected


# ---- the upstream cannot be used -------------------------------------------------------------------------


async def test_502_when_nothing_listens(fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    rp = await fwd_proxy(free_port())
    c = await fwd_client(rp)
    resp = await c.request(get("/a"))
    assert_error_body(resp, 502, "upstream_unreachable")
    resp = await c.request(get("/b"))  # a request without a body keeps the client connection
    assert_error_body(resp, 502, "upstream_unreachable")


async def plain_tcp_server(behaviour: str) -> tuple[asyncio.Server, int]:
    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if behaviour == "http":
                await reader.read(1)  # a ClientHello arrives; answer in plain text
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                await reader.read()
        except ConnectionError:
            pass  # the proxy gave up on us with a reset
        writer.transport.abort()  # ("reset": at once, in the middle of the proxy's handshake)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(("behaviour", "code"), [("http", "upstream_tls_error"), ("reset", None)])
async def test_502_when_upstream_tls_fails(behaviour: str, code: str | None, fwd_proxy: StartProxy,
                                           fwd_client: Connect) -> None:
    server, port = await plain_tcp_server(behaviour)
    try:
        rp = await fwd_proxy(port)
        c = await fwd_client(rp)
        resp = await c.request(get("/a"))
        assert_error_body(resp, 502, code)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("request_bytes", [
    b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /slow HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
], ids=["no-body", "content-length", "chunked"])
async def test_a_slow_answer_is_bounded_by_read_timeout_not_by_idle_timeout(
        request_bytes: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    """Once the request is complete, the wait for the answer is the upstream's (``upstream.read_timeout``): the
    client's ``idle_timeout`` must not cut it, with or without a body."""
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(1.0)  # over three idle_timeouts, well inside read_timeout
            writer.write(ok(b"late"))
            await writer.drain()

    up = await fwd_scripted(slow)
    rp = await fwd_proxy(up.port, server={"idle_timeout": 0.3}, upstream={"read_timeout": 10})
    c = await fwd_client(rp)
    for _ in range(2):  # and the connection stays usable
        await c.send(request_bytes)
        resp = await c.read_response()
        assert (resp.status, resp.body) == (200, b"late")


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.1 200 OK\r\nContent-"], ids=["nothing", "half-a-head"])
async def test_504_without_response_head_within_read_timeout(
        sent: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    closed = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(sent)
        await writer.drain()
        try:
            await reader.read()
        finally:
            closed.set()

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port, upstream={"read_timeout": 0.5})
    c = await fwd_client(rp)
    resp = await c.request(get("/slow"), timeout=20)
    assert_error_body(resp, 504, "upstream_timeout")
    await asyncio.wait_for(closed.wait(), 10)  # the proxy gave up on that upstream connection


# ---- the upstream dies mid-body ------------------------------------------------------------------------------


def dies_mid_body(head: bytes, first: bytes, go: asyncio.Event, how: str = "reset", rest: bytes = b"") -> Handler:
    """Answer with ``head`` + ``first``, wait until the client has seen body bytes, then send ``rest`` and end
    the connection: ``reset`` (TCP RST), ``fin`` (TCP FIN without TLS close_notify) or ``close`` (clean).
    Only the first connection does this; later ones (the liveness check) are served normally."""
    count = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        if count > 1:
            await recorder([])(reader, writer)
            return
        await read_request(reader)
        writer.write(head + first)
        await writer.drain()
        await go.wait()
        if rest:
            writer.write(rest)
            await writer.drain()
        if how == "fin":
            # A FIN under the TLS layer, no close_notify ever (a duplicate fd: loop transports forbid shutdown)
            fd = writer.transport.get_extra_info("socket").fileno()
            with socket.socket(fileno=os.dup(fd)) as raw:
                raw.shutdown(socket.SHUT_WR)
            await reader.read()
        elif how == "close":
            writer.close()
            await writer.wait_closed()
        # "reset": returning lets ScriptedUpstream abort the transport (SO_LINGER 0 -> RST)

    return handler


async def read_head(c: RawClient) -> bytes:
    return await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)


async def read_until_end(c: RawClient) -> tuple[bytes, BaseException | None]:
    """Everything the client can read, and how it ended (None: a clean TLS close)."""
    data = b""
    try:
        async with asyncio.timeout(10):
            while chunk := await c.reader.read(65536):
                data += chunk
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        return data, exc
    return data, None


def complete_chunked(data: bytes) -> bool:
    """Whether ``data`` is a complete chunked body (ends with the last chunk and an empty trailer)."""
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return False
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return data[end + 2:end + 4] == b"\r\n"
        pos = end + 2 + size + 2
        if pos > len(data):
            return False


CL_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
CLOSE_HEAD = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"


@BOTH_LOOPS
async def test_upstream_reset_mid_content_length_body(fwd_scripted: StartScripted, fwd_proxy: StartProxy,
                                                      fwd_client: Connect, fwd_assert_alive: Alive) -> None:
    go = asyncio.Event()
    up = await fwd_scripted(dies_mid_body(CL_HEAD, b"a" * 40_000, go))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(get("/cl"))
    head = await read_head(c)
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 100000" in head
    assert await c.reader.readexactly(1000)
    go.set()
    data, how = await read_until_end(c)
    assert len(data) + 1000 < 100_000  # fewer bytes than announced ...
    assert how is not None  # ... and an error, not a clean end
    await fwd_assert_alive(rp)


@BOTH_LOOPS
@pytest.mark.parametrize(("head", "first", "how"), [
    (CHUNKED_HEAD, b"9c40\r\n" + b"a" * 40_000 + b"\r\n", "reset"),
    (CHUNKED_HEAD, b"9c40\r\n" + b"a" * 40_000 + b"\r\n" + b"10\r\nabc", "reset"),  # inside a chunk
    (CLOSE_HEAD, b"a" * 40_000, "reset"),
    (CLOSE_HEAD, b"a" * 40_000, "fin"),  # truncation without close_notify is not a clean end either
], ids=["chunked-between-chunks", "chunked-inside-chunk", "close-delimited-reset", "close-delimited-fin"])
async def test_upstream_dies_mid_body_client_never_sees_a_last_chunk(
        head: bytes, first: bytes, how: str, fwd_scripted: StartScripted, fwd_proxy: StartProxy,
        fwd_client: Connect, fwd_assert_alive: Alive) -> None:
    go = asyncio.Event()
    up = await fwd_scripted(dies_mid_body(head, first, go, how))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(get("/chunks"))
    head_seen = await read_head(c)
    assert head_seen.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head_seen
    start = await c.reader.readexactly(1000)
    go.set()
    data, end = await read_until_end(c)
    assert not complete_chunked(start + data)
    assert end is not None
    await fwd_assert_alive(rp)


async def test_close_delimited_body_ended_cleanly_is_complete(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    # The control for the cases above: a clean close_notify does end a close-delimited body.
    go = asyncio.Event()
    go.set()
    up = await fwd_scripted(dies_mid_body(CLOSE_HEAD, b"a" * 40_000, go, "close", rest=b"b" * 10))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    resp = await c.request(get("/close"))
    assert resp.status == 200 and resp.body == b"a" * 40_000 + b"b" * 10


@pytest.mark.parametrize("head", [CLOSE_HEAD, CL_HEAD], ids=["close-delimited", "content-length"])
async def test_http10_client_upstream_reset_is_not_a_clean_end(
        head: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    # An HTTP/1.0 client gets a close-delimited body: only a reset (no close_notify) tells it the body is cut.
    go = asyncio.Event()
    up = await fwd_scripted(dies_mid_body(head, b"a" * 40_000, go))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(b"GET /old HTTP/1.0\r\n\r\n")
    await read_head(c)
    await c.reader.readexactly(1000)
    go.set()
    data, end = await read_until_end(c)
    assert len(data) + 1000 < 100_000 and end is not None


@pytest.mark.parametrize("body", [b"zz\r\nabc", b"3\r\nabcXY", b"3\nabc\r\n"], ids=["size", "crlf", "bare-lf"])
async def test_upstream_sends_broken_chunked_body(
        body: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect,
        fwd_assert_alive: Alive) -> None:
    go = asyncio.Event()
    go.set()
    up = await fwd_scripted(dies_mid_body(CHUNKED_HEAD, b"5\r\nhello\r\n" + body, go, "close"))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(get("/broken"))
    data, end = await read_until_end(c)
    if data:  # the head may or may not have left before the error was found
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert not complete_chunked(rest)
    assert end is not None
    await fwd_assert_alive(rp)


# ---- bad response heads and 1xx --------------------------------------------------------------------------

GARBAGE = {
    "not-http": b"HELLO WORLD\r\n\r\n",
    "binary": b"\x00\x01\x02\x03\xff\r\n\r\n",
    "status-4-digits": b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    "http2-status-line": b"HTTP/2 200\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok",
    "nul": b"HTTP/1.1 200 OK\r\nX-A: b\x00c\r\nContent-Length: 2\r\n\r\nok",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
    "conflicting-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    "bad-cl": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "unknown-coding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok",
    "huge-head": b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    "1xx-storm": b"HTTP/1.1 100 Continue\r\n\r\n" * 50 + ok(),
}


def answers(data: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(data)
        await writer.drain()
        await reader.read()  # stay open: the verdict must come from the bytes, not from a close

    return handler


@pytest.mark.parametrize("data", GARBAGE.values(), ids=GARBAGE.keys())
async def test_bad_response_head_is_502(data: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy,
                                        fwd_client: Connect) -> None:
    up = await fwd_scripted(answers(data))
    rp = await fwd_proxy(up.port, upstream={"read_timeout": 30.0})
    c = await fwd_client(rp)
    resp = await c.request(get("/g"), timeout=20)
    assert_error_body(resp, 502, "upstream_bad_response")


async def test_a_few_1xx_then_200(fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 3 + b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
    up = await fwd_scripted(answers(interim + ok(b"final")))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(get("/hints"))
    first = await read_head(c)
    assert first.startswith(b"HTTP/1.1 200 ")  # interim responses are the proxy's business, not the client's
    assert await c.reader.readexactly(5) == b"final"


# ---- nothing crashes it ------------------------------------------------------------------------------------

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
VALID = [b"POST /a/b?c=d HTTP/1.1\r\nHost: x\r\nX-A: b\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
         b"PUT /a%2Fb HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"]
SPICE = [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\r\n", b"\xff", b"%", b"\r\n\r\n", b";", b"0", b"-"]


def mutations(seed: int, count: int) -> list[bytes]:
    """Deterministic junk: random bytes, and valid requests with a few bytes flipped, cut or inserted."""
    rng = random.Random(seed)
    out = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) + b"\r\n\r\n" for _ in range(count // 4)]
    while len(out) < count:
        data = bytearray(rng.choice(VALID))
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[pos:pos + 1] = rng.choice(SPICE)
            elif op == 1:
                del data[pos:pos + rng.randrange(1, 4)]
            else:
                data[pos:pos] = rng.choice(SPICE)
        out.append(bytes(data))
    return out


async def test_no_malformed_request_crashes_the_proxy_or_leaks_a_traceback(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect, fwd_assert_alive: Alive) -> None:
    up = await fwd_scripted(recorder([]))
    # short timeouts: a mutation that leaves a head or body unfinished is answered (408) or closed quickly
    rp = await fwd_proxy(up.port, server={"header_timeout": 0.3, "idle_timeout": 0.3})
    for data in mutations(seed=20240602, count=80):
        c = await fwd_client(rp)
        await c.send(data)
        raw, _ = await read_until_end(c)
        assert b"Traceback" not in raw and b'File "' not in raw, raw
        if raw.startswith(CONTINUE):
            raw = raw[len(CONTINUE):]
        if raw:
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 "), raw
            if not head.startswith(b"HTTP/1.1 200 "):  # anything but the upstream's answer is the proxy's JSON
                length = int(dict(fields(head))[b"content-length"])
                assert {"error", "message"} <= set(json.loads(body[:length])), raw
        await c.close()
    await fwd_assert_alive(rp)
