"""One request and its response on a client connection: the half of ``ClientConnection`` that talks upstream.

Owns: the per-request state (``_reset_request``), dialling or reusing an upstream connection and binding the
request to it (head and the body bytes in hand in one write; a retry on a fresh connection only when nothing of
the request can have been processed: idempotent method, no body, a reused connection that returned nothing), the
request body toward the upstream (Content-Length, or chunked decoded strictly and re-framed), the callbacks the
upstream connection makes (``on_response_*``: response framing toward the client, keep-alive or close), the
proxy's own answers (``_refuse``: bytes from ``proxy.wire.responses``, the one error-to-status mapping), and the
access-log line and request metrics of each exchange.

Guarantees: a refused request is never forwarded; if the upstream fails after the response started, the client
connection is reset rather than finished, so a truncated body can never look complete.

Why a base class of ``ClientConnection`` and not an object per request: one exchange at a time runs on a
connection, and an object per request would cost an allocation and an extra attribute hop on every callback of
the hot path; the split is one of reading, not of state.  ``ClientConnection`` (``proxy.connection``) supplies
the client transport, the deadline and the four methods declared at the end of this class.

Must not: read from the client (``proxy.connection`` does), parse bytes (``proxy.wire``), or dial itself
(``proxy.upstream``'s pool does).
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING

from .errors import PayloadTooLarge, ProxyError, UpstreamError
from .wire import chunked
from .wire.headers import CHUNKED_LINE, CLOSE_LINE, KEEP_ALIVE_LINE, response_head
from .wire.responses import error_response

if TYPE_CHECKING:
    from .deadline import Deadline
    from .runtime import Peer
    from .state import ServerState
    from .upstream import UpstreamConnection
    from .wire.http1 import RequestHead, ResponseHead

log = logging.getLogger("mtls_proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
PENDING_LIMIT = 1024 * 1024  # body bytes held while the upstream connection is being dialled

HEAD, BODY, WAIT, CLOSED = range(4)  # the connection's state: reading a head, a body, waiting for the response
_F_NONE, _F_RAW, _F_CHUNK, _F_CLOSE = range(4)  # response framing toward the client


class Exchange:
    # Set by ClientConnection.__init__ / connection_made.
    shared: ServerState
    peer: Peer
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    deadline: Deadline
    state: int
    closing: bool
    buf: bytes
    _up_full: bool
    _pending_full: bool

    def _reset_request(self) -> None:
        self.req: RequestHead | None = None
        self.up: UpstreamConnection | None = None
        self.pending: list[bytes] | None = None  # bytes for the upstream while it is being dialled
        self.pending_size = 0
        self.connect_task: asyncio.Task[None] | None = None
        self.head_out = b""
        self.retried = False
        self.body_left = 0
        self.decoder: chunked.ChunkedDecoder | None = None
        self.req_done = False
        self.rule: str | None = None
        self.t0 = 0.0
        self.t_up: float | None = None
        self.t_up_end: float | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = False  # response head written to the client
        self.sent_up = False  # some of this request was written to an upstream connection
        self.framing = _F_NONE
        self.keep = False
        self.status = 0
        self.pending_head = b""

    async def _connect(self) -> None:
        try:
            await self._dial_and_bind()
        except Exception as exc:  # a bug must end this connection, not leave it waiting without a deadline
            log.error("connection failed: unexpected error while connecting upstream", exc_info=exc)
            self.connect_task = None
            if self.state != CLOSED:
                self.state = CLOSED
                self._abort_both()

    async def _dial_and_bind(self) -> None:
        try:
            up = await self.shared.pool.connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, ProxyError):
                # Never leave a request hanging on a bug: log it once and answer 502 like any failed dial.
                log.error("upstream connect failed unexpectedly", exc_info=exc)
                exc = UpstreamError(f"upstream connect failed: {exc.__class__.__name__}")
            self.connect_task = None
            if self.state != CLOSED:
                self.shared.metrics.bump(self.shared.metrics.upstream_errors, getattr(exc, "kind", "other"))
                self._upstream_failed(exc)
            return
        self.connect_task = None
        if self.state == CLOSED:
            self.shared.pool.release(up)
            return
        pending = self.pending or []
        self.pending = None
        self.pending_size = 0
        self._pending_full = False
        self._bind(up, b"".join(pending))
        self._update_reading()

    def _bind(self, up: UpstreamConnection, data: bytes) -> None:
        self.up = up
        self.sent_up = True
        self.t_up = perf_counter()
        assert self.req is not None
        up.begin(self, self.req.method == "HEAD", data)

    # -- request body -------------------------------------------------------------------------------------
    def _body(self, data: bytes) -> None:
        self.deadline.set(self.shared.cfg.server.idle_timeout)
        dec = self.decoder
        if dec is None:
            n = self.body_left
            if len(data) <= n:
                piece, rest = data, b""
            else:
                piece, rest = data[:n], data[n:]
            self.body_left = n - len(piece)
            self.bytes_in += len(piece)
            self._send_up(piece)
            if self.body_left == 0:
                self._body_done(rest)
            return
        try:
            out, rest2, n = self._decode(data)
        except ProxyError as exc:
            self._abort_request(exc)  # a later error in a streamed body: the upstream request is cut
            return
        self.bytes_in += n
        if out:
            self._send_up(out)
        if rest2 is not None:
            self._body_done(rest2)

    def _decode(self, data: bytes) -> tuple[bytes, bytes | None, int]:
        """Chunked body bytes re-framed for the upstream, the bytes after the body (None: more body to come) and
        the body bytes they carry.  Raises BadRequest (malformed framing) or PayloadTooLarge."""
        dec = self.decoder
        assert dec is not None
        pieces, rest = dec.feed(data)
        if dec.total > self.shared.cfg.server.max_body_bytes:  # declared sizes count before their data arrives
            raise PayloadTooLarge(f"request body larger than {self.shared.cfg.server.max_body_bytes} bytes")
        out: list[bytes] = []
        n = 0
        for p in pieces:
            n += len(p)
            out += chunked.chunk(p)
        if rest is not None:
            out.append(chunked.LAST_CHUNK)
        return b"".join(out), rest, n

    def _body_done(self, rest: bytes) -> None:
        self.req_done = True
        self.state = WAIT
        if not self.started:
            self.deadline.clear()
        if rest:
            self.data_received(rest)

    def _send_up(self, data: bytes) -> None:
        if not data:
            return
        up = self.up
        if up is not None:
            assert up.transport is not None
            up.transport.write(data)
        elif self.pending is not None:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size > PENDING_LIMIT and not self._pending_full:
                self._pending_full = True
                self._update_reading()
        # else: the exchange already failed; the rest of the body is discarded with the connection

    def _abort_request(self, exc: ProxyError) -> None:
        """The request cannot be completed (bad chunking, too large): stop the upstream request, answer, close."""
        up = self.up
        if up is not None:
            self.up = None
            up.close()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self.pending = None
        if self.started:
            self._log(self.status, exc.code)
            self.transport.abort()
            self.state = CLOSED
        else:
            self._refuse(exc, close=True)

    # -- Exchange: called by the upstream connection ----------------------------------------------------
    def on_upstream_writable(self, writable: bool) -> None:
        self._up_full = not writable
        self._update_reading()

    def on_response_head(self, resp: ResponseHead, has_body: bool) -> None:
        req = self.req
        assert req is not None
        self.status = resp.status
        keep = req.keep_alive and not self.closing and not self.shared.draining
        extra = b""
        if not has_body:
            framing = _F_NONE
        elif resp.content_length is not None:
            framing = _F_RAW
        elif req.http11:
            framing = _F_CHUNK
            extra = CHUNKED_LINE
        else:
            framing = _F_CLOSE  # an HTTP/1.0 client only understands close-delimited bodies
            keep = False
        if not self.req_done:
            keep = False  # the upstream answered before the body ended: the rest cannot be resynchronised
        self.framing = framing
        self.keep = keep
        if not keep:
            extra += CLOSE_LINE
        elif not req.http11:
            extra += KEEP_ALIVE_LINE
        self.started = True
        self.pending_head = response_head(resp.status, resp.reason, resp.fields, extra)

    def on_response_body(self, pieces: list[bytes]) -> None:
        out: list[bytes] = []
        head = self.pending_head
        if head:
            out.append(head)
            self.pending_head = b""
        framing = self.framing
        for p in pieces:
            self.bytes_out += len(p)
            if framing == _F_CHUNK:
                out += chunked.chunk(p)
            else:
                out.append(p)
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def on_response_end(self, reusable: bool) -> None:
        out = [self.pending_head] if self.pending_head else []
        self.pending_head = b""
        if self.framing == _F_CHUNK:
            out.append(chunked.LAST_CHUNK)
        if out:
            self.transport.write(b"".join(out))
        self._finish(reusable)

    def on_response_complete(self, resp: ResponseHead, body: bytes, reusable: bool) -> None:
        """The whole response arrived at once (the common small-API case): one write, one call."""
        self.on_response_head(resp, True)
        self.bytes_out = len(body)
        self.transport.write(self.pending_head + body)
        self.pending_head = b""
        self._finish(reusable)

    def _finish(self, reusable: bool) -> None:
        self.t_up_end = perf_counter()
        up = self.up
        self.up = None
        if up is not None:
            if reusable and self.req_done:
                self.shared.pool.release(up)
            else:
                up.close()
        self._log(self.status, None)
        self._next()

    def on_upstream_error(self, exc: ProxyError, retryable: bool) -> None:
        self.up = None
        req = self.req
        if (retryable and not self.started and not self.retried and req is not None and self.head_out
                and req.method in IDEMPOTENT):
            # A pooled connection the upstream had closed: nothing was processed, send it once more on a
            # fresh connection (RFC 9110 §9.2.2).  Requests with a body never get here (head_out is empty).
            self.retried = True
            self.pending = [self.head_out]
            self.connect_task = self.loop.create_task(self._connect())
            return
        kind = exc.kind if isinstance(exc, UpstreamError) else "other"
        self.shared.metrics.bump(self.shared.metrics.upstream_errors, kind)
        self._upstream_failed(exc)

    def _upstream_failed(self, exc: ProxyError) -> None:
        if self.state == CLOSED:
            return
        if self.started:
            # Part of the response is on its way: reset, so the client cannot take a truncated body as complete.
            self._log(self.status, exc.code)
            self.state = CLOSED
            self.transport.abort()
        else:
            self._refuse(exc, close=not self.req_done)

    # -- responses the proxy writes itself (their bytes: proxy.wire.responses) ----------------------------
    def _refuse(self, exc: ProxyError, close: bool) -> None:
        """Answer with the error (never forwarded) and either close or wait for the next request."""
        if self.state == CLOSED:
            return
        close = close or self.closing or self.shared.draining or (self.req is not None and not self.req.keep_alive)
        if self.req is None:
            self.t0 = perf_counter()
        self.status = exc.status
        identity = self.peer.identity
        response, body = error_response(exc, close, self.req is not None and self.req.method == "HEAD",
                                        identity.subject, identity.fingerprint)
        self.transport.write(response)
        self.bytes_out = body  # the access log counts the error body the client got, like any other body
        self._log(exc.status, exc.code)
        if close:
            self._close(linger=True)
        else:
            self.keep = True
            self.req_done = True
            self._next()

    def _log(self, status: int, error: str | None) -> None:
        shared = self.shared
        req = self.req
        now = perf_counter()
        duration = now - self.t0
        upstream = (self.t_up_end or now) - self.t_up if self.t_up is not None else None
        method = req.method if req is not None else "-"
        shared.metrics.request(method, status, self.rule, duration, upstream)
        # upstream_aborted: part of this request went upstream and that upstream request was cut before the
        # request was complete (a bad chunk or too much body later in the stream, a stalled or vanished client)
        shared.access_log.write(self.peer.log_prefix, self.rule, method, req.target if req is not None else b"-",
                             status, self.bytes_in, self.bytes_out, duration, upstream, error,
                             not self.req_done and self.sent_up)

    # -- supplied by ClientConnection ---------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def _next(self) -> None:
        raise NotImplementedError

    def _close(self, linger: bool = False) -> None:
        raise NotImplementedError

    def _update_reading(self) -> None:
        raise NotImplementedError

    def _abort_both(self) -> None:
        raise NotImplementedError
