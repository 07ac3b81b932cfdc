"""Connection slots: ``server.max_connections`` and the one count of open client connections.

Owns: the count of accepted client sockets not yet closed (``mtls_proxy_connections_active``), refusing a slot
beyond the limit, and the ``Slot`` each accepted connection holds from accept until its socket is closed --
through the PROXY header, the TLS handshake, the HTTP exchanges and the close.  The count is changed here and
nowhere else: ``take()`` adds one, ``Slot.release()`` takes it back, at most once however often it is called, so
every path that ends a connection can simply release its slot (in a ``finally`` or its one close path) without
any other path having to know whether that already happened.  A drain waits for the count to reach zero.

Must not: touch sockets or know what a connection does; it only counts.
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class _Gauge(Protocol):
    connections_active: int


class Slot:
    """One accepted connection's place under the limit; ``release()`` is idempotent."""

    __slots__ = ("_owner",)

    def __init__(self, owner: ConnectionSlots) -> None:
        self._owner: ConnectionSlots | None = owner

    @property
    def held(self) -> bool:
        return self._owner is not None

    def release(self) -> None:
        owner = self._owner
        if owner is not None:
            self._owner = None
            owner._give_back()


class ConnectionSlots:
    """At most ``limit`` slots out at once; the gauge on ``metrics`` always shows how many are."""

    __slots__ = ("limit", "active", "_metrics", "_empty")

    def __init__(self, limit: int, metrics: _Gauge) -> None:
        self.limit = limit
        self.active = 0
        self._metrics = metrics
        self._empty: asyncio.Event | None = None

    def take(self) -> Slot | None:
        """A slot for a just-accepted connection, or None when ``limit`` are out (the caller resets it)."""
        if self.active >= self.limit:
            return None
        self.active += 1
        self._metrics.connections_active = self.active
        return Slot(self)

    def _give_back(self) -> None:
        self.active -= 1
        self._metrics.connections_active = self.active
        if self.active == 0 and self._empty is not None:
            self._empty.set()

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no slot is out (True) or ``timeout`` seconds pass (False)."""
        if self.active == 0:
            return True
        if self._empty is None:
            self._empty = asyncio.Event()
        self._empty.clear()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout)
        except TimeoutError:
            return self.active == 0
        return True
