"""One client connection: requests in, policy, streaming to the upstream, responses out.

Owns: the per-connection request loop over a verified TLS transport (keep-alive and pipelining), the policy
decision per request, request body streaming (Content-Length or chunked, re-framed for the upstream), response
framing toward the client, timeouts (idle, header, body, stalled writes), backpressure in both directions, and
**the one place where a ``ProxyError`` becomes an HTTP response** (``_error_response``).  It also writes the
access-log line and the request metrics.

Per-connection facts (identity, the header block added to every request, the policy pre-filtered for this
certificate, the access-log prefix) are computed once in ``Peer`` before the first byte is read.

Per request, after the policy allows it: the head-size check against API Gateway's limit (431
``identity_too_large`` when what the proxy adds is what pushes it over) and the partner gate (``proxy.partners``: one
dict lookup; the rule's rate limit, 429 with ``Retry-After``; the certificate recorded for ``/certs`` the first
time a rule allows a request on this connection).

Guarantees: a refused request is never forwarded (policy, size and rate checks run before any upstream write); if the
upstream fails after the response started, the client connection is reset rather than finished, so a truncated
body can never look complete; a request is retried only when nothing of it can have been processed (idempotent
method, no body, a reused connection that returned nothing).

The connection holds its slot under ``max_connections`` (``proxy.slots``) from the hand-over until
``connection_lost``, which releases it in a ``finally``: the transport always ends in ``connection_lost``, and
every way this class ends a connection goes through the transport (``_close``, ``abort``).  A graceful close
with output still buffered is bounded too: a client that stops reading is reset after ``idle_timeout``.

Must not: parse bytes itself (``proxy.http1``), build header values (``proxy.headers``), or dial (``proxy.forward``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from time import perf_counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import http1
from .deadline import Deadline
from .errors import (
    BadRequest,
    Forbidden,
    IdentityTooLarge,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    TooManyRequests,
    UpstreamError,
)
from .headers import CHUNKED_LINE, CLOSE_LINE, KEEP_ALIVE_LINE, SPOOFABLE, request_head, response_head
from .identity import Identity
from .policy import ConnectionPolicy, normalize_path
from .partners import FIRST
from .ratelimit import retry_after_seconds

log = logging.getLogger("mtls_proxy")

if TYPE_CHECKING:
    from .forward import UpstreamConnection
    from .http1 import RequestHead, ResponseHead
    from .partners import Limit
    from .server import ProxyServer
    from .slots import Slot

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PIPELINE_LIMIT = http1.MAX_HEAD  # buffered bytes of a pipelined next request before reading pauses
PENDING_LIMIT = 1024 * 1024  # body bytes held while the upstream connection is being dialled
# API Gateway's quota on "the total combined size of request line and header values".  Counted here as the whole
# head the proxy sends (names, CRLFs and the blank line too): a little more than the gateway counts, so the proxy
# never forwards a request the gateway would refuse for size because of what the proxy added.
GATEWAY_HEAD_LIMIT = 10240

_HEAD, _BODY, _WAIT, _CLOSED = range(4)
_F_NONE, _F_RAW, _F_CHUNK, _F_CLOSE = range(4)  # response framing toward the client


@dataclass(frozen=True, slots=True)
class Peer:
    """Everything about a connection that is fixed after the handshake, computed once."""

    identity: Identity
    policy: ConnectionPolicy
    block: bytes  # headers added to every request
    log_prefix: str
    client_addr: str
    vpce_id: str | None
    limits: Mapping[str, Limit] = field(default_factory=dict)  # [[allow]] rate limits of this snapshot

    @property
    def added(self) -> int:
        return len(self.block)


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer, peer: Peer, slot: Slot | None = None) -> None:
        self.srv = server
        self.peer = peer
        self.slot = slot
        self.gate = server.partners.gate(peer.identity, peer.limits)
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = _HEAD
        self.buf = b""
        self.closing = False  # finish the current exchange, then close (drain or Connection: close)
        self.deadline = Deadline(self.loop, self._on_timeout)
        self._up_full = False
        self._pending_full = False
        self._pipeline_full = False
        self._paused = False
        self._reset_request()

    def _reset_request(self) -> None:
        self.req: RequestHead | None = None
        self.up: UpstreamConnection | None = None
        self.pending: list[bytes] | None = None  # bytes for the upstream while it is being dialled
        self.pending_size = 0
        self.connect_task: asyncio.Task[None] | None = None
        self.head_out = b""
        self.retried = False
        self.body_left = 0
        self.decoder: http1.ChunkedDecoder | None = None
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

    # -- asyncio.Protocol: client side ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.srv.connection_opened(self)
        self.deadline.set(self.srv.cfg.server.idle_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _BODY:
            self._body(data)
        elif state == _HEAD:
            self._head(data)
        elif state == _WAIT:
            self.buf += data
            if len(self.buf) > PIPELINE_LIMIT:
                self._pipeline_full = True
                self._update_reading()

    def eof_received(self) -> bool:
        """The client's close_notify: it sends nothing more.

        TLS 1.3 closes only the sender's side (RFC 8446 §6.1), so a client may send its request and then
        close_notify and still read the answer.  A complete request in flight is answered, with
        ``Connection: close``, and then the connection is closed: nothing after the close_notify is read, and a
        request pipelined before it is not started.  A request body cut short by it can never complete: the
        upstream request is aborted and the client told 400.  TLS 1.2 requires the receiver of a close_notify to
        answer with its own at once and discard pending writes (RFC 5246 §7.2.1): the connection closes now.
        """
        if self.state not in (_WAIT, _BODY) or self.req is None or not self._half_close_allowed():
            return False
        self.closing = True  # no next request; the response says Connection: close
        if self.state == _BODY and not self.req_done:
            self._abort_request(BadRequest("the client closed its sending side before the request body ended"))
        return True

    def _half_close_allowed(self) -> bool:
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object is not None and ssl_object.version() == "TLSv1.3"

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = _CLOSED
        try:
            self.deadline.cancel()
            if self.connect_task is not None:
                self.connect_task.cancel()
            up = self.up
            if up is not None:
                self.up = None
                up.close()
            if self.req is not None and was in (_BODY, _WAIT):
                self._log(499 if not self.started else self.status, "client_closed")
        finally:
            self.srv.connection_closed(self)
            if self.slot is not None:
                self.slot.release()  # may be the last slot a drain waits for

    def pause_writing(self) -> None:
        # The client is slower than the upstream: stop reading the upstream, bound the wait.
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()
        self.deadline.set(self.srv.cfg.server.idle_timeout)

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()
        if self.state == _WAIT:
            self.deadline.clear()

    # -- request head ---------------------------------------------------------------------------------------
    def _head(self, data: bytes) -> None:
        if not self.buf and data and data[0] != 13:
            # The usual case: a whole head in one read, no empty lines (CR LF) before it.  The same search
            # http1.find_head_end makes (the first blank line, within MAX_HEAD); what it would raise for is only
            # possible while the head is incomplete.  (bytes.find with bounds costs more than the compare.)
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= http1.MAX_HEAD:
                self._start(data[:end + 4], data[end + 4:])
                return
        # Empty lines before a request line (RFC 9112 §2.2) do not start the head: only its first real byte
        # starts the header timeout, or a client could trickle behind one CRLF for the whole idle_timeout.
        first = not self.buf.strip(b"\r\n")
        if self.buf:
            data = self.buf + data
            self.buf = b""
        try:
            end = http1.find_head_end(data)
        except ProxyError as exc:
            self._refuse(exc, close=True)
            return
        if end < 0:
            if first and data.strip(b"\r\n"):
                # first bytes of a new head: from now on the header timeout runs, and is not extended
                self.deadline.set(self.srv.cfg.server.header_timeout)
            self.buf = data
            return
        self._start(data[:end], data[end:])

    def _start(self, head: bytes, rest: bytes) -> None:
        srv = self.srv
        self.t0 = perf_counter()
        try:
            req = http1.parse_request_head(head, SPOOFABLE)
        except ProxyError as exc:
            self._refuse(exc, close=True)
            return
        self.req = req
        path = normalize_path(req.path)
        decision = self.peer.policy.decide(req.method, path)
        if not decision.allowed:
            srv.metrics.bump(srv.metrics.denied, decision.reason)
            self.buf = rest  # a pipelined next request (RFC 9112 §9.3.2): _next() answers it after this 403
            self._refuse(Forbidden(decision.detail, decision.reason), close=req.has_body or not req.keep_alive)
            return
        self.rule = decision.rule
        cfg = srv.cfg
        if req.content_length is not None and req.content_length > cfg.server.max_body_bytes:
            self._refuse(PayloadTooLarge(f"request body larger than {cfg.server.max_body_bytes} bytes"), close=True)
            return
        # Byte-exact (issue 2 §4) unless dot segments were removed: then the upstream gets the path the policy
        # matched (§3).  Decoded %XX of unreserved characters alone is no reason to rewrite (RFC 3986 §6.2.2.2).
        target = (req.target if path is req.path or not _has_dot_segment(req.path)
                  else path.encode("ascii") + req.query)
        if srv.base_path:
            target = srv.base_path + target
        head_out = request_head(req.method, target, req.fields, self.peer.block, req.chunked)
        size = len(head_out)
        if size > GATEWAY_HEAD_LIMIT and size - self.peer.added <= GATEWAY_HEAD_LIMIT:
            self.buf = rest
            self._refuse(IdentityTooLarge(
                f"with the {self.peer.added} bytes of client certificate and identity headers this proxy adds, the "
                f"request line and headers would be {size} bytes, over API Gateway's limit of {GATEWAY_HEAD_LIMIT}"),
                close=req.has_body or not req.keep_alive)
            return
        gate = self.gate
        state = gate.rules.get(decision.rule, FIRST)  # type: ignore[arg-type]  # an allowed decision names its rule
        if state is not None and (wait := gate.admit(decision.rule, state)):  # type: ignore[arg-type]
            srv.metrics.bump(srv.metrics.denied, "rate_limited")
            self.buf = rest
            self._refuse(TooManyRequests(f"rate limit of rule {decision.rule!r} exceeded for this client certificate",
                                         retry_after_seconds(wait)), close=req.has_body or not req.keep_alive)
            return
        after: bytes | None = None  # the bytes behind a body that is complete in ``rest``
        if req.has_body:
            self.state = _BODY
            body = b""
            if req.chunked:
                self.decoder = http1.ChunkedDecoder()
                if rest:
                    # Every framing byte already here is decoded before anything goes upstream: a request whose
                    # chunked framing is already known to be broken (or too large) is answered and never
                    # forwarded -- the upstream sees no request at all.  The decoded result is what is sent.
                    try:
                        body, after, n = self._decode(rest)
                    except ProxyError as exc:
                        self._refuse(exc, close=True)
                        return
                    self.bytes_in = n
            else:
                left = req.content_length or 0
                if rest:
                    body, rest = (rest, b"") if len(rest) <= left else (rest[:left], rest[left:])
                    left -= len(body)
                    self.bytes_in = len(body)
                self.body_left = left
                if left == 0:
                    after = rest
            rest = b""
            out = head_out + body if body else head_out
            self.deadline.set(cfg.server.idle_timeout)
        else:
            self.state = _WAIT
            self.req_done = True
            self.head_out = out = head_out  # kept for a retry on a stale pooled connection
            self.deadline.clear()
        if req.expect_continue:
            self.transport.write(CONTINUE)
        up = srv.pool.acquire_idle()
        if up is not None:
            self._bind(up, out)  # head and the body in hand: one write upstream
        else:
            self.pending = [out]
            self.pending_size = len(out) - len(head_out)
            self.connect_task = self.loop.create_task(self._connect())
        if after is not None:
            self._body_done(after)
        elif rest:
            self.data_received(rest)  # a pipelined next request (waits in self.buf)

    async def _connect(self) -> None:
        try:
            await self._dial_and_bind()
        except Exception as exc:  # a bug must end this connection, not leave it waiting without a deadline
            log.error("connection failed: unexpected error while connecting upstream", exc_info=exc)
            self.connect_task = None
            if self.state != _CLOSED:
                self.state = _CLOSED
                self._abort_both()

    async def _dial_and_bind(self) -> None:
        try:
            up = await self.srv.pool.connect()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, ProxyError):
                # Never leave a request hanging on a bug: log it once and answer 502 like any failed dial.
                log.error("upstream connect failed unexpectedly", exc_info=exc)
                exc = UpstreamError(f"upstream connect failed: {exc.__class__.__name__}")
            self.connect_task = None
            if self.state != _CLOSED:
                self.srv.metrics.bump(self.srv.metrics.upstream_errors, getattr(exc, "kind", "other"))
                self._upstream_failed(exc)
            return
        self.connect_task = None
        if self.state == _CLOSED:
            self.srv.pool.release(up)
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
        self.deadline.set(self.srv.cfg.server.idle_timeout)
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
        if dec.total > self.srv.cfg.server.max_body_bytes:  # declared sizes count before their data arrives
            raise PayloadTooLarge(f"request body larger than {self.srv.cfg.server.max_body_bytes} bytes")
        out: list[bytes] = []
        n = 0
        for p in pieces:
            n += len(p)
            out += http1.chunk(p)
        if rest is not None:
            out.append(http1.LAST_CHUNK)
        return b"".join(out), rest, n

    def _body_done(self, rest: bytes) -> None:
        self.req_done = True
        self.state = _WAIT
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
            self.state = _CLOSED
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
        keep = req.keep_alive and not self.closing and not self.srv.draining
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
                out += http1.chunk(p)
            else:
                out.append(p)
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def on_response_end(self, reusable: bool) -> None:
        out = [self.pending_head] if self.pending_head else []
        self.pending_head = b""
        if self.framing == _F_CHUNK:
            out.append(http1.LAST_CHUNK)
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
                self.srv.pool.release(up)
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
        self.srv.metrics.bump(self.srv.metrics.upstream_errors, kind)
        self._upstream_failed(exc)

    def _upstream_failed(self, exc: ProxyError) -> None:
        if self.state == _CLOSED:
            return
        if self.started:
            # Part of the response is on its way: reset, so the client cannot take a truncated body as complete.
            self._log(self.status, exc.code)
            self.state = _CLOSED
            self.transport.abort()
        else:
            self._refuse(exc, close=not self.req_done)

    # -- responses the proxy writes itself: the one error-to-status mapping ------------------------------
    def _error_response(self, exc: ProxyError, close: bool) -> bytes:
        body: dict[str, object] = {"error": exc.code, "message": exc.detail}
        if isinstance(exc, (Forbidden, TooManyRequests)):
            body["reason"] = exc.reason
            body["subject"] = self.peer.identity.subject
            body["fingerprint"] = self.peer.identity.fingerprint
        payload = json.dumps(body).encode()
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                % (exc.status, _REASONS.get(exc.status, b"Error"), len(payload)))
        if isinstance(exc, TooManyRequests):
            head += b"Retry-After: %d\r\n" % exc.retry_after
        if close:
            head += CLOSE_LINE
        return head + b"\r\n" + payload

    def _refuse(self, exc: ProxyError, close: bool) -> None:
        """Answer with the error (never forwarded) and either close or wait for the next request."""
        if self.state == _CLOSED:
            return
        close = close or self.closing or self.srv.draining or (self.req is not None and not self.req.keep_alive)
        if self.req is None:
            self.t0 = perf_counter()
        self.status = exc.status
        response = self._error_response(exc, close)
        body = len(response) - response.index(b"\r\n\r\n") - 4
        if self.req is not None and self.req.method == "HEAD":
            # RFC 9110 §9.3.2: no content for HEAD (Content-Length still says what GET would get); on a
            # keep-alive connection the client would read the JSON as the start of the next response.
            response, body = response[:len(response) - body], 0
        self.transport.write(response)
        self.bytes_out = body  # the access log counts the error body the client got, like any other body
        self._log(exc.status, exc.code)
        if close:
            self._close(linger=True)
        else:
            self.keep = True
            self.req_done = True
            self._next()

    # -- end of an exchange -------------------------------------------------------------------------------
    def _next(self) -> None:
        if self.state == _CLOSED:
            return
        if not self.keep or self.closing or self.srv.draining or not self.req_done:
            self._close()
            return
        rest = self.buf
        self.buf = b""
        self._reset_request()
        self.state = _HEAD
        self.deadline.set(self.srv.cfg.server.idle_timeout)
        if self._pipeline_full:
            self._pipeline_full = False
            self._update_reading()
        if rest:
            self._head(rest)

    def _log(self, status: int, error: str | None) -> None:
        srv = self.srv
        req = self.req
        now = perf_counter()
        duration = now - self.t0
        upstream = (self.t_up_end or now) - self.t_up if self.t_up is not None else None
        method = req.method if req is not None else "-"
        srv.metrics.request(method, status, self.rule, duration, upstream)
        # upstream_aborted: part of this request went upstream and that upstream request was cut before the
        # request was complete (a bad chunk or too much body later in the stream, a stalled or vanished client)
        srv.access_log.write(self.peer.log_prefix, self.rule, method, req.target if req is not None else b"-",
                             status, self.bytes_in, self.bytes_out, duration, upstream, error,
                             not self.req_done and self.sent_up)

    def _close(self, linger: bool = False) -> None:
        """Close gracefully: buffered output, then close_notify.  A client that does not read that output within
        ``idle_timeout`` is reset (``_on_timeout``), so a close can never hold the slot for good."""
        self.state = _CLOSED
        self.deadline.set(self.srv.cfg.server.idle_timeout)  # cancelled by connection_lost
        if linger:
            self.transport.close(linger=True)  # type: ignore[call-arg]  # TLSTransport: see Lingerer
        else:
            self.transport.close()

    # -- timeouts, flow control, drain -------------------------------------------------------------------
    def _on_timeout(self) -> None:
        try:
            self._timed_out()
        except Exception as exc:  # a bug must not leave the connection (and its slot) without a deadline
            log.error("connection failed: unexpected error in a timeout", exc_info=exc)
            self.state = _CLOSED
            self._abort_both()

    def _timed_out(self) -> None:
        if self.state == _CLOSED:
            self.transport.abort()  # closed, but the client has not read the rest for idle_timeout
        elif self.state == _HEAD:
            if self.buf.strip(b"\r\n"):
                self._refuse(RequestTimeout("request head not complete within server.header_timeout"), True)
            else:
                self._close()  # idle keep-alive connection
        elif self.state == _BODY and not self.started:
            self._abort_request(RequestTimeout("request body stalled longer than server.idle_timeout"))
        elif self.state != _CLOSED:
            # the client stopped reading the response (or the body) for idle_timeout: give the slot back
            self._log(self.status, "client_timeout")
            self.state = _CLOSED
            self._abort_both()

    def _update_reading(self) -> None:
        pause = self._up_full or self._pending_full or self._pipeline_full
        if pause != self._paused and self.state != _CLOSED:
            self._paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def shutdown(self) -> None:
        """Drain: close now if idle, else let the current exchange finish with ``Connection: close``."""
        self.closing = True
        if self.state == _HEAD and not self.buf:
            self._close()

    def abort(self) -> None:
        if self.state != _CLOSED:
            if self.req is not None:
                self._log(self.status or 503, "shutdown")
            self.state = _CLOSED
        self._abort_both()

    def _abort_both(self) -> None:
        """Close the bound upstream connection (never reused: its exchange is cut) and reset the client's."""
        up = self.up
        self.up = None
        if up is not None:
            up.close()
        self.transport.abort()


def _has_dot_segment(path: str) -> bool:
    """Whether RFC 3986 §5.2.4 would change ``path`` ("." or "..", also as %2e, any case, in any segment)."""
    return any(seg.lower().replace("%2e", ".") in (".", "..") for seg in path.split("/"))


_REASONS = {400: b"Bad Request", 403: b"Forbidden", 408: b"Request Timeout", 413: b"Content Too Large",
            414: b"URI Too Long", 417: b"Expectation Failed", 429: b"Too Many Requests",
            431: b"Request Header Fields Too Large",
            499: b"Client Closed Request", 501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
            504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}
