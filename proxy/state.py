"""What one proxy process's listener and client connections share: ``ServerState``.

Owns: the narrow, per-process state a connection may read or report into -- the event loop, the frozen config,
the current runtime snapshot (the one reference a reload swaps), the metrics, the upstream pool, the access log,
the lingerer, the partner state (certificates seen, rate-limit buckets), the connection slots, the set of live
client connections and the draining flag.  ``ProxyServer`` builds one when it starts and hands it to the
``Listener``, which hands it to every ``ClientConnection``; neither ever sees the server itself, so the lifecycle
(start, reload, drain) stays above them and nothing below imports it.

Must not: do anything.  It holds references and the two bookkeeping calls of a connection's life; the lifecycle
that changes ``runtime`` and ``draining`` is ``proxy.server``'s.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .accesslog import AccessLog
    from .config import Config
    from .upstream import UpstreamPool
    from .metrics import Metrics
    from .partners import Partners
    from .runtime import Runtime
    from .slots import ConnectionSlots
    from .sockets import Lingerer


class LiveConnection(Protocol):
    """What a drain asks of a live client connection."""

    def shutdown(self) -> None: ...  # finish the current exchange with Connection: close, then close

    def abort(self) -> None: ...  # reset it now


class ServerState:
    """The shared state of one process's connections (one instance per ``ProxyServer``)."""

    __slots__ = ("loop", "cfg", "runtime", "metrics", "pool", "access_log", "lingerer", "partners", "slots",
                 "base_path", "draining", "connections")

    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: Config, runtime: Runtime, metrics: Metrics,
                 pool: UpstreamPool, access_log: AccessLog, lingerer: Lingerer, partners: Partners,
                 slots: ConnectionSlots) -> None:
        self.loop = loop
        self.cfg = cfg
        self.runtime = runtime  # new handshakes use this snapshot; a reload replaces it in one assignment
        self.metrics = metrics
        self.pool = pool
        self.access_log = access_log
        self.lingerer = lingerer
        self.partners = partners
        self.slots = slots
        self.base_path = cfg.upstream.base_path.encode("ascii")  # prefixed to every upstream request target
        self.draining = False  # set once by the drain: every exchange then ends with Connection: close
        self.connections: set[LiveConnection] = set()

    def connection_opened(self, conn: LiveConnection) -> None:
        self.connections.add(conn)

    def connection_closed(self, conn: LiveConnection) -> None:
        self.connections.discard(conn)
