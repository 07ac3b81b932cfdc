"""The upstream side: a pool of verified TLS connections to the API and the response reader.

Owns: dialling (``connect_to`` or the URL's host), verifying the upstream certificate for the URL's host name
(SNI and hostname check, even when dialling a VPC endpoint name), TLS session reuse for new connections, keeping
idle connections (LIFO, bounded, idle timeout), and parsing each response: head, 1xx skipping, body framing
(Content-Length, chunked, close-delimited), read timeouts.

The response is handed to the ``Exchange`` (the client connection) as it arrives: ``on_response_head``, then
``on_response_body`` with lists of body pieces, then ``on_response_end``; or ``on_upstream_error`` with a
``ProxyError``.  Backpressure: the client connection pauses this transport's reading when it cannot write.

Must not: touch the client transport, or decide what a failure means to the client (the exchange does).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import TYPE_CHECKING, Protocol

from .wire import chunked, http1
from .config import UpstreamConfig
from .deadline import Deadline
from .errors import (
    ProxyError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
)
from .transport import TLSTransport, handshake

if TYPE_CHECKING:
    from .wire.http1 import ResponseHead

ADDRESS_TTL = 30.0  # seconds a resolved upstream address list is reused for new connections
MAX_INFORMATIONAL = 32  # 1xx responses tolerated before the final one (a 1xx storm is a protocol error)


class Exchange(Protocol):
    def on_response_head(self, resp: ResponseHead, has_body: bool) -> None: ...
    def on_response_body(self, pieces: list[bytes]) -> None: ...
    def on_response_end(self, reusable: bool) -> None: ...
    def on_response_complete(self, resp: ResponseHead, body: bytes, reusable: bool) -> None: ...
    def on_upstream_error(self, exc: ProxyError, retryable: bool) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...


_IDLE, _HEAD, _BODY = range(3)


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("pool", "transport", "exchange", "_buf", "_state", "_no_body", "_remaining", "_decoder",
                 "_until_close", "_keep_alive", "reused", "_got_bytes", "closed", "deadline", "_informational")

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: TLSTransport | None = None
        self.exchange: Exchange | None = None
        self._buf = b""
        self._state = _IDLE
        self._no_body = False
        self._remaining = 0
        self._decoder: chunked.ChunkedDecoder | None = None
        self._until_close = False
        self._keep_alive = False
        self.reused = False
        self._got_bytes = False
        self.closed = False
        self.deadline = Deadline(pool.loop, self._on_timeout)
        self._informational = 0

    # -- used by the client connection -------------------------------------------------------------------
    def begin(self, exchange: Exchange, head_request: bool, data: bytes) -> None:
        """Start one request/response exchange and send ``data`` (the request head, maybe some body)."""
        self.exchange = exchange
        self._no_body = head_request
        self._state = _HEAD
        self._got_bytes = False
        self._informational = 0
        self.deadline.set(self.pool.cfg.read_timeout)
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """Drop the connection (mid-exchange: nothing about it can be trusted any more)."""
        self.exchange = None
        self.deadline.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.on_upstream_writable(True)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            self.close()  # bytes on an idle connection: the upstream is confused; never reuse it
            return
        self._got_bytes = True
        if self._state == _HEAD:
            self._head(ex, data)
        elif self._state == _BODY:
            self.deadline.set(self.pool.cfg.read_timeout)
            self._body(ex, data)

    def _head(self, ex: Exchange, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")  # (bytes.find with bounds costs more than the compare below)
        if end < 0 or end > http1.MAX_HEAD:
            if len(buf) > http1.MAX_HEAD:
                self._error(UpstreamProtocolError("response head too large"))
            else:
                self._buf = buf
                self.deadline.set(self.pool.cfg.read_timeout)
            return
        self._buf = b""
        try:
            resp = http1.parse_response_head(buf[:end + 4])
        except UpstreamProtocolError as exc:
            self._error(exc)
            return
        rest = buf[end + 4:]
        if resp.status < 200:
            # RFC 9110 §15.2: 1xx are interim; we never send Expect upstream and never upgrade, so skip them.
            self._informational += 1
            if resp.status == 101 or self._informational > MAX_INFORMATIONAL:
                self._error(UpstreamProtocolError("unexpected 1xx response"))
            elif rest:
                self._head(ex, rest)
            return
        cl = resp.content_length
        if cl is not None and len(rest) == cl and cl and not self._no_body and resp.status not in (204, 304):
            # The whole response is here: hand it over in one call (no per-piece bookkeeping, one write).
            self._state = _IDLE
            self.exchange = None
            self.deadline.clear()
            ex.on_response_complete(resp, rest, resp.keep_alive and not self.closed)
            return
        self._keep_alive = resp.keep_alive
        no_body = self._no_body or resp.status in (204, 304)
        self._decoder = None
        self._until_close = False
        if no_body:
            pass
        elif resp.chunked:
            self._decoder = chunked.ChunkedDecoder(UpstreamProtocolError)
        elif resp.content_length is not None:
            self._remaining = resp.content_length
            no_body = self._remaining == 0
        else:
            self._until_close = True  # RFC 9112 §6.3 item 8: read until the connection closes
            self._keep_alive = False
        self._state = _BODY
        ex.on_response_head(resp, not no_body)
        if no_body:
            self._end(ex, reusable=not rest)
        else:
            self.deadline.set(self.pool.cfg.read_timeout)
            self._body(ex, rest)

    def _body(self, ex: Exchange, data: bytes) -> None:
        if self._decoder is not None:  # (the caller has moved the read deadline)
            try:
                pieces, rest = self._decoder.feed(data) if data else ([], None)
            except UpstreamProtocolError as exc:
                self._error(exc)
                return
            ex.on_response_body(pieces)
            if rest is not None and self.exchange is ex:
                self._end(ex, reusable=not rest)
        elif self._until_close:
            ex.on_response_body([data] if data else [])
        else:
            n = self._remaining
            if len(data) > n:
                self._error(UpstreamProtocolError("more body than Content-Length"))
                return
            self._remaining = n - len(data)
            ex.on_response_body([data] if data else [])
            if self._remaining == 0 and self.exchange is ex:
                self._end(ex, reusable=True)

    def _end(self, ex: Exchange, reusable: bool) -> None:
        self._state = _IDLE
        self.exchange = None
        self.deadline.clear()
        ex.on_response_end(reusable and self._keep_alive and not self.closed)

    def _error(self, exc: ProxyError, retryable: bool = False) -> None:
        ex = self.exchange
        self.close()
        if ex is not None:
            ex.on_upstream_error(exc, retryable)

    def _on_timeout(self) -> None:
        if self.exchange is None:
            self.close()  # idle in the pool for too long
        elif self._state == _HEAD:
            self._error(UpstreamTimeout("no response headers within upstream.read_timeout"))
        else:
            self._error(UpstreamTimeout("upstream body stalled longer than upstream.read_timeout"))

    def eof_received(self) -> bool:
        return False  # a clean close_notify; connection_lost follows and settles the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline.cancel()
        self.pool.discard(self)
        ex = self.exchange
        if ex is None:
            return
        if self._state == _BODY and self._until_close and exc is None:
            self._end(ex, reusable=False)  # clean close_notify ends a close-delimited body
            return
        self.exchange = None
        if self._state == _HEAD and not self._got_bytes:
            # Nothing came back: a pooled connection the upstream had already closed (retry is safe for
            # idempotent requests without a body, which the exchange decides).
            ex.on_upstream_error(UpstreamClosed("upstream closed the connection before responding"), self.reused)
        else:
            ex.on_upstream_error(UpstreamClosed("upstream connection lost mid-response"), False)


class UpstreamPool:
    """Idle upstream connections for one upstream; new ones are dialled on demand."""

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: UpstreamConfig, ssl_context: ssl.SSLContext) -> None:
        self.loop = loop
        self.cfg = cfg
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._session: ssl.SSLSession | None = None
        self.ssl_context = ssl_context
        self._addrs: list[tuple] | None = None
        self._addrs_at = 0.0
        self.closing = False

    @property
    def ssl_context(self) -> ssl.SSLContext:
        return self._ssl_context

    @ssl_context.setter
    def ssl_context(self, ctx: ssl.SSLContext) -> None:
        # A reload swaps the context; a session of the old one would make every new dial raise ValueError
        # ("Session refers to a different SSLContext") -- requests needing a new upstream connection would hang.
        self._ssl_context = ctx
        self._session = None

    def acquire_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            # A transport already closing (upstream close_notify/reset seen) reaches connection_lost -- which sets
            # ``closed`` -- only a loop turn later: a request in between must not get it.
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        if self.closing or conn.closed or len(self._idle) >= self.cfg.pool_max_idle:
            conn.close()
            return
        tr = conn.transport
        assert tr is not None
        if not tr.is_reading():
            tr.resume_reading()
        if self._session is None:
            sock = tr.get_extra_info("ssl_object")
            # Not from a connection dialled before a reload swapped the context (see the ssl_context setter).
            sess = sock.session if sock.context is self._ssl_context else None
            if sess is not None:
                self._session = sess
        conn.deadline.set(self.cfg.pool_idle_timeout)
        self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        self.closing = True
        for conn in list(self._all):
            if conn.exchange is None:
                conn.close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def connect(self) -> UpstreamConnection:
        """A new verified connection, or UpstreamConnectError / UpstreamTLSError."""
        cfg = self.cfg
        dial = cfg.dial
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                sock = await self._dial(dial.host, dial.port)
                try:
                    ssock = self.ssl_context.wrap_socket(
                        sock, server_side=False, server_hostname=cfg.host, do_handshake_on_connect=False,
                        suppress_ragged_eofs=False, session=self._session)
                except BaseException:
                    sock.close()
                    raise
                try:
                    await handshake(self.loop, ssock, cfg.connect_timeout)
                except BaseException:
                    ssock.close()
                    raise
        except TimeoutError:
            raise UpstreamConnectError(f"connecting to {dial} timed out after {cfg.connect_timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            self._session = None
            raise UpstreamTLSError(f"upstream certificate rejected: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            self._session = None
            raise UpstreamTLSError(f"upstream TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            self._addrs = None
            raise UpstreamConnectError(f"cannot connect to {dial}: {exc.strerror or exc}") from None
        conn = UpstreamConnection(self)
        transport = TLSTransport(self.loop, ssock, conn)
        transport.start()
        self._all.add(conn)
        return conn

    async def _dial(self, host: str, port: int) -> socket.socket:
        # Resolved at most every ADDRESS_TTL seconds (and after a failed dial): a VPC endpoint's DNS answers change
        # when its network interfaces do, and a name resolved once at start would be trusted forever.
        addrs = self._addrs
        now = self.loop.time()
        if addrs is None or now - self._addrs_at > ADDRESS_TTL:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addrs = self._addrs = [(fam, addr) for fam, _, _, _, addr in infos]
            self._addrs_at = now
        last: OSError | None = None
        for fam, addr in addrs:
            sock = socket.socket(fam, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await self.loop.sock_connect(sock, addr)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        assert last is not None
        raise last
