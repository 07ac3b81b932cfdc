"""partners: the per-connection gate records a certificate once per rule and connection, shares one bucket per
(rule, certificate) across connections, follows a bucket the table evicted, and leaves unlimited rules alone.
Clocks are injected counters here (the e2e tests run the real loop clock)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.cert_tracker import CertTable
from proxy.partners import FIRST, Partners, limits_of
from proxy.ratelimit import NS, BucketTable


@dataclass
class Rule:
    name: str
    rate_limit: float | None = None
    burst: int | None = None


@dataclass
class Ident:
    fingerprint: str
    subject: str = "CN=x"
    serial: str = "01"
    not_after: float = 2e9


class Clocks:
    def __init__(self) -> None:
        self.mono = 0
        self.wall_now = 1_800_000_000.0
        self.mono_reads = 0

    def monotonic_ns(self) -> int:
        self.mono_reads += 1
        return self.mono

    def wall(self) -> float:
        return self.wall_now


def partners(clocks: Clocks, **kw: object) -> Partners:
    return Partners(clocks.monotonic_ns, clocks.wall, **kw)  # type: ignore[arg-type]


def test_limits_of_defaults_burst_to_one_seconds_worth() -> None:
    assert limits_of([Rule("a"), Rule("b", 2.5), Rule("c", 10, 3), Rule("d", 0.5)]) == {
        "b": (NS * 2 // 5, 3), "c": (NS // 10, 3), "d": (2 * NS, 1)}


def test_unlimited_rule_records_once_and_never_reads_the_clock() -> None:
    clocks = Clocks()
    p = partners(clocks)
    gate = p.gate(Ident("fp"), {})
    for _ in range(5):
        assert gate.admit("open") == 0
    assert clocks.mono_reads == 0
    assert [(e.rule, e.fingerprint) for e in p.certs] == [("open", "fp")]


def test_first_use_per_connection_updates_last_seen() -> None:
    clocks = Clocks()
    p = partners(clocks)
    p.gate(Ident("fp"), {}).admit("r")
    clocks.wall_now += 60
    second = p.gate(Ident("fp"), {})  # a new connection of the same certificate
    second.admit("r")
    clocks.wall_now += 60
    second.admit("r")  # the same connection again: not recorded (that would be per request)
    (entry,) = list(p.certs)
    assert entry.last_seen == 1_800_000_060.0


def test_connections_of_one_certificate_share_a_bucket() -> None:
    clocks = Clocks()
    p = partners(clocks)
    limits = limits_of([Rule("r", rate_limit=1, burst=2)])
    a, b = p.gate(Ident("fp"), limits), p.gate(Ident("fp"), limits)
    assert a.admit("r") == 0 and b.admit("r") == 0
    assert a.admit("r") == NS and b.admit("r") == NS  # two connections do not double the burst
    other = p.gate(Ident("other-fp"), limits)
    assert other.admit("r") == 0  # another partner has its own bucket
    clocks.mono += NS
    assert b.admit("r") == 0


def test_each_rule_has_its_own_bucket() -> None:
    clocks = Clocks()
    p = partners(clocks)
    limits = limits_of([Rule("read", rate_limit=1, burst=1), Rule("write", rate_limit=1, burst=1)])
    gate = p.gate(Ident("fp"), limits)
    assert gate.admit("read") == 0 and gate.admit("read") > 0
    assert gate.admit("write") == 0


def test_a_changed_limit_starts_a_new_bucket() -> None:
    clocks = Clocks()
    p = partners(clocks)
    old = p.gate(Ident("fp"), limits_of([Rule("r", rate_limit=1, burst=1)]))
    assert old.admit("r") == 0 and old.admit("r") > 0
    new = p.gate(Ident("fp"), limits_of([Rule("r", rate_limit=1, burst=5)]))  # after a reload
    assert new.admit("r") == 0
    assert old.admit("r") > 0  # a live connection keeps the limit it started with


def test_gate_follows_an_evicted_bucket() -> None:
    clocks = Clocks()
    p = partners(clocks, buckets=BucketTable(cap=1))
    limits = limits_of([Rule("r", rate_limit=1, burst=1)])
    a = p.gate(Ident("a"), limits)
    assert a.admit("r") == 0  # "a" is empty now
    clocks.mono += 2 * NS  # ... and full again
    b = p.gate(Ident("b"), limits)
    assert b.admit("r") == 0  # the table was at its cap: "a" (full) was dropped
    a_again = p.gate(Ident("a"), limits)
    assert a_again.admit("r") == 0  # a fresh (full) bucket for "a", which evicts "b"'s (empty, so forced) ...
    assert a.admit("r") > 0  # ... and the old connection of "a" now counts against that same bucket
    assert p.buckets.forced_evictions == 1


@pytest.mark.parametrize("cap", [1, 2])
def test_certificate_table_cap_applies(cap: int) -> None:
    clocks = Clocks()
    p = partners(clocks, certs=CertTable(cap=cap))
    for i in range(3):
        p.gate(Ident(f"fp{i}"), {}).admit("r")
    assert len(p.certs) == cap and p.certs.dropped == 3 - cap


def test_fast_path_contract() -> None:
    """What the exchange does per request: one lookup; None means nothing to do (no clock read, no record)."""
    clocks = Clocks()
    p = partners(clocks)
    gate = p.gate(Ident("fp"), limits_of([Rule("limited", rate_limit=1, burst=1)]))
    for rule in ("open", "limited"):
        state = gate.rules.get(rule, FIRST)
        assert state is FIRST
        assert gate.admit(rule, state) == 0  # first use: recorded (and the bucket created)
    assert gate.rules["open"] is None  # later requests of the open rule stop at the lookup
    reads = clocks.mono_reads
    state = gate.rules.get("limited", FIRST)
    assert state is not None and gate.admit("limited", state) == NS  # the bucket is consulted
    assert clocks.mono_reads == reads + 1
    assert sorted(e.rule for e in p.certs) == ["limited", "open"]
