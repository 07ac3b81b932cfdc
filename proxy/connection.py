"""One client connection: bytes in from a verified TLS transport, one exchange at a time, then close.

Owns: the per-connection request loop (keep-alive and pipelining: a pipelined request waits in the buffer, bounded,
until the exchange before it ends), reading and checking each request head before anything goes upstream (the
policy decision, ``max_body_bytes``, API Gateway's head limit, the partner gate), the TLS 1.3 half-close, timeouts
(idle, header, body, stalled writes), flow control in both directions, the drain, and closing.  What happens to a
request once it is admitted (body upstream, response back, the log line) is ``proxy.exchange``'s, this class's base.

Per-connection facts (identity, the header block added to every request, the policy pre-filtered for this
certificate, the access-log prefix) are computed once, in the ``Peer`` the listener hands over, before the first
byte is read.

Per request, after the policy allows it: the head-size check against API Gateway's limit (431
``identity_too_large`` when what the proxy adds is what pushes it over) and the partner gate (``proxy.partners``: one
dict lookup; the rule's rate limit, 429 with ``Retry-After``; the certificate recorded for ``/certs`` the first
time a rule allows a request on this connection).  A refused request is never forwarded: every check runs before
any upstream write.

The connection holds its slot under ``max_connections`` (``proxy.slots``) from the hand-over until
``connection_lost``, which releases it in a ``finally``: the transport always ends in ``connection_lost``, and
every way this class ends a connection goes through the transport (``_close``, ``abort``).  A graceful close
with output still buffered is bounded too: a client that stops reading is reset after ``idle_timeout``.

Must not: parse bytes itself (``proxy.wire.http1``), build header values (``proxy.wire.headers``), see the server
object (only the ``ServerState`` it shares with its siblings), or dial (``proxy.upstream``).
"""

from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import TYPE_CHECKING

from .deadline import Deadline
from .errors import BadRequest, Forbidden, IdentityTooLarge, PayloadTooLarge, ProxyError, RequestTimeout, TooManyRequests
from .exchange import BODY, CLOSED, HEAD, WAIT, Exchange
from .partners import FIRST
from .ratelimit import retry_after_seconds
from .wire import chunked, http1
from .wire.headers import SPOOFABLE, request_head
from .wire.paths import has_dot_segment, normalize_path

if TYPE_CHECKING:
    from .runtime import Peer
    from .slots import Slot
    from .state import ServerState

log = logging.getLogger("mtls_proxy")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
PIPELINE_LIMIT = http1.MAX_HEAD  # buffered bytes of a pipelined next request before reading pauses
# API Gateway's quota on "the total combined size of request line and header values".  Counted here as the whole
# head the proxy sends (names, CRLFs and the blank line too): a little more than the gateway counts, so the proxy
# never forwards a request the gateway would refuse for size because of what the proxy added.
GATEWAY_HEAD_LIMIT = 10240
HEAD_CACHE_MAX = 2048  # the largest request head remembered for reuse (ClientConnection._last_head)


class ClientConnection(Exchange, asyncio.Protocol):
    def __init__(self, shared: ServerState, peer: Peer, slot: Slot | None = None) -> None:
        self.shared = shared
        self.peer = peer
        self.slot = slot
        self.gate = shared.partners.gate(peer.identity, peer.limits)
        self.loop = shared.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.state = HEAD
        self.buf = b""
        self.closing = False  # finish the current exchange, then close (drain or Connection: close)
        self.deadline = Deadline(self.loop, self._on_timeout)
        self._up_full = False
        self._pending_full = False
        self._pipeline_full = False
        self._paused = False
        # The last request head parsed on this connection and its result: keep-alive clients usually repeat a
        # head byte for byte, and parse_request_head is a pure function of the bytes, so an identical head is
        # not parsed again.  Policy, limits, identity headers and the log line still run for every request.
        # Only heads up to HEAD_CACHE_MAX are kept: with the parse's fields slice, at most ~4 KiB per idle
        # connection (a typical head of a few hundred bytes costs well under 1 KiB).
        self._last_head = b""
        self._last_req: http1.RequestHead | None = None
        self._reset_request()

    # -- asyncio.Protocol: client side ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.shared.connection_opened(self)
        self.deadline.set(self.shared.cfg.server.idle_timeout)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == BODY:
            self._body(data)
        elif state == HEAD:
            self._head(data)
        elif state == WAIT:
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
        if self.state not in (WAIT, BODY) or self.req is None or not self._half_close_allowed():
            return False
        self.closing = True  # no next request; the response says Connection: close
        if self.state == BODY and not self.req_done:
            self._abort_request(BadRequest("the client closed its sending side before the request body ended"))
        return True

    def _half_close_allowed(self) -> bool:
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object is not None and ssl_object.version() == "TLSv1.3"

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = CLOSED
        try:
            self.deadline.cancel()
            if self.connect_task is not None:
                self.connect_task.cancel()
            up = self.up
            if up is not None:
                self.up = None
                up.close()
            if self.req is not None and was in (BODY, WAIT):
                self._log(499 if not self.started else self.status, "client_closed")
        finally:
            self.shared.connection_closed(self)
            if self.slot is not None:
                self.slot.release()  # may be the last slot a drain waits for

    def pause_writing(self) -> None:
        # The client is slower than the upstream: stop reading the upstream, bound the wait.
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()
        self.deadline.set(self.shared.cfg.server.idle_timeout)

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()
        if self.state == WAIT:
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
                self.deadline.set(self.shared.cfg.server.header_timeout)
            self.buf = data
            return
        self._start(data[:end], data[end:])

    def _start(self, head: bytes, rest: bytes) -> None:
        shared = self.shared
        self.t0 = perf_counter()
        if head == self._last_head:
            req = self._last_req  # type: ignore[assignment]  # set together with _last_head
        else:
            try:
                req = http1.parse_request_head(head, SPOOFABLE)
            except ProxyError as exc:
                self._refuse(exc, close=True)
                return
            if len(head) <= HEAD_CACHE_MAX:
                self._last_head = head
                self._last_req = req
        self.req = req
        path = normalize_path(req.path)
        decision = self.peer.policy.decide(req.method, path)
        if not decision.allowed:
            shared.metrics.bump(shared.metrics.denied, decision.reason)
            self.buf = rest  # a pipelined next request (RFC 9112 §9.3.2): _next() answers it after this 403
            self._refuse(Forbidden(decision.detail, decision.reason), close=req.has_body or not req.keep_alive)
            return
        self.rule = decision.rule
        cfg = shared.cfg
        if req.content_length is not None and req.content_length > cfg.server.max_body_bytes:
            self._refuse(PayloadTooLarge(f"request body larger than {cfg.server.max_body_bytes} bytes"), close=True)
            return
        # Byte-exact (the upstream sees what the client sent) unless dot segments were removed: then the upstream
        # gets the path the policy matched, so a rule can never be bypassed with '..'.  Decoded %XX of unreserved characters alone is no reason to rewrite (RFC 3986 §6.2.2.2).
        target = (req.target if path is req.path or not has_dot_segment(req.path)
                  else path.encode("ascii") + req.query)
        if shared.base_path:
            target = shared.base_path + target
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
            shared.metrics.bump(shared.metrics.denied, "rate_limited")
            self.buf = rest
            self._refuse(TooManyRequests(f"rate limit of rule {decision.rule!r} exceeded for this client certificate",
                                         retry_after_seconds(wait)), close=req.has_body or not req.keep_alive)
            return
        after: bytes | None = None  # the bytes behind a body that is complete in ``rest``
        if req.has_body:
            self.state = BODY
            body = b""
            if req.chunked:
                self.decoder = chunked.ChunkedDecoder()
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
            self.state = WAIT
            self.req_done = True
            self.head_out = out = head_out  # kept for a retry on a stale pooled connection
            self.deadline.clear()
        if req.expect_continue:
            self.transport.write(CONTINUE)
        up = shared.pool.acquire_idle()
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

    # -- end of an exchange -------------------------------------------------------------------------------
    def _next(self) -> None:
        if self.state == CLOSED:
            return
        if not self.keep or self.closing or self.shared.draining or not self.req_done:
            self._close()
            return
        rest = self.buf
        self.buf = b""
        self._reset_request()
        self.state = HEAD
        self.deadline.set(self.shared.cfg.server.idle_timeout)
        if self._pipeline_full:
            self._pipeline_full = False
            self._update_reading()
        if rest:
            self._head(rest)

    def _close(self, linger: bool = False) -> None:
        """Close gracefully: buffered output, then close_notify.  A client that does not read that output within
        ``idle_timeout`` is reset (``_on_timeout``), so a close can never hold the slot for good."""
        self.state = CLOSED
        self.deadline.set(self.shared.cfg.server.idle_timeout)  # cancelled by connection_lost
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
            self.state = CLOSED
            self._abort_both()

    def _timed_out(self) -> None:
        if self.state == CLOSED:
            self.transport.abort()  # closed, but the client has not read the rest for idle_timeout
        elif self.state == HEAD:
            if self.buf.strip(b"\r\n"):
                self._refuse(RequestTimeout("request head not complete within server.header_timeout"), True)
            else:
                self._close()  # idle keep-alive connection
        elif self.state == BODY and not self.started:
            self._abort_request(RequestTimeout("request body stalled longer than server.idle_timeout"))
        elif self.state != CLOSED:
            # the client stopped reading the response (or the body) for idle_timeout: give the slot back
            self._log(self.status, "client_timeout")
            self.state = CLOSED
            self._abort_both()

    def _update_reading(self) -> None:
        pause = self._up_full or self._pending_full or self._pipeline_full
        if pause != self._paused and self.state != CLOSED:
            self._paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def shutdown(self) -> None:
        """Drain: close now if idle, else let the current exchange finish with ``Connection: close``."""
        self.closing = True
        if self.state == HEAD and not self.buf:
            self._close()

    def abort(self) -> None:
        if self.state != CLOSED:
            if self.req is not None:
                self._log(self.status or 503, "shutdown")
            self.state = CLOSED
        self._abort_both()

    def _abort_both(self) -> None:
        """Close the bound upstream connection (never reused: its exchange is cut) and reset the client's."""
        up = self.up
        self.up = None
        if up is not None:
            up.close()
        self.transport.abort()
