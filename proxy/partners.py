"""What one process remembers about partners across connections: certificates seen per rule and rate-limit buckets.

Owns: ``Partners`` (one per process: the certificate table, the bucket table, the clocks) and ``Gate`` (one per
client connection), which the exchange asks once per allowed request: "may this request go, and if not, how long
must the client wait?".  The first time a rule allows a request on a connection, the gate records the
certificate for that rule (so ``/certs`` and the expiry metric cost nothing per request) and resolves the
connection's bucket for the rule (so a rate-limited request costs one dict lookup here plus the bucket arithmetic,
and an unlimited one just the lookup).
Must not: decide access (policy.py), format responses, or read a clock anywhere but through the two injected ones
(the bucket arithmetic itself stays sans-IO in ratelimit.py).

Limits are per worker process: with ``workers = N`` each process has its own buckets, so one partner can get up to
N times ``rate_limit`` through one task (and each task behind the NLB is another N).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from .cert_tracker import CertTable
from .ratelimit import BucketTable, TokenBucket, default_burst, interval_ns

__all__ = ["FIRST", "Gate", "Limit", "Partners", "limits_of"]

Limit = tuple[int, int]  # (interval in ns, burst)
FIRST: Any = object()  # the default for ``Gate.rules.get``: this rule has not allowed a request on this connection yet


class RuleLike(Protocol):
    name: str
    rate_limit: float | None
    burst: int | None


class IdentityLike(Protocol):
    subject: str
    fingerprint: str
    serial: str
    not_after: float


def limits_of(rules: Iterable[RuleLike]) -> dict[str, Limit]:
    """Rule name -> (interval, burst) for the rules that set ``rate_limit`` (built once per config snapshot)."""
    out: dict[str, Limit] = {}
    for rule in rules:
        if rule.rate_limit is not None:
            burst = rule.burst if rule.burst is not None else default_burst(rule.rate_limit)
            out[rule.name] = (interval_ns(rule.rate_limit), burst)
    return out


class Partners:
    """Per process.  ``monotonic_ns`` drives the buckets (CLOCK_MONOTONIC, the clock the event loop runs on);
    ``wall`` stamps ``last_seen``."""

    __slots__ = ("certs", "buckets", "monotonic_ns", "wall")

    def __init__(self, monotonic_ns: Callable[[], int], wall: Callable[[], float], *,
                 certs: CertTable | None = None, buckets: BucketTable | None = None) -> None:
        self.certs = certs if certs is not None else CertTable()
        self.buckets = buckets if buckets is not None else BucketTable()
        self.monotonic_ns = monotonic_ns
        self.wall = wall

    def gate(self, identity: IdentityLike, limits: Mapping[str, Limit]) -> Gate:
        return Gate(self, identity, limits)


class Gate:
    """One connection's view of the partner state.

    The exchange's per-request fast path is one lookup in ``rules`` (rule name -> its bucket, or None when the rule
    has no limit and the certificate is already recorded)::

        state = gate.rules.get(decision.rule, FIRST)
        if state is not None:
            wait = gate.admit(decision.rule, state)  # 0: go; else nanoseconds until a token

    ``admit`` alone is also correct (it does the lookup itself); the split only saves a call per request.
    """

    __slots__ = ("_partners", "_identity", "_limits", "rules")

    def __init__(self, partners: Partners, identity: IdentityLike, limits: Mapping[str, Limit]) -> None:
        self._partners = partners
        self._identity = identity
        self._limits = limits
        self.rules: dict[str, TokenBucket | None] = {}

    def admit(self, rule: str, state: object = None) -> int:
        if state is None:
            state = self.rules.get(rule, FIRST)
            if state is None:
                return 0
        if state is FIRST:
            state = self._first(rule)
            if state is None:
                return 0
        bucket: TokenBucket = state  # type: ignore[assignment]
        now = self._partners.monotonic_ns()
        if bucket.evicted:
            bucket = self.rules[rule] = self._partners.buckets.current(bucket, now)
        return bucket.take(now)

    def _first(self, rule: str) -> TokenBucket | None:
        partners, ident = self._partners, self._identity
        partners.certs.seen(rule, ident.fingerprint, ident.subject, ident.serial, ident.not_after, partners.wall())
        limit = self._limits.get(rule)
        bucket = None
        if limit is not None:
            interval, burst = limit
            bucket = partners.buckets.get((rule, ident.fingerprint, interval, burst), interval, burst,
                                          partners.monotonic_ns())
        self.rules[rule] = bucket
        return bucket
