"""Plain-socket helpers shared by the worker and the supervisor: binding, resets, lingering closes.

Owns: ``bind`` (the listening socket, SO_REUSEPORT when several workers share the port), ``abort_socket`` (close
with a TCP reset), and ``Lingerer`` (lingering closes in progress, bounded in number, so a shutdown can end them).

Must not: know about TLS records, HTTP or connections; it takes and closes sockets only.
"""

from __future__ import annotations

import asyncio
import socket
import struct

_LINGER_RST = struct.pack("ii", 1, 0)


def bind(host: str, port: int, reuse_port: bool = False, backlog: int = 1024, listen: bool = True) -> socket.socket:
    """A non-blocking listening socket (SO_REUSEPORT when several workers share the port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def abort_socket(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer must not mistake this for a clean end."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


LINGER_TIMEOUT = 2.0  # seconds a refused client gets to read our alert or error answer before we close anyway


class Lingerer:
    """Lingering closes (RFC 9112 §9.6) in progress, so a shutdown can end them all.

    After the proxy answers an error and closes, the client may still be sending (a body the proxy refused).
    Closing a socket with unread input makes the kernel send a reset, which can destroy the error response
    before the client reads it.  So: close_notify, shut down our sending side, discard what still arrives for up
    to ``timeout`` seconds or ``budget`` bytes, then close.

    A lingering socket no longer holds a connection slot, so at most ``limit`` linger at once (the server passes
    ``max_connections``): beyond that a refused connection is reset at once, and a flood of refused handshakes
    cannot hold more descriptors than the connections the proxy admits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = LINGER_TIMEOUT,
                 budget: int = 16 * 1024 * 1024, limit: int = 10_000) -> None:
        self._loop = loop
        self._timeout = timeout
        self._budget = budget
        self._limit = limit
        self._open: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}

    def __len__(self) -> int:
        return len(self._open)

    def start(self, sock: socket.socket) -> None:
        if len(self._open) >= self._limit:
            abort_socket(sock)
            return
        raw = socket.socket(fileno=sock.detach())
        fd = raw.fileno()
        try:
            raw.setblocking(False)
            raw.shutdown(socket.SHUT_WR)
        except OSError:
            raw.close()
            return
        budget = [self._budget]

        def readable() -> None:
            try:
                data = raw.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            budget[0] -= len(data)
            if not data or budget[0] <= 0:
                self._end(fd)

        self._open[fd] = (raw, self._loop.call_later(self._timeout, self._end, fd))
        self._loop.add_reader(fd, readable)

    def _end(self, fd: int) -> None:
        entry = self._open.pop(fd, None)
        if entry is None:
            return
        raw, timer = entry
        timer.cancel()
        self._loop.remove_reader(fd)
        raw.close()

    def close_all(self) -> None:
        for fd in list(self._open):
            self._end(fd)
