"""slots: the count of open connections under max_connections, taken once and given back exactly once."""

from __future__ import annotations

import asyncio

from proxy.metrics import Metrics
from proxy.slots import ConnectionSlots


def test_take_up_to_the_limit_then_none_and_the_gauge_follows() -> None:
    m = Metrics()
    slots = ConnectionSlots(3, m)
    taken = [slots.take() for _ in range(3)]
    assert all(s is not None and s.held for s in taken)
    assert slots.take() is None  # the fourth is refused, and refusing takes nothing
    assert (slots.active, m.connections_active) == (3, 3)
    taken[0].release()  # type: ignore[union-attr]
    assert (slots.active, m.connections_active) == (2, 2)
    again = slots.take()
    assert again is not None and slots.active == 3


def test_release_is_idempotent_so_every_end_path_may_call_it() -> None:
    m = Metrics()
    slots = ConnectionSlots(2, m)
    a, b = slots.take(), slots.take()
    assert a is not None and b is not None
    for _ in range(3):  # e.g. an error path and a finally both releasing
        a.release()
    assert not a.held and b.held
    assert (slots.active, m.connections_active) == (1, 1)
    b.release()
    b.release()
    assert (slots.active, m.connections_active) == (0, 0)


async def test_wait_empty_returns_when_the_last_slot_comes_back() -> None:
    slots = ConnectionSlots(10, Metrics())
    assert await slots.wait_empty(0.01)  # nothing out: at once
    held = [slots.take() for _ in range(3)]
    waiter = asyncio.ensure_future(slots.wait_empty(30))
    for s in held[:2]:
        s.release()  # type: ignore[union-attr]
        await asyncio.sleep(0)
        assert not waiter.done()
    held[2].release()  # type: ignore[union-attr]
    assert await asyncio.wait_for(waiter, 5) is True


async def test_wait_empty_times_out_while_a_slot_is_held() -> None:
    slots = ConnectionSlots(10, Metrics())
    held = slots.take()
    assert await slots.wait_empty(0.05) is False
    held.release()  # type: ignore[union-attr]
    assert await slots.wait_empty(0.05) is True
