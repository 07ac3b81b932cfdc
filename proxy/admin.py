"""The plain-HTTP admin port: ``/healthz``, ``/readyz``, ``/metrics``, ``/certs``.

Owns: serving liveness (the event loop answered), readiness (listening with certificates loaded and not
draining; never dependent on the upstream, so an API outage cannot take every task out of the NLB), and
Prometheus metrics (text format, or OpenMetrics when the scraper asks for it) from an injected source of
snapshots on a private registry, and the client certificates each allow rule let in (JSON, from an injected
source: proxy.cert_tracker's report).

NLB health checks to this port carry a PROXY protocol v2 header when the target group has it enabled, so with
``proxy_protocol`` an optional v2 header at the start of a connection is read and dropped (its 12-byte signature
cannot start an HTTP request).

Why a small asyncio protocol on ``proxy.wire.http1`` and not aiohttp's server: three fixed GET endpoints do not need
a web framework, and importing aiohttp's server costs every worker about 14 MB of resident memory (measured),
over a third of the 40 MB an idle worker may use.  The strict parser also means the admin port refuses the same
malformed input as the proxy port.

Must not: expose anything that changes state; it is unauthenticated and plain HTTP (bind it to a private
address).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .wire import http1
from .wire import proxy_protocol as pp
from .config import Address
from .errors import ProxyError
from .metrics import Snapshot, registry_for
from .wire.grammar import reason_phrase

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

IDLE_TIMEOUT = 30.0
MAX_HEAD = 8 * 1024


class _AdminConnection(asyncio.Protocol):
    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.buf = b""
        self.expect_proxy = admin.proxy_protocol
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.admin.connections.add(self)
        self._arm()

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        self.timer = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.admin.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data
        if self.expect_proxy:
            sig = pp.SIGNATURE
            if sig.startswith(buf[:len(sig)]):
                if len(buf) < pp.PREFIX_LEN:
                    self.buf = buf
                    return
                try:
                    total = pp.PREFIX_LEN + pp.remaining_length(buf[:pp.PREFIX_LEN])
                except pp.ProxyProtocolError:
                    self.transport.close()
                    return
                if len(buf) < total:
                    self.buf = buf
                    return
                buf = buf[total:]
            self.expect_proxy = False  # only a leading header is tolerated
        while buf and not self.transport.is_closing():
            try:
                end = http1.find_head_end(buf, MAX_HEAD)
            except ProxyError as exc:
                self._respond(exc.status, b"bad request\n", close=True)
                return
            if end < 0:
                break
            head, buf = buf[:end], buf[end:]
            try:
                req = http1.parse_request_head(head)
            except ProxyError as exc:
                self._respond(exc.status, b"bad request\n", close=True)
                return
            self._handle(req, close=not req.keep_alive or req.has_body)
            self._arm()
        self.buf = buf

    def _handle(self, req: http1.RequestHead, close: bool) -> None:
        admin = self.admin
        if req.method not in ("GET", "HEAD"):
            self._respond(405, b"method not allowed\n", close)
            return
        head_only = req.method == "HEAD"
        if req.path == "/healthz":
            self._respond(200, b"ok\n", close, head_only=head_only)
        elif req.path == "/readyz":
            if admin.ready():
                self._respond(200, b"ready\n", close, head_only=head_only)
            else:
                self._respond(503, b"not ready\n", close, head_only=head_only)
        elif req.path == "/metrics":
            accept = ""
            for line in req.fields.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"accept":
                    accept = value.strip().decode("latin-1")
            from prometheus_client.exposition import choose_encoder  # loaded at the first scrape (see metrics.py)

            encoder, content_type = choose_encoder(accept)
            self._respond(200, encoder(admin.registry), close, content_type=content_type, head_only=head_only)
        elif req.path == "/certs":
            body = json.dumps(admin.certs(), indent=1).encode() + b"\n"
            self._respond(200, body, close, content_type="application/json", head_only=head_only)
        else:
            self._respond(404, b"not found\n", close, head_only=head_only)

    def _respond(self, status: int, body: bytes, close: bool, content_type: str = "text/plain; charset=utf-8",
                 head_only: bool = False) -> None:
        assert self.transport is not None
        reason = reason_phrase(status)
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nCache-Control: no-store\r\n%s\r\n"
                % (status, reason, content_type.encode(), len(body), b"Connection: close\r\n" if close else b""))
        self.transport.write(head if head_only else head + body)
        if close:
            self.transport.close()


class AdminServer:
    @property
    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            self._registry = registry_for(self._snapshots)
        return self._registry

    def __init__(self, listen: Address, *, ready: Callable[[], bool], snapshots: Callable[[], list[Snapshot]],
                 certs: Callable[[], dict[str, Any]] | None = None, proxy_protocol: bool = False) -> None:
        self.listen = listen
        self.ready = ready
        self.certs = certs or (lambda: {"cap": 0, "dropped": 0, "rules": {}})
        self._snapshots = snapshots
        self._registry: CollectorRegistry | None = None
        self.proxy_protocol = proxy_protocol
        self.connections: set[_AdminConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _AdminConnection(self), self.listen.host, self.listen.port,
                                                reuse_address=True)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await self._server.wait_closed()
            self._server = None
