"""supervisor.Backoff: the restart delay doubles while a worker keeps dying and starts over once it ran well."""

from __future__ import annotations

import pytest

from proxy.supervisor import BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER, Backoff


def test_a_crash_loop_backs_off_doubling_up_to_the_maximum() -> None:
    b = Backoff()
    delays = [b.next_delay(uptime=0.5) for _ in range(10)]
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0, 5.0]
    assert (BACKOFF_FIRST, BACKOFF_MAX) == (0.2, 5.0)


def test_a_worker_that_ran_well_is_restarted_after_the_first_delay_again() -> None:
    b = Backoff()
    for _ in range(8):
        b.next_delay(uptime=1.0)  # a crash loop: at the maximum now
    assert b.next_delay(uptime=1.0) == BACKOFF_MAX
    assert b.next_delay(uptime=STABLE_AFTER) == BACKOFF_FIRST  # it had run well: start over
    assert b.next_delay(uptime=2.0) == 0.4  # dying again at once: backing off again


@pytest.mark.parametrize("uptime", [STABLE_AFTER - 0.1, 10.0])
def test_a_short_run_does_not_reset_the_backoff(uptime: float) -> None:
    b = Backoff()
    b.next_delay(uptime=0.1)
    b.next_delay(uptime=0.1)
    assert b.next_delay(uptime=uptime) == 0.8


def test_stable_after_is_well_above_the_longest_delay() -> None:
    assert STABLE_AFTER >= 5 * BACKOFF_MAX  # a loop of crashes, each after a full backoff, never counts as stable
