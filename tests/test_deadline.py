"""deadline: fires once after its time, moving it later re-arms lazily (one timer outstanding, never an early
callback), moving it earlier re-arms at once, clear() and cancel() stop it.

A real event loop with short times; "not fired" is proven by ordering against a sentinel Deadline set later
(timers run in time order), never by elapsed-time assertions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from proxy.deadline import Deadline

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


class CountingLoop:
    """The real loop, with every ``call_at`` recorded (the timers a Deadline puts on the loop's heap)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.handles: list[asyncio.TimerHandle] = []
        self.ran: set[int] = set()

    def time(self) -> float:
        return self.loop.time()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        index = len(self.handles)

        def ran() -> None:
            self.ran.add(index)
            callback(*args)

        handle = self.loop.call_at(when, ran)
        self.handles.append(handle)
        return handle

    def outstanding(self) -> int:
        """Timers armed and neither cancelled nor run yet.

        Counted by what happened to each handle, not by comparing ``when()`` with the clock: uvloop keeps time in
        milliseconds, so a timer may run while ``loop.time()`` still reads a hair before its ``when()``.
        """
        return sum(1 for i, h in enumerate(self.handles) if not h.cancelled() and i not in self.ran)


class Calls:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.times: list[float] = []
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.times.append(self.loop.time())
        self.event.set()

    async def wait(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()


def deadline(loop: asyncio.AbstractEventLoop | CountingLoop, calls: Calls) -> Deadline:
    return Deadline(loop, calls)  # type: ignore[arg-type]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Any]], Any]:
    def run(fn: Callable[[], Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(asyncio.wait_for(fn(), 30))

    return run


async def sentinel_after(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    """Returns once a timer set ``seconds`` from now has run: every earlier timer has had its turn."""
    done = Calls(loop)
    deadline(loop, done).set(seconds)
    await done.wait()


def test_fires_once_after_its_time(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls = Calls(loop)
        d = deadline(loop, calls)
        start = loop.time()
        d.set(0.05)
        await calls.wait()
        assert calls.times[0] >= start + 0.05 - 0.002  # never early (loop clock resolution aside)
        await sentinel_after(loop, 0.1)
        assert len(calls.times) == 1

    run(main)


def test_moving_later_keeps_one_timer_and_never_fires_early(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        counting = CountingLoop(loop)
        calls = Calls(loop)
        d = deadline(counting, calls)
        d.set(0.05)
        for _ in range(999):  # per request: a clock read, not a timer allocation
            d.set(0.3)
        last = loop.time() + 0.3  # read before the last set: that deadline is at or after it, however slow CI is
        d.set(0.3)
        assert len(counting.handles) == 1
        await calls.wait()
        assert calls.times[0] >= last - 0.002  # the first timer found the new deadline and re-armed
        assert len(counting.handles) <= 2  # re-armed at most once
        await sentinel_after(loop, 0.1)
        assert len(calls.times) == 1

    run(main)


def test_moving_earlier_rearms_at_once(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        counting = CountingLoop(loop)
        calls = Calls(loop)
        d = deadline(counting, calls)
        d.set(3600)
        d.set(0.05)
        assert counting.handles[0].cancelled() and counting.outstanding() == 1
        await calls.wait()  # long before an hour
        assert counting.outstanding() == 0

    run(main)


def test_clear_prevents_firing_and_set_works_again(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls = Calls(loop)
        d = deadline(loop, calls)
        d.set(0.05)
        d.clear()
        await sentinel_after(loop, 0.15)  # the armed timer has run and found no deadline
        assert calls.times == []
        d.set(0.05)
        await calls.wait()
        assert len(calls.times) == 1

    run(main)


def test_cancel_removes_the_timer(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        counting = CountingLoop(loop)
        calls = Calls(loop)
        d = deadline(counting, calls)
        d.set(0.05)
        d.cancel()
        assert counting.outstanding() == 0 and counting.handles[0].cancelled()
        await sentinel_after(loop, 0.15)
        assert calls.times == []
        d.cancel()  # idempotent
        d.set(0.05)  # usable again
        await calls.wait()
        assert len(calls.times) == 1

    run(main)


def test_callback_may_set_the_deadline_again(run: Callable[..., Any]) -> None:
    """An owner's timeout handler can re-arm (e.g. an idle timeout after a finished request)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fired: list[int] = []
        done = asyncio.Event()

        def callback() -> None:
            fired.append(1)
            if len(fired) < 3:
                d.set(0.02)
            else:
                done.set()

        d = Deadline(loop, callback)
        d.set(0.02)
        await asyncio.wait_for(done.wait(), 10)
        await sentinel_after(loop, 0.1)
        assert len(fired) == 3

    run(main)


def test_clear_then_later_set_reuses_the_armed_timer(run: Callable[..., Any]) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        counting = CountingLoop(loop)
        calls = Calls(loop)
        d = deadline(counting, calls)
        d.set(0.05)
        d.clear()
        d.set(0.1)  # later than the armed timer: no new timer now
        assert len(counting.handles) == 1
        await calls.wait()
        await sentinel_after(loop, 0.1)
        assert len(calls.times) == 1

    run(main)
