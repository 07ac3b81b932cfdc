"""cert_tracker: recording, the 24-hour earliest-expiry view per rule, the /certs report, the cap and its count, and
the worker -> supervisor changes (numbering, gaps, full tables, merge by latest last_seen)."""

from __future__ import annotations

import json

from proxy.cert_tracker import WINDOW, CertTable, Feed, SeenCert

DAY = 86400.0
T0 = 1_800_000_000.0  # some wall-clock time


def see(table: CertTable, rule: str, fp: str, not_after: float, now: float) -> None:
    table.seen(rule, fp, f"CN={fp}", fp.upper(), not_after, now)


def test_expiry_is_the_earliest_not_after_per_rule() -> None:
    t = CertTable()
    see(t, "partner-a", "a1", T0 + 90 * DAY, T0)
    see(t, "partner-a", "a2", T0 + 10 * DAY, T0)  # a second certificate of the same partner, expiring sooner
    see(t, "partner-b", "b1", T0 + 30 * DAY, T0)
    assert t.expiry_by_rule(T0) == {"partner-a": T0 + 10 * DAY, "partner-b": T0 + 30 * DAY}


def test_expiry_only_counts_the_last_24_hours() -> None:
    t = CertTable()
    see(t, "partner-a", "old", T0 + 1 * DAY, T0)  # rotated away: last seen more than a day ago
    see(t, "partner-a", "new", T0 + 300 * DAY, T0 + 0.5 * DAY)
    assert t.expiry_by_rule(T0 + WINDOW) == {"partner-a": T0 + 1 * DAY}  # exactly 24 h: still counts
    assert t.expiry_by_rule(T0 + WINDOW + 1) == {"partner-a": T0 + 300 * DAY}
    assert t.expiry_by_rule(T0 + 3 * DAY) == {}  # nothing seen in the window: no series at all


def test_seen_again_updates_last_seen_only() -> None:
    t = CertTable()
    see(t, "r", "a", T0 + DAY, T0)
    see(t, "r", "a", T0 + DAY, T0 + 100)
    see(t, "r", "a", T0 + DAY, T0 + 50)  # a late record never moves last_seen back
    (entry,) = list(t)
    assert entry.last_seen == T0 + 100 and len(t) == 1


def test_report_groups_by_rule_soonest_expiry_first_and_is_json() -> None:
    t = CertTable(cap=10)
    see(t, "b-rule", "b1", T0 + 5 * DAY, T0)
    see(t, "a-rule", "a1", T0 + 9 * DAY, T0 + 1)
    see(t, "a-rule", "a2", T0 + 2 * DAY, T0 + 2)
    report = json.loads(json.dumps(t.report()))
    assert list(report["rules"]) == ["a-rule", "b-rule"]
    assert [e["fingerprint"] for e in report["rules"]["a-rule"]] == ["a2", "a1"]
    a2 = report["rules"]["a-rule"][0]
    assert a2 == {"subject": "CN=a2", "fingerprint": "a2", "serial": "A2",
                  "not_after": "2027-01-17T08:00:00Z", "not_after_timestamp": T0 + 2 * DAY,
                  "last_seen": "2027-01-15T08:00:02Z", "last_seen_timestamp": T0 + 2}
    assert report["cap"] == 10 and report["dropped"] == 0


def test_the_same_certificate_under_two_rules_is_two_entries() -> None:
    t = CertTable()
    see(t, "read", "a", T0 + DAY, T0)
    see(t, "write", "a", T0 + DAY, T0)
    assert sorted(t.report()["rules"]) == ["read", "write"]


def test_cap_evicts_the_least_recently_seen_and_counts_it() -> None:
    t = CertTable(cap=3)
    for i, fp in enumerate(["a", "b", "c"]):
        see(t, "r", fp, T0 + DAY, T0 + i)
    see(t, "r", "a", T0 + DAY, T0 + 10)  # "a" is recent again: "b" is now the oldest
    see(t, "r", "d", T0 + DAY, T0 + 11)
    assert sorted(e.fingerprint for e in t) == ["a", "c", "d"]
    assert t.dropped == 1 and len(t) == 3


# ---- worker -> supervisor ------------------------------------------------------------------------------------
def wire(message: dict[str, object]) -> object:
    return json.loads(json.dumps(message))  # what the control channel carries


def test_changes_carry_only_what_was_recorded_since_the_last_answer() -> None:
    worker = CertTable()
    see(worker, "r", "a", T0 + DAY, T0)
    first = worker.changes(full=True)
    assert first["seq"] == 0 and len(first["entries"]) == 1
    assert worker.changes(full=False) == {"seq": 1, "full": False, "entries": []}
    see(worker, "r", "b", T0 + DAY, T0 + 1)
    see(worker, "r", "b", T0 + DAY, T0 + 2)
    delta = worker.changes(full=False)
    assert delta["seq"] == 2 and [e[1] for e in delta["entries"]] == ["b"] and delta["entries"][0][5] == T0 + 2


def test_supervisor_merges_workers_and_keeps_the_latest_last_seen() -> None:
    w1, w2, merged = CertTable(), CertTable(), CertTable()
    f1, f2 = Feed(), Feed()
    see(w1, "partner-a", "a", T0 + 30 * DAY, T0 + 5)
    see(w2, "partner-a", "a", T0 + 30 * DAY, T0 + 9)  # the same certificate through the other worker, later
    see(w2, "partner-b", "b", T0 + 3 * DAY, T0 + 1)
    f1.apply(wire(w1.changes(full=f1.need_full)), merged)
    f2.apply(wire(w2.changes(full=f2.need_full)), merged)
    assert {(e.rule, e.fingerprint): e.last_seen for e in merged} == {
        ("partner-a", "a"): T0 + 9, ("partner-b", "b"): T0 + 1}
    f1.apply(wire(w1.changes(full=f1.need_full)), merged)  # an old value arriving again changes nothing
    assert next(e for e in merged if e.rule == "partner-a").last_seen == T0 + 9
    assert merged.expiry_by_rule(T0 + 10) == {"partner-a": T0 + 30 * DAY, "partner-b": T0 + 3 * DAY}


def test_a_lost_answer_makes_the_supervisor_ask_for_a_full_table() -> None:
    worker, merged, feed = CertTable(), CertTable(), Feed()
    assert feed.need_full  # a new worker: fetch everything
    feed.apply(wire(worker.changes(full=True)), merged)
    assert not feed.need_full
    see(worker, "r", "lost", T0 + DAY, T0)
    worker.changes(full=False)  # this answer never reached the supervisor (poll timed out, discarded)
    see(worker, "r", "next", T0 + DAY, T0 + 1)
    feed.apply(wire(worker.changes(full=feed.need_full)), merged)
    assert feed.need_full  # seq gap noticed
    assert sorted(e.fingerprint for e in merged) == ["next"]
    feed.apply(wire(worker.changes(full=feed.need_full)), merged)
    assert not feed.need_full
    assert sorted(e.fingerprint for e in merged) == ["lost", "next"]  # repaired


def test_worker_restart_starts_the_numbering_again() -> None:
    merged, feed = CertTable(), Feed()
    old = CertTable()
    for _ in range(3):
        feed.apply(wire(old.changes(full=feed.need_full)), merged)
    feed.restart()
    new = CertTable()
    see(new, "r", "x", T0 + DAY, T0)
    feed.apply(wire(new.changes(full=feed.need_full)), merged)
    assert not feed.need_full and [e.fingerprint for e in merged] == ["x"]


def test_malformed_answers_are_ignored_and_ask_for_a_full_table() -> None:
    merged = CertTable()
    for bad in (None, [], {"seq": "1", "entries": []}, {"seq": 0, "full": False, "entries": [["r", "fp"]]},
                {"seq": 0, "full": False, "entries": [[1, 2, 3, 4, 5, 6]]}):
        feed = Feed()
        feed.apply({"seq": 0, "full": True, "entries": []}, merged)
        feed.apply(bad, merged)
        assert feed.need_full, bad
    assert len(merged) == 0


def test_wire_round_trip() -> None:
    entry = SeenCert("r", "fp", 'CN=a\\, b', "01AB", T0 + DAY, T0)
    back = SeenCert.from_wire(json.loads(json.dumps(entry.wire())))
    assert back.wire() == entry.wire()
