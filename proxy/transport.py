"""TLS over a non-blocking ``ssl.SSLSocket``: the handshake coroutine and an asyncio transport.

Owns: driving OpenSSL directly on the socket (socket BIO) for both the client-facing and the upstream legs:
the handshake with a deadline, reads and writes with flow control, close_notify on graceful close, a TCP
reset on abort, and lingering closes (after a refused handshake or an error answer: the peer reads it).

Why not asyncio's own SSL transport: (1) when a handshake fails (bad client certificate) asyncio and uvloop drop
the connection without flushing the TLS alert OpenSSL produced, so a partner's curl says "connection reset"
instead of "unknown ca" or "certificate required"; with the socket BIO OpenSSL writes the alert itself.  (2) The
PROXY protocol header must be read with exact reads *before* TLS starts on the same socket, which is trivial on
a plain socket.  (3) It does less work per record: one ``SSL_read``/``SSL_write`` on the socket instead of
copying every record through two memory BIOs.  (4) ``suppress_ragged_eofs=False`` lets the upstream leg tell a
clean close_notify from a truncating TCP FIN.

Like asyncio's own transports, an exception raised by a protocol callback (a bug) is logged once with its
traceback and ends that connection with a reset; the protocol still gets ``connection_lost``, which is where a
client connection gives back its slot.  ``start()`` never raises: once the protocol has been told
``connection_made``, ``connection_lost`` always follows.

Must not: parse HTTP or know about the proxy; protocols see the plain asyncio Transport/Protocol interface.
"""

from __future__ import annotations

import asyncio
import logging
import select
import ssl
from collections.abc import Iterable
from typing import Any

from .openssl import sslobj_handshake
from .sockets import Lingerer, abort_socket
from .tls import pending_function

log = logging.getLogger("mtls_proxy")
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
# One TLS record carries at most 16 KiB of plaintext, and SSL_read returns at most one record.  Asking for much
# more only costs: the C layer allocates the full size and shrinks it, and a 256 KiB request crosses glibc's
# mmap threshold, which measured +40 us per read (a page-faulting mmap/munmap pair each time).
READ_SIZE = 32 * 1024
READ_BUDGET = 256 * 1024  # bytes read in one readiness callback before yielding to other connections


async def handshake(loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, timeout: float) -> None:
    """Run the TLS handshake on a non-blocking SSLSocket within ``timeout`` seconds.

    Raises ``ssl.SSLError`` (OpenSSL has already sent the alert), ``TimeoutError`` or ``OSError``.
    """
    fd = sock.fileno()
    step = sslobj_handshake(sock)
    async with asyncio.timeout(timeout):
        while True:
            try:
                step()
                return
            except ssl.SSLWantReadError:
                await _ready(loop, fd, loop.add_reader, loop.remove_reader)
            except ssl.SSLWantWriteError:
                await _ready(loop, fd, loop.add_writer, loop.remove_writer)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, add: Any, remove: Any) -> None:
    fut = loop.create_future()
    add(fd, _set_done, fut)
    try:
        await fut
    finally:
        remove(fd)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _always() -> int:
    return 1


class TLSTransport(asyncio.Transport):
    """An established TLS connection driven by loop readiness callbacks on its file descriptor."""

    __slots__ = ("_loop", "_sock", "_fd", "_protocol", "_wbuf", "_wsize", "_high", "_low", "_closing",
                 "_closed", "_reading", "_writer_on", "_read_wants_write", "_protocol_paused", "_peer", "_recv",
                 "_send", "_pending", "_lingerer", "_linger", "_at_eof", "_poll")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, protocol: asyncio.Protocol,
                 extra: dict[str, Any] | None = None, lingerer: Lingerer | None = None) -> None:
        super().__init__(extra)
        self._lingerer = lingerer
        self._linger = False
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol = protocol
        self._wbuf: list[bytes] = []
        self._wsize = 0
        self._high = 256 * 1024
        self._low = 64 * 1024
        self._closing = False
        self._closed = False
        self._reading = False
        self._writer_on = False
        self._read_wants_write = False
        self._protocol_paused = False
        self._at_eof = False  # the peer's close_notify was read: it sends nothing more, reading never resumes
        # The C-level TLS object behind the SSLSocket: SSLSocket.recv/send/pending only add Python-level checks
        # that cannot fail here (no flags; suppress_ragged_eofs is False), and this is the per-record hot path.
        tls = getattr(sock, "_sslobj", None)
        if tls is not None and hasattr(tls, "read") and hasattr(tls, "write") and not sock.suppress_ragged_eofs:
            self._recv, self._send = tls.read, tls.write
        else:  # pragma: no cover - other Python implementations
            self._recv, self._send = sock.recv, sock.send
        # With read-ahead (tls.enable_read_ahead) whole records can wait inside OpenSSL where epoll cannot see
        # them: SSL_has_pending tells.  If it cannot be called, never stop reading before OpenSSL says WANT_READ.
        self._pending = pending_function(sock) or _always
        # Whether the kernel holds more for this socket -- bytes, a FIN or an error -- without a read: one poll()
        # with a zero timeout costs less than an SSL_read that ends in SSLWantReadError (a 32 KiB buffer allocated
        # and freed, a recv() that returns EAGAIN, an exception object with its formatted message).
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Hand the connection to the protocol and start reading.  Never raises (see the module docstring)."""
        try:
            self._protocol.connection_made(self)
            if not self._closing and not self._closed:
                self._reading = True
                self._loop.add_reader(self._fd, self._read_ready)
                # One read attempt now, not only when OpenSSL holds decrypted bytes: the handshake may have been
                # driven by the callback uvloop runs once for EPOLLERR before dropping the watcher (see
                # _read_ready), and a reset that came with the client's Finished must not leave the connection
                # waiting for idle_timeout.
                self._loop.call_soon(self._read_ready)
        except Exception as exc:
            self._protocol_failed("connection_made", exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._sock
        if name == "socket":
            return self._sock
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        return super().get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self, linger: bool = False) -> None:
        """Graceful: flush what is buffered, send close_notify, close, then ``connection_lost(None)``.

        ``linger``: the peer may still be sending (we refused its request): close lingering (see Lingerer).
        """
        if self._closing or self._closed:
            return
        self._closing = True
        self._linger = linger and self._lingerer is not None
        self._stop_reading()
        if not self._wbuf:
            self._shutdown()

    def abort(self) -> None:
        """Immediate: drop buffered data and reset the TCP connection."""
        if self._closed:
            return
        self._wbuf.clear()
        self._finish(None, reset=True)

    def _shutdown(self) -> None:
        try:
            # First SSL_shutdown call sends our close_notify; not waiting for the peer's is allowed (RFC 8446 §6.1).
            self._sock.unwrap()
        except ssl.SSLWantWriteError:
            # The kernel send buffer is full (a slow reader took the last of our data): the close_notify waits in
            # OpenSSL.  Closing now would end the stream with a bare FIN, which a peer must treat as truncation.
            self._writer_on = True
            self._loop.add_writer(self._fd, self._shutdown)
            return
        except (ssl.SSLError, OSError, ValueError):
            pass
        self._finish(None, reset=False)

    def _finish(self, exc: BaseException | None, reset: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._stop_reading()
        if self._writer_on:
            self._writer_on = False
            self._loop.remove_writer(self._fd)
        if reset:
            abort_socket(self._sock)
        elif self._linger and self._lingerer is not None:
            self._lingerer.start(self._sock)
        else:
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def _fatal(self, exc: BaseException) -> None:
        self._wbuf.clear()
        self._finish(exc, reset=True)

    def _protocol_failed(self, callback: str, exc: Exception) -> None:
        log.error("connection failed: unexpected error in %s", callback, exc_info=exc)
        self._fatal(exc)

    # -- reading -----------------------------------------------------------------------------------------------
    def is_reading(self) -> bool:
        return self._reading

    def pause_reading(self) -> None:
        if self._reading:
            self._stop_reading()

    def resume_reading(self) -> None:
        if self._reading or self._closing or self._closed or self._at_eof:
            return
        self._reading = True
        if not self._read_wants_write:
            self._loop.add_reader(self._fd, self._read_ready)
        if self._pending():
            self._loop.call_soon(self._read_ready)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._read_wants_write:
                self._loop.remove_reader(self._fd)

    def _read_ready(self) -> None:
        recv = self._recv
        total = 0
        while self._reading:
            try:
                data = recv(READ_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                # The TLS layer must write before it can read (e.g. a key update): wait for writability.
                self._read_wants_write = True
                self._loop.remove_reader(self._fd)
                self._update_writer()
                return
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            if not data:
                self._eof()
                return
            try:
                self._protocol.data_received(data)
            except Exception as exc:
                self._protocol_failed("data_received", exc)
                return
            total += len(data)
            if total >= READ_BUDGET:
                if self._reading and not self._closed:
                    self._loop.call_soon(self._read_ready)  # fairness: let other connections run
                return
            # No early return just because a message was small: read on while OpenSSL holds buffered bytes
            # (SSL_has_pending: with read-ahead whole records wait there, where epoll cannot see them) or the kernel
            # reports the socket readable (more bytes, a FIN, or an error).  uvloop (libuv) answers EPOLLERR -- a
            # peer's reset arriving with or right behind the data -- by running this callback once and then
            # silently dropping the watcher, so an error not read now is never seen and the connection hangs until
            # a timeout; poll() reports POLLERR and POLLHUP whatever was asked, so that error is still read here.
            # Without SSL_has_pending, _pending is _always and the loop reads until SSLWantReadError as before.
            # _reading first: a protocol that closed the transport has freed the SSL* that _pending points at.
            if not self._reading or (not self._pending() and not self._poll.poll(0)):
                return

    def _eof(self) -> None:
        """The peer's close_notify.  The protocol may keep the connection open to write (TLS 1.3 half-close)."""
        self._at_eof = True
        self._stop_reading()
        try:
            keep_open = self._protocol.eof_received()
        except Exception as exc:
            self._protocol_failed("eof_received", exc)
            return
        if not keep_open:
            self.close()

    # -- writing -----------------------------------------------------------------------------------------------
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 256 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_size(self) -> int:
        return self._wsize

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._closed:
            return
        if not data:
            return
        if self._wbuf:
            self._wbuf.append(bytes(data))
            self._wsize += len(data)
            self._check_high()
            return
        try:
            n = self._send(data)
        except _WANT:
            n = 0
        except (ssl.SSLError, OSError) as exc:
            self._fatal(exc)
            return
        if n < len(data):
            rest = bytes(memoryview(data)[n:])
            self._wbuf.append(rest)
            self._wsize = len(rest)
            self._update_writer()
            self._check_high()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        raise NotImplementedError("TLS connections are closed with close(), not half-closed")

    def can_write_eof(self) -> bool:
        return False

    def _check_high(self) -> None:
        if self._wsize > self._high and not self._protocol_paused:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def _update_writer(self) -> None:
        want = bool(self._wbuf) or self._read_wants_write
        if want and not self._writer_on:
            self._writer_on = True
            self._loop.add_writer(self._fd, self._write_ready)
        elif not want and self._writer_on:
            self._writer_on = False
            self._loop.remove_writer(self._fd)

    def _write_ready(self) -> None:
        if self._read_wants_write:
            self._read_wants_write = False
            if self._reading:
                self._loop.add_reader(self._fd, self._read_ready)
                self._loop.call_soon(self._read_ready)
        if self._wbuf:
            # Retry with a buffer that starts with the same bytes and is no shorter (OpenSSL's retry rule).
            data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
            try:
                n = self._send(data)
            except _WANT:
                n = 0
            except (ssl.SSLError, OSError) as exc:
                self._fatal(exc)
                return
            rest = data[n:]
            self._wbuf = [rest] if rest else []
            self._wsize = len(rest)
            if self._protocol_paused and self._wsize <= self._low:
                self._protocol_paused = False
                try:
                    self._protocol.resume_writing()
                except Exception as exc:
                    self._protocol_failed("resume_writing", exc)
                    return
        self._update_writer()
        if not self._wbuf and self._closing and not self._closed:
            self._shutdown()
