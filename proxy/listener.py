"""Accepting client connections: limits, the PROXY v2 header, the TLS handshake, then the connection.

Owns: the accept loop on the listening socket, ``max_connections`` (a slot from ``proxy.slots`` per accepted
socket; beyond the limit a connection is reset at once and counted), reading exactly the PROXY protocol v2 header (16 bytes, then exactly the announced length — never a
byte of the ClientHello behind it) within ``proxy_protocol_timeout``, the TLS handshake within
``handshake_timeout`` on the snapshot current at accept time, counting and logging handshake failures by
OpenSSL's reason, and handing the verified connection (and its slot) to ``ClientConnection``.

Every accepted socket ends in ``Incoming._close`` -- which releases its slot -- until the hand-over; after it the
TLS transport and the connection own both.  An unexpected exception while one connection is set up or
handshaking is logged once with its traceback and ends that connection (reset, slot released); it never escapes
into the accept loop, where it would drop the rest of the accept batch and leak the slot.

Must not: parse the PROXY header itself (``proxy.wire.proxy_protocol``) or HTTP.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from .wire import proxy_protocol as pp
from .connection import ClientConnection
from .identity import IdentityError
from .slots import Slot
from .openssl import sslobj_handshake
from .tls import handshake_failure_detail, handshake_failure_reason, peer_chains
from .sockets import abort_socket
from .transport import TLSTransport

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger("mtls_proxy")
ACCEPT_BATCH = 64  # connections accepted per readiness event before other work gets a turn


class Listener:
    """Accepts on the listening socket from a readiness callback (registered once, not per accept)."""

    def __init__(self, shared: ServerState, sock: socket.socket) -> None:
        self.shared = shared
        self.sock = sock
        self.incoming: set[Incoming] = set()
        self._paused: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.shared.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        shared = self.shared
        slots = shared.slots
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors or memory: stop accepting for a moment instead of spinning.
                    log.error("accept failed: %s; pausing accepts for 100 ms", exc.strerror)
                    shared.loop.remove_reader(self.sock.fileno())
                    self._paused = shared.loop.call_later(0.1, self._resume)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the client gave up while queued
                raise
            shared.metrics.connections_total += 1
            slot = slots.take()
            if slot is None:
                shared.metrics.connections_rejected += 1
                abort_socket(conn)
                continue
            inc = Incoming(self, conn, addr[0], slot)
            try:
                inc.start()
            except Exception as exc:  # a bug must cost one connection, never the accept loop or a slot
                inc.unexpected("connection setup failed", exc)

    def _resume(self) -> None:
        self._paused = None
        self.start()

    def close(self) -> None:
        loop = self.shared.loop
        if self._paused is not None:
            self._paused.cancel()
        else:
            try:
                loop.remove_reader(self.sock.fileno())
            except (OSError, ValueError):
                pass
        self.sock.close()
        for inc in list(self.incoming):
            try:
                inc.abort()
            except Exception as exc:
                inc.unexpected("connection abort failed", exc)


class Incoming:
    """One accepted socket until it is a verified TLS connection, driven by readiness callbacks.

    The fd is registered with the loop once, here, and the callback is replaced (no system call) when the
    ``TLSTransport`` takes over: with uvloop every add/remove of a reader costs several epoll_ctl/ioctl calls,
    which per connection cost more than the PROXY header and handshake logic.  States: reading the PROXY header
    (exactly 16 bytes, then exactly the announced length — never a byte of the ClientHello behind it), then the
    TLS handshake on the same socket.
    """

    __slots__ = ("lst", "shared", "loop", "sock", "fd", "peer_addr", "client_addr", "vpce_id", "local", "buf", "need",
                 "tls", "timer", "writer", "done", "rt", "slot", "do_handshake")

    def __init__(self, lst: Listener, conn: socket.socket, peer_addr: str, slot: Slot) -> None:
        # Only attribute assignments: every state _close() may see is set before anything can fail.
        self.lst = lst
        self.shared = lst.shared
        self.loop = lst.shared.loop
        self.sock: socket.socket = conn
        self.fd = conn.fileno()
        self.slot = slot
        self.peer_addr = self.client_addr = peer_addr
        self.vpce_id: str | None = None
        self.local = False
        self.buf = b""
        self.need = 0
        self.tls = False
        self.timer: asyncio.TimerHandle | None = None
        self.writer = False
        self.done = False
        self.rt = None
        self.do_handshake: Callable[[], None] | None = None  # one handshake step, once TLS has started

    def start(self) -> None:
        cfg = self.shared.cfg.server
        conn = self.sock
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self._close(reset=True)  # the peer is already gone
            return
        self.lst.incoming.add(self)
        if cfg.proxy_protocol:
            self.need = pp.PREFIX_LEN
            self.timer = self.loop.call_later(cfg.proxy_protocol_timeout, self._timeout)
        else:
            self._start_tls()
            if self.done:
                return
        self.loop.add_reader(self.fd, self._step)

    # -- PROXY header --------------------------------------------------------------------------------------
    def _step(self) -> None:
        if self.done:
            return
        try:
            if self.tls:
                self._handshake()
            else:
                self._read_header()
        except Exception as exc:
            self.unexpected("connection setup failed", exc)

    def _read_header(self) -> None:
        # Read on until the socket has nothing more (EAGAIN), not once per callback: uvloop (libuv) answers
        # EPOLLERR -- a reset right behind the bytes -- by running this callback once and then dropping the
        # watcher, so a reset not read now would leave the socket (and its slot) waiting for proxy_protocol_timeout.
        while True:
            try:
                chunk = self.sock.recv(self.need - len(self.buf))  # never past the header: TLS bytes stay queued
            except BlockingIOError:
                return
            except OSError:
                self._close(reset=True)
                return
            if not chunk:
                self._proxy_error(pp.ProxyProtocolError("truncated", "connection closed inside the PROXY header"))
                return
            self.buf += chunk
            if len(self.buf) < self.need:
                continue
            try:
                if self.need == pp.PREFIX_LEN:
                    self.need += pp.remaining_length(self.buf)
                    if len(self.buf) < self.need:
                        continue
                info = pp.parse(self.buf)
            except pp.ProxyProtocolError as exc:
                self._proxy_error(exc)
                return
            break
        self.local = info.local
        if info.src_addr is not None:
            self.client_addr = info.src_addr
        self.vpce_id = info.vpce_id
        self.buf = b""
        if self.timer is not None:
            self.timer.cancel()
        self._start_tls()
        if not self.done:
            self._handshake()  # the ClientHello may already be queued behind the header

    def _proxy_error(self, exc: pp.ProxyProtocolError) -> None:
        shared = self.shared
        shared.metrics.bump(shared.metrics.proxy_protocol_errors, exc.reason)
        log.warning("proxy protocol error", extra={"fields": {"peer": self.peer_addr, "error": str(exc)}})
        self._close(reset=True)

    # -- TLS handshake ---------------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        shared = self.shared
        self.tls = True
        rt = shared.runtime  # the snapshot current at accept time: a reload swaps it for later connections
        try:
            # A peer that reset before TLS starts leaves a socket that is no longer connected (ENOTCONN).
            # wrap_socket would detach the descriptor into the SSLSocket it builds, probe it with recv(1), get
            # ECONNRESET and raise -- leaving that descriptor owned by an object only the exception references.
            # Seen here first, it is an ordinary reset: closed at once, its slot released.
            self.sock.getpeername()
        except OSError:
            self._close(reset=True)
            return
        try:
            self.sock = rt.server_context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False,
                                                      suppress_ragged_eofs=False)
        except OSError:
            # The reset came between the check above and wrap_socket's own: our socket object is detached (closing
            # it is a no-op) and the half-built SSLSocket closes the descriptor when this exception is freed, at
            # the end of this block -- after _close has unregistered it from the loop.
            self._close(reset=True)
            return
        self.rt = rt
        self.do_handshake = sslobj_handshake(self.sock)  # type: ignore[arg-type]
        self.timer = self.loop.call_later(shared.cfg.server.handshake_timeout, self._timeout)

    def _handshake(self) -> None:
        assert self.do_handshake is not None  # set by _start_tls, which ends the connection when it cannot
        try:
            self.do_handshake()
        except ssl.SSLWantReadError:
            if self.writer:
                self.writer = False
                self.loop.remove_writer(self.fd)
            return
        except ssl.SSLWantWriteError:
            if not self.writer:  # the kernel send buffer is full: rare during a handshake
                self.writer = True
                self.loop.add_writer(self.fd, self._step)
            return
        except (ssl.SSLError, OSError) as exc:
            self._failed(exc)
            return
        self._verified()

    def _timeout(self) -> None:
        if self.done:
            return
        try:
            self._timed_out()
        except Exception as exc:
            self.unexpected("connection setup failed", exc)

    def _timed_out(self) -> None:
        if not self.tls:
            self._proxy_error(pp.ProxyProtocolError(
                "truncated", "PROXY header not complete within proxy_protocol_timeout"))
        else:
            self._failed(TimeoutError("TLS handshake not complete within handshake_timeout"))

    def _failed(self, exc: BaseException) -> None:
        shared = self.shared
        if self.local and not isinstance(exc, ssl.SSLCertVerificationError):
            self._close(reset=True)  # an NLB health-check connection (PROXY LOCAL) that closed: not a failure
            return
        reason = handshake_failure_reason(exc)
        shared.metrics.handshake_failures[reason] += 1
        log.info("tls handshake failed", extra={"fields": {
            "client": self.client_addr, "vpce": self.vpce_id, "reason": reason,
            "detail": handshake_failure_detail(exc)}})
        # OpenSSL sent the alert.  A reset right behind it can overtake a TLS 1.3 client, which has finished its
        # side of the handshake (RFC 8446 §4.4.2) and reads only after sending its request: curl then fails with
        # "getpeername() failed" (exit 55) instead of naming the alert.  So: a lingering close.
        self._close(reset=not isinstance(exc, ssl.SSLError), linger=isinstance(exc, ssl.SSLError))

    def _verified(self) -> None:
        shared = self.shared
        sock: ssl.SSLSocket = self.sock  # type: ignore[assignment]
        try:
            chains = peer_chains(sock) if self.rt.cfg.identity.client_cert_header else None
            peer = self.rt.peer(sock.getpeercert(binary_form=True), self.client_addr, self.vpce_id, chains)
        except IdentityError as exc:
            # OpenSSL verified it but it cannot be turned into identity headers: refused, and counted.
            shared.metrics.handshake_failures["other"] += 1
            log.warning("unusable client certificate", extra={"fields": {"client": self.client_addr,
                                                                         "error": str(exc)}})
            self._close(reset=True)
            return
        proto = ClientConnection(shared, peer, self.slot)
        transport = TLSTransport(self.loop, sock, proto, lingerer=shared.lingerer)
        # From here the transport owns the socket and the connection owns the slot: the transport always ends in
        # connection_lost, which releases it.  start() takes over the reader callback and never raises.
        self._finish_handshake()
        transport.start()

    # -- endings ---------------------------------------------------------------------------------------------
    def _finish_handshake(self) -> None:
        self.done = True
        self.lst.incoming.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.writer:
            self.writer = False
            self.loop.remove_writer(self.fd)

    def _close(self, reset: bool, linger: bool = False) -> None:
        """The one end of a connection that never reached ``ClientConnection``: socket closed, slot released."""
        if self.done:
            return
        try:
            self._finish_handshake()
            try:
                self.loop.remove_reader(self.fd)
            except (OSError, ValueError):
                pass
            if linger:
                self.shared.lingerer.start(self.sock)
            elif reset:
                abort_socket(self.sock)
            else:
                self.sock.close()
        finally:
            self.slot.release()  # may be the last slot a drain waits for

    def abort(self) -> None:
        self._close(reset=True)

    def unexpected(self, what: str, exc: BaseException) -> None:
        """A bug while this connection was set up: log it once, reset the connection, give its slot back."""
        log.error(what, exc_info=exc, extra={"fields": {"client": self.client_addr}})
        if self.done:
            return  # already handed over or closed: its owner ends it
        try:
            self._close(reset=True)  # releases the slot even when closing fails (its finally)
        except Exception as again:
            log.error("connection close failed", exc_info=again, extra={"fields": {"client": self.client_addr}})
