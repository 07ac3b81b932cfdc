"""ratelimit: the token bucket as tables over explicit times (integer nanoseconds), its two properties over any
sequence of request times (hypothesis), Retry-After rounding, defaults, and the bounded bucket table."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ratelimit import NS, BucketTable, TokenBucket, default_burst, interval_ns, retry_after_seconds

MS = NS // 1000


def run(rate: float, burst: int, times_ms: list[int]) -> list[int]:
    """The wait (ns) ``take`` returned for each request; 0 = allowed."""
    bucket = TokenBucket(interval_ns(rate), burst, times_ms[0] * MS if times_ms else 0)
    return [bucket.take(t * MS) for t in times_ms]


@pytest.mark.parametrize("rate, burst, times_ms, expected_ms", [
    # a full bucket lets `burst` requests through at once, then one per 1/rate
    (1, 3, [0, 0, 0, 0], [0, 0, 0, 1000]),
    (1, 3, [0, 0, 0, 500], [0, 0, 0, 500]),
    (1, 3, [0, 0, 0, 1000], [0, 0, 0, 0]),
    (10, 1, [0, 50, 100, 150, 200], [0, 50, 0, 50, 0]),
    # refused requests take nothing: the wait keeps shrinking with time
    (2, 1, [0, 100, 200, 300, 500], [0, 400, 300, 200, 0]),
    # credit never exceeds `burst` tokens, however long the client was idle
    (1, 2, [0, 0, 60_000, 60_000, 60_000], [0, 0, 0, 0, 1000]),
    # fractional rates: one request every 4 s
    (0.25, 1, [0, 1000, 4000], [0, 3000, 0]),
], ids=["burst", "half-refilled", "refilled", "steady", "refusal-costs-nothing", "capped", "fractional"])
def test_bucket_table(rate: float, burst: int, times_ms: list[int], expected_ms: list[int]) -> None:
    assert run(rate, burst, times_ms) == [e * MS for e in expected_ms]


def test_time_running_backwards_adds_no_credit() -> None:
    bucket = TokenBucket(interval_ns(1), 1, 10 * NS)
    assert bucket.take(10 * NS) == 0
    assert bucket.take(5 * NS) == NS  # an earlier `now` (never from a monotonic clock) is no refill
    assert bucket.take(11 * NS) == 0


@pytest.mark.parametrize("rate, expected", [(1, NS), (3, 333_333_334), (1e9, 1), (1e12, 1), (0.5, 2 * NS)])
def test_interval_rounds_up(rate: float, expected: int) -> None:
    assert interval_ns(rate) == expected  # rounded up: the effective rate never exceeds the configured one


@pytest.mark.parametrize("rate", [0, -1, float("inf"), float("nan")])
def test_interval_rejects_bad_rates(rate: float) -> None:
    with pytest.raises(ValueError):
        interval_ns(rate)


@pytest.mark.parametrize("rate, expected", [(0.1, 1), (1, 1), (1.5, 2), (10, 10), (250.2, 251)])
def test_default_burst_is_one_seconds_worth(rate: float, expected: int) -> None:
    assert default_burst(rate) == expected


@pytest.mark.parametrize("wait_ns, expected", [(1, 1), (NS - 1, 1), (NS, 1), (NS + 1, 2), (int(2.5 * NS), 3)])
def test_retry_after_rounds_up_to_whole_seconds(wait_ns: int, expected: int) -> None:
    assert retry_after_seconds(wait_ns) == expected


# ---- properties ----------------------------------------------------------------------------------------------
rates = st.one_of(st.integers(1, 1000).map(float), st.floats(0.01, 1000, allow_nan=False))
bursts = st.integers(1, 50)
gaps = st.lists(st.integers(0, 3 * NS), min_size=1, max_size=200)  # ns between consecutive requests


@settings(max_examples=300, deadline=None)
@given(rates, bursts, gaps)
def test_allowed_never_exceeds_burst_plus_rate_times_elapsed(rate: float, burst: int, steps: list[int]) -> None:
    start = 7 * NS
    bucket = TokenBucket(interval_ns(rate), burst, start)
    now, allowed = start, 0
    for i, gap in enumerate(steps):
        if i:
            now += gap
        if bucket.take(now) == 0:
            allowed += 1
        elapsed = Fraction(now - start, NS)
        assert allowed <= burst + Fraction(rate) * elapsed  # exact arithmetic: no rounding slack allowed


@settings(max_examples=200, deadline=None)
@given(rates, bursts, st.lists(st.integers(0, 3 * NS), min_size=1, max_size=80))
def test_no_window_of_requests_beats_the_limit(rate: float, burst: int, steps: list[int]) -> None:
    """The same bound over every stretch of requests, not only from the start: idle time banks at most `burst`."""
    interval = interval_ns(rate)
    bucket = TokenBucket(interval, burst, 0)
    times, allowed, now = [], [], 0
    for gap in steps:
        now += gap
        times.append(now)
        allowed.append(bucket.take(now) == 0)
    for i in range(len(times)):
        count = 0
        for j in range(i, len(times)):
            count += allowed[j]
            # count <= burst + (t_j - t_i) / interval, in integers; interval >= 1e9 / rate (test_interval_rounds_up)
            assert count * interval <= burst * interval + (times[j] - times[i])


@settings(max_examples=300, deadline=None)
@given(rates, bursts, gaps)
def test_a_request_is_refused_only_without_a_whole_token(rate: float, burst: int, steps: list[int]) -> None:
    now = 0
    bucket = TokenBucket(interval_ns(rate), burst, now)
    for gap in steps:
        now += gap
        tokens = bucket.tokens(now)
        wait = bucket.take(now)
        if tokens >= 1:
            assert wait == 0
        else:
            assert wait > 0
            # waiting exactly that long is enough, one ns less is not
            probe = TokenBucket(bucket.interval, burst, 0)
            probe.level, probe.stamp = bucket.level, bucket.stamp
            assert probe.tokens(now + wait) >= 1 > probe.tokens(now + wait - 1)


# ---- the table -----------------------------------------------------------------------------------------------
def test_table_keeps_one_bucket_per_key() -> None:
    table = BucketTable(cap=10)
    a = table.get(("rule", "fp-a"), NS, 1, 0)
    assert table.get(("rule", "fp-a"), NS, 1, 0) is a
    assert table.get(("rule", "fp-b"), NS, 1, 0) is not a
    assert len(table) == 2


def test_table_at_cap_drops_full_buckets_first_without_changing_decisions() -> None:
    table = BucketTable(cap=3)
    busy = table.get("busy", NS, 2, 0)
    assert busy.take(0) == 0 and busy.take(0) == 0  # empty now: it must survive
    idle = [table.get(f"idle-{i}", NS, 2, 0) for i in range(2)]  # full (never used)
    table.get("new", NS, 2, 0)
    assert all(b.evicted for b in idle)
    assert not busy.evicted and table.current(busy, 0) is busy
    assert busy.take(0) > 0  # still empty: its state was kept
    assert table.forced_evictions == 0
    assert len(table) == 2


def test_table_at_cap_with_everyone_active_evicts_the_fullest_and_counts_it() -> None:
    table = BucketTable(cap=8)
    buckets = []
    for i in range(8):
        b = table.get(i, NS, 4, 0)
        for _ in range(i % 4 + 1):
            b.take(0)  # none is full
        buckets.append(b)
    table.get("new", NS, 4, 0)
    assert table.forced_evictions == 1
    evicted = [b for b in buckets if b.evicted]
    assert len(evicted) == 1 and evicted[0].tokens(0) == 3  # one of the fullest (3 tokens left)
    assert len(table) == 8


def test_an_evicted_bucket_is_replaced_for_every_holder() -> None:
    table = BucketTable(cap=1)
    held = table.get("a", NS, 1, 0)  # full
    table.get("b", NS, 1, 0)  # evicts "a" (full)
    assert held.evicted
    first = table.current(held, 0)  # holder 1 asks again: a new (full) bucket for "a"
    second = table.current(held, 0)  # holder 2 too: the same one
    assert first is second and not first.evicted
    assert first.take(0) == 0 and second.take(0) > 0  # they share it


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 1, 0)
    with pytest.raises(ValueError):
        TokenBucket(NS, 0, 0)
    with pytest.raises(ValueError):
        BucketTable(cap=0)
