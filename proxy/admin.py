"""The plain-HTTP admin port: ``/healthz``, ``/readyz``, ``/metrics``.

Owns: serving liveness (the event loop answered), readiness (listening with certificates loaded and not
draining; never dependent on the upstream, so an API outage cannot take every task out of the NLB), and
Prometheus metrics (text format, or OpenMetrics when the scraper asks for it) from an injected source of
snapshots on a private registry.

NLB health checks to this port carry a PROXY protocol v2 header when the target group has it enabled, so an
optional v2 header at the start of a connection is read and dropped before aiohttp sees the bytes (its 12-byte
signature cannot start an HTTP request).

Must not: expose anything that changes state; it is unauthenticated and plain HTTP (bind it to a private
address).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from . import proxy_protocol as pp
from .config import Address
from .metrics import Snapshot, registry_for


class _StripProxyHeader(asyncio.Protocol):
    """Wraps aiohttp's protocol: removes one leading PROXY v2 header, then passes everything through."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.buf = b""
        self.passing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.passing:
            self.inner.data_received(data)
            return
        buf = self.buf + data
        sig = pp.SIGNATURE
        if not sig.startswith(buf[:len(sig)]):
            self.passing = True  # not a PROXY header: plain HTTP
            self.buf = b""
            self.inner.data_received(buf)
            return
        if len(buf) < pp.PREFIX_LEN:
            self.buf = buf
            return
        try:
            total = pp.PREFIX_LEN + pp.remaining_length(buf[:pp.PREFIX_LEN])
        except pp.ProxyProtocolError:
            assert self.transport is not None
            self.transport.close()
            return
        if len(buf) < total:
            self.buf = buf
            return
        self.passing = True
        self.buf = b""
        if len(buf) > total:
            self.inner.data_received(buf[total:])

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class AdminServer:
    def __init__(self, listen: Address, *, ready: Callable[[], bool], snapshots: Callable[[], list[Snapshot]],
                 proxy_protocol: bool = False) -> None:
        self.listen = listen
        self._ready = ready
        self._registry = registry_for(snapshots)
        self._proxy_protocol = proxy_protocol
        self._server: asyncio.AbstractServer | None = None
        self._web: web.Server | None = None
        self.address: tuple[str, int] | None = None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, text="method not allowed\n")
        if path == "/healthz":
            return web.Response(text="ok\n")
        if path == "/readyz":
            if self._ready():
                return web.Response(text="ready\n")
            return web.Response(status=503, text="not ready\n")
        if path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            body = encoder(self._registry)
            return web.Response(body=body, headers={"Content-Type": content_type})
        return web.Response(status=404, text="not found\n")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._web = web.Server(self._handle, access_log=None)
        factory: Callable[[], asyncio.Protocol] = self._web  # type: ignore[assignment]
        if self._proxy_protocol:
            web_factory = self._web
            factory = lambda: _StripProxyHeader(web_factory())  # noqa: E731
        self._server = await loop.create_server(factory, self.listen.host, self.listen.port, reuse_address=True)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            if self._web is not None:
                await self._web.shutdown(1.0)
            await self._server.wait_closed()
            self._server = None
