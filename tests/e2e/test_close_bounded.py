"""End-to-end: a graceful close waiting for a client that never reads is bounded by ``idle_timeout``.

When the upstream has delivered the whole response but the client has not read the end of it, the proxy's close
(close_notify after the buffered bytes) waits for the client.  A client that never reads again must not hold its
connection slot and descriptor for good: it is reset after ``idle_timeout``.

The in-process proxy, so the test can shrink the proxy-side socket's send buffer (SO_SNDBUF disables the kernel's
autotuning): with a small window on both ends, most of a 200 KB response stays in the proxy's transport buffer --
below its high-water mark, so the upstream is never paused and finishes.  The client is a blocking TLS socket in a
thread (the proxy runs on the test's loop).
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

from tests.e2e.kit import Ops, eventually, scrape
from tests.harness import client_ctx, get

BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
IDLE = 1.0


@BOTH_LOOPS
@pytest.mark.parametrize("keep_alive", [False, True], ids=["connection-close", "keep-alive"])
async def test_a_client_that_never_reads_the_end_of_a_response_is_reset_after_idle_timeout(
        keep_alive: bool, ops: Ops) -> None:
    ip = await ops.start(ops.config(await ops.upstream(), server={"idle_timeout": IDLE, "header_timeout": 60.0}))

    def connect() -> ssl.SSLSocket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", ip.port))
        return client_ctx(ops.pki).wrap_socket(sock, server_hostname="localhost", suppress_ragged_eofs=False)

    tls = await asyncio.to_thread(connect)
    try:
        await eventually(lambda: asyncio.sleep(0, len(ip.server.state.connections) == 1))
        (conn,) = ip.server.state.connections
        conn.transport._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        extra = b"" if keep_alive else b"Connection: close\r\n"
        await asyncio.to_thread(tls.sendall, get("/bytes/200000", host="api.test", extra=extra))
        assert await asyncio.to_thread(tls.recv, 1)  # the response started; the client reads nothing more

        # the upstream is done and the proxy holds the rest, waiting (closing, or idle on keep-alive)
        await eventually(lambda: asyncio.sleep(0, conn.up is None and conn.transport.get_write_buffer_size() > 0))

        async def slot_back() -> bool:
            return (await scrape(ip.admin_addr)).get("mtls_proxy_connections_active") == 0

        await eventually(slot_back, timeout=IDLE + 15)
        assert not ip.server.state.connections

        def read_rest() -> bytes:
            got = b""
            while data := tls.recv(65536):
                got += data
            return got

        with pytest.raises((ConnectionResetError, ssl.SSLEOFError)):
            await asyncio.to_thread(read_rest)  # what was in flight, then the reset: never a clean end
    finally:
        tls.close()
