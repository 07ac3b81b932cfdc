"""Accepting client connections: limits, the PROXY v2 header, the TLS handshake, then the connection.

Owns: the accept loop on the listening socket, ``max_connections`` (excess connections are reset at once and
counted), reading exactly the PROXY protocol v2 header (16 bytes, then exactly the announced length — never a
byte of the ClientHello behind it) within ``proxy_protocol_timeout``, the TLS handshake within
``handshake_timeout`` on the snapshot current at accept time, counting and logging handshake failures by
OpenSSL's reason, and handing the verified connection to ``ClientConnection``.

Must not: parse the PROXY header itself (``proxy.proxy_protocol``) or HTTP.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from . import proxy_protocol as pp
from .connection import ClientConnection
from .identity import IdentityError
from .tls import handshake_failure_detail, handshake_failure_reason
from .transport import TLSTransport, abort_socket, handshake

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger("mtls_proxy")


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


async def read_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))  # never more than asked: the ClientHello stays queued
        if not chunk:
            raise pp.ProxyProtocolError("truncated", "connection closed inside the PROXY header")
        buf += chunk
    return buf


async def read_proxy_header(loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float) -> pp.ProxyInfo:
    try:
        async with asyncio.timeout(timeout):
            prefix = await read_exact(loop, sock, pp.PREFIX_LEN)
            rest = await read_exact(loop, sock, pp.remaining_length(prefix))
    except TimeoutError:
        raise pp.ProxyProtocolError("truncated", "PROXY header not complete within proxy_protocol_timeout") from None
    return pp.parse(prefix + rest)


class Listener:
    def __init__(self, server: ProxyServer, sock: socket.socket) -> None:
        self.srv = server
        self.sock = sock
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        srv = self.srv
        loop = srv.loop
        limit = srv.cfg.server.max_connections
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s; pausing accepts for 100 ms", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                raise
            srv.metrics.connections_total += 1
            if srv.active >= limit:
                srv.metrics.connections_rejected += 1
                abort_socket(conn)
                continue
            srv.active += 1
            srv.metrics.connections_active = srv.active
            task = loop.create_task(self._handle(conn, addr[0]))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _handle(self, conn: socket.socket, peer_addr: str) -> None:
        srv = self.srv
        cfg = srv.cfg.server
        loop = srv.loop
        sock: socket.socket = conn  # whatever must be closed if we do not hand over
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_addr, vpce_id, local = peer_addr, None, False
            if cfg.proxy_protocol:
                try:
                    info = await read_proxy_header(loop, conn, cfg.proxy_protocol_timeout)
                except pp.ProxyProtocolError as exc:
                    srv.metrics.bump(srv.metrics.proxy_protocol_errors, exc.reason)
                    log.warning("proxy protocol error", extra={"fields": {"peer": peer_addr, "error": str(exc)}})
                    return
                local = info.local
                if info.src_addr is not None:
                    client_addr = info.src_addr
                vpce_id = info.vpce_id
            rt = srv.runtime
            sock = rt.server_context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False,
                                                 suppress_ragged_eofs=False)
            try:
                await handshake(loop, sock, cfg.handshake_timeout)  # type: ignore[arg-type]
            except (ssl.SSLError, OSError, TimeoutError) as exc:
                if local and not isinstance(exc, ssl.SSLCertVerificationError):
                    return  # an NLB health-check connection (PROXY LOCAL) that closed: not a failure
                reason = handshake_failure_reason(exc)
                srv.metrics.handshake_failures[reason] += 1
                log.info("tls handshake failed", extra={"fields": {
                    "client": client_addr, "vpce": vpce_id, "reason": reason,
                    "detail": handshake_failure_detail(exc)}})
                if isinstance(exc, ssl.SSLError):
                    # OpenSSL sent the alert.  A reset right behind it can overtake a TLS 1.3 client, which has
                    # finished its side of the handshake (RFC 8446 §4.4.2) and reads only after sending its
                    # request: curl then fails with "getpeername() failed" (exit 55) instead of naming the alert.
                    srv.lingerer.start(sock)
                return
            try:
                peer = rt.peer(sock.getpeercert(binary_form=True), client_addr, vpce_id)  # type: ignore[attr-defined]
            except IdentityError as exc:
                log.warning("unusable client certificate", extra={"fields": {"client": client_addr,
                                                                             "error": str(exc)}})
                return
            proto = ClientConnection(srv, peer)
            transport = TLSTransport(loop, sock, proto, lingerer=srv.lingerer)  # type: ignore[arg-type]
            sock = None  # type: ignore[assignment]
            transport.start()
        except OSError:
            pass  # the peer went away before TLS started
        finally:
            if sock is not None:
                abort_socket(sock)
                srv.slot_released()  # may be the last socket a drain waits for (e.g. cancelled mid-handshake)

    def close(self) -> None:
        self.sock.close()
        for task in self.tasks:
            task.cancel()
