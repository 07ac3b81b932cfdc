"""A per-connection deadline that costs one attribute write to move.

Owns: the lazily re-armed timer every connection uses for its idle, header, body and upstream read timeouts.
Moving a deadline later does not touch the event loop's timer heap: the armed timer fires, sees the new deadline
and re-arms once.  So per request the proxy pays a clock read, not a timer allocation.

Must not: know what a timeout means; the owner's callback decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    __slots__ = ("_loop", "_callback", "_when", "_handle", "_armed_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._when: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0

    def set(self, seconds: float) -> None:
        """Fire ``callback`` once ``seconds`` pass without another ``set``/``clear``."""
        when = self._loop.time() + seconds
        self._when = when
        if self._handle is None or self._armed_at > when:
            if self._handle is not None:
                self._handle.cancel()
            self._armed_at = when
            self._handle = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        self._when = None

    def cancel(self) -> None:
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if self._loop.time() >= when - 0.001:
            self._when = None
            self._callback()
        else:
            self._armed_at = when
            self._handle = self._loop.call_at(when, self._fire)
