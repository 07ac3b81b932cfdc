"""proxy.sockets.Lingerer: lingering closes are bounded in number; beyond the limit a socket is reset at once.

Plain TCP on loopback (the lingerer only shuts down the sending side and reads what still arrives; TLS plays no
part in that), on both event loops.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from proxy.sockets import Lingerer


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_beyond_the_limit_a_refused_socket_is_reset_not_kept(loop_factory: object) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lingerer = Lingerer(loop, timeout=3600, limit=2)
        listener = socket.create_server(("127.0.0.1", 0))
        clients = []
        try:
            for _ in range(3):
                c = socket.create_connection(listener.getsockname())
                c.settimeout(10)
                clients.append(c)
                server_side, _ = listener.accept()
                lingerer.start(server_side)
            assert len(lingerer) == 2  # the third was not kept lingering
            for c in clients[:2]:  # the lingering ones: our side shut down cleanly (FIN), still open
                assert await asyncio.to_thread(c.recv, 10) == b""
            with pytest.raises(ConnectionResetError):
                await asyncio.to_thread(clients[2].recv, 10)
            lingerer.close_all()
            assert len(lingerer) == 0
        finally:
            for c in clients:
                c.close()
            listener.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[arg-type]
        runner.run(main())
