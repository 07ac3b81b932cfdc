"""Per-partner rate limits: a sans-IO token bucket and a bounded table of buckets.

Owns: the bucket arithmetic (``[[allow]] rate_limit`` requests per second, ``burst`` requests at once), the wait
until the next request would be allowed (for ``Retry-After``), and keeping the number of buckets bounded.
Must not: read a clock (every call takes ``now``; the connection passes the event loop's monotonic clock), do IO,
or know about HTTP.

Arithmetic in integer nanoseconds, so it is exact and a property such as "allowed <= burst + rate x elapsed"
holds without rounding slack: one token is ``interval`` ns of credit, ``interval = ceil(1e9 / rate)`` (rounded up,
so the effective rate never exceeds the configured one), the bucket holds at most ``burst`` tokens and starts
full.  A request is allowed exactly when at least one whole token is there.

Memory: a bucket per (rule, client certificate) that sent a rate-limited request.  When the table reaches its cap,
buckets that have refilled to full are dropped first: a full bucket behaves exactly like a new one, so dropping it
changes no decision.  Only if that frees nothing (more than ``cap`` clients active within ``burst / rate``
seconds) are the fullest buckets dropped anyway; those clients start again with a full bucket, which is counted
(``forced_evictions``) because it lets them through sooner than the limit says.  A dropped bucket is marked
``evicted``; whoever still holds it asks the table again (``current``), so two holders of one key never count
against two different buckets.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable

__all__ = ["NS", "BucketTable", "TokenBucket", "default_burst", "interval_ns", "retry_after_seconds"]

NS = 1_000_000_000


def interval_ns(rate: float) -> int:
    """Nanoseconds of credit one token costs at ``rate`` tokens per second (rounded up, at least 1)."""
    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"rate must be a positive finite number, got {rate!r}")
    return max(1, math.ceil(NS / rate))


def default_burst(rate: float) -> int:
    """``burst`` when a rule sets only ``rate_limit``: one second's worth of requests, at least one."""
    return max(1, math.ceil(rate))


def retry_after_seconds(wait_ns: int) -> int:
    """``Retry-After`` delay-seconds (RFC 9110 §10.2.3): the wait rounded up to whole seconds, at least 1."""
    return max(1, -(-wait_ns // NS))


class TokenBucket:
    """One client's bucket.  ``take(now)`` returns 0 when the request may go, else the ns until one token."""

    __slots__ = ("key", "interval", "capacity", "level", "stamp", "evicted")

    def __init__(self, interval: int, burst: int, now: int, key: Hashable = None) -> None:
        if interval < 1 or burst < 1:
            raise ValueError("interval and burst must be at least 1")
        self.key = key
        self.interval = interval
        self.capacity = interval * burst  # credit in ns when full
        self.level = self.capacity  # starts full: a partner's first burst is allowed
        self.stamp = now
        self.evicted = False

    def take(self, now: int) -> int:
        level = self.level
        if now > self.stamp:  # (a ``now`` before the stamp, never from a monotonic clock, adds nothing)
            level += now - self.stamp
            if level > self.capacity:
                level = self.capacity
            self.stamp = now
        if level >= self.interval:
            self.level = level - self.interval
            return 0
        self.level = level
        return self.interval - level

    def tokens(self, now: int) -> float:
        """Whole and partial tokens available at ``now`` (for tests and diagnostics; does not take one)."""
        level = self.level + max(0, now - self.stamp)
        return min(level, self.capacity) / self.interval

    def full(self, now: int) -> bool:
        return self.level + max(0, now - self.stamp) >= self.capacity


class BucketTable:
    """Buckets by key, at most ``cap`` of them (see the module docstring for what happens at the cap)."""

    __slots__ = ("cap", "_buckets", "forced_evictions")

    def __init__(self, cap: int = 16384) -> None:  # ~4 MB when full; partners number in the hundreds
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self._buckets: dict[Hashable, TokenBucket] = {}
        self.forced_evictions = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, key: Hashable, interval: int, burst: int, now: int) -> TokenBucket:
        """The bucket for ``key``, created full if there is none.  ``key`` must include interval and burst (a
        reload that changes a rule's limit then starts new buckets instead of reusing old arithmetic)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.cap:
                self._make_room(now)
            bucket = self._buckets[key] = TokenBucket(interval, burst, now, key)
        return bucket

    def current(self, bucket: TokenBucket, now: int) -> TokenBucket:
        """``bucket`` itself, or the table's live bucket for its key if it was evicted."""
        if not bucket.evicted:
            return bucket
        return self.get(bucket.key, bucket.interval, bucket.capacity // bucket.interval, now)

    def _make_room(self, now: int) -> None:
        buckets = self._buckets
        for key in [k for k, b in buckets.items() if b.full(now)]:
            buckets.pop(key).evicted = True
        if len(buckets) < self.cap:
            return
        # Everyone is active: drop the fullest eighth at once, so a table under this pressure sorts once per
        # cap/8 new clients rather than once per client.
        count = max(1, self.cap // 8)
        fullest = heapq.nlargest(count, buckets.items(),
                                 key=lambda item: item[1].tokens(now))
        for key, bucket in fullest:
            del buckets[key]
            bucket.evicted = True
        self.forced_evictions += len(fullest)
