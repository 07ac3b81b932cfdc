"""emf: every line the emitter writes is a valid Embedded Metric Format document (checked by tests/emf_spec.py,
written from the specification, not from the module), its counts are the increase over the interval and agree
with what /metrics exposes for the same snapshots, across several workers and through a worker restart; dimension
values stay bounded ASCII whatever the config holds.  Pure: snapshots in, lines out, the clock passed in."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy import emf
from proxy.emf import EmfEmitter
from proxy.metrics import HANDSHAKE_REASONS, Metrics, registry_for
from tests.emf_spec import check_document, check_line, dimensions, metric_values

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NS = "mtls-proxy/test-stack"
PIPE_BUF = 4096


def busy(scale: int = 1) -> Metrics:
    m = Metrics()
    for _ in range(scale):
        m.request("GET", 200, "partner-a", 0.004, 0.003)
        m.request("GET", 200, "partner-a", 0.2, 0.1)
        m.request("GET", 502, "partner-a", 0.01, None)
        m.request("POST", 403, None, 0.0005, None)
        m.request("BREW", 504, "partner-b", 30.0, 29.9)
        m.bump(m.denied, "no_rule_for_client")
        m.bump(m.upstream_errors, "timeout")
        m.bump(m.upstream_errors, "connect")
        m.bump(m.handshake_failures, "expired")
        m.bump(m.proxy_protocol_errors, "truncated")
        m.bump(m.reloads, "error")
        m.connections_total += 3
        m.connections_rejected += 1
    m.connections_active = 2
    m.cert_expiry = {"server": NOW + 30 * 86400, "client_ca:Partner Root": NOW + 400 * 86400,
                     "crl:Partner Root": NOW + 0.5 * 86400}
    return m


def emit(emitter: EmfEmitter, snaps: dict[Any, dict[str, Any]], now: float = NOW) -> list[dict[str, Any]]:
    """The emitter's lines, each checked against the specification (and PIPE_BUF), parsed."""
    lines = emitter.lines(snaps, now)
    for line in lines:
        assert len(line.encode()) <= PIPE_BUF, "a line longer than PIPE_BUF could interleave with the access log"
    return [check_line(line) for line in lines]


def totals(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (doc,) = [d for d in docs if dimensions(d) == [[]]]
    return metric_values(doc)


def by_dimension(docs: list[dict[str, Any]], metric: str, *names: str) -> dict[tuple[str, ...], float]:
    """metric value per value of the dimension set ``names`` (CloudWatch adds up documents with the same values)."""
    out: dict[tuple[str, ...], float] = {}
    for d in docs:
        if list(names) in dimensions(d) and metric in metric_values(d):
            key = tuple(d[n] for n in names)
            out[key] = out.get(key, 0) + d[metric]
    return out


def scraped(*snaps: dict[str, Any]) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What /metrics shows for these snapshots (the admin port merges a supervisor's worker snapshots)."""
    text = generate_latest(registry_for(lambda: list(snaps))).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def prom_sum(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


# --- the documents are valid EMF --------------------------------------------------------------------------------------
def test_every_document_is_valid_emf_and_one_directive() -> None:
    docs = emit(EmfEmitter(NS), {0: busy().snapshot()})
    assert len(docs) >= 10
    for d in docs:
        (directive,) = d["_aws"]["CloudWatchMetrics"]
        assert directive["Namespace"] == NS and d["_aws"]["Timestamp"] == int(NOW * 1000)
        assert all(len(s) <= emf.MAX_DIMENSIONS_PER_SET for s in directive["Dimensions"])
        assert len(directive["Metrics"]) <= emf.MAX_METRICS_PER_DIRECTIVE


def test_a_quiet_interval_still_writes_zero_totals_and_the_heartbeat() -> None:
    emitter = EmfEmitter(NS)
    snap = Metrics().snapshot()
    docs = emit(emitter, {0: snap})
    assert docs[0] == check_document(docs[0])
    values = totals(docs)
    assert values["Requests"] == 0 and values["HandshakeFailures"] == 0 and values["ConnectionsActive"] == 0
    assert "RequestDuration" not in values, "no mean without a request"
    assert [d for d in docs if dimensions(d) != [[]]] == [], "no breakdown documents for zero counts"


def test_units() -> None:
    docs = emit(EmfEmitter(NS), {0: busy().snapshot()})
    units = {m["Name"]: m.get("Unit") for d in docs for m in d["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
    assert units["Requests"] == "Count" and units["RequestDuration"] == "Milliseconds"
    assert units["CertDaysToExpiry"] == "None"


# --- counts agree with /metrics --------------------------------------------------------------------------------------
def test_first_interval_counts_equal_the_scrape() -> None:
    snap = busy().snapshot()
    docs, prom = emit(EmfEmitter(NS), {0: snap}), scraped(snap)
    t = totals(docs)
    assert t["Requests"] == prom_sum(prom, "mtls_proxy_requests_total") == 5
    assert t["UpstreamErrors"] == prom_sum(prom, "mtls_proxy_upstream_errors_total") == 2
    assert t["HandshakeFailures"] == prom_sum(prom, "mtls_proxy_tls_handshake_failures_total") == 1
    assert t["Denied"] == prom_sum(prom, "mtls_proxy_denied_total") == 1
    assert t["ProxyProtocolErrors"] == prom_sum(prom, "mtls_proxy_proxy_protocol_errors_total") == 1
    assert t["Connections"] == prom_sum(prom, "mtls_proxy_connections_total") == 3
    assert t["ConnectionsRejected"] == prom_sum(prom, "mtls_proxy_connections_rejected_total") == 1
    assert t["ReloadFailures"] == prom_sum(prom, "mtls_proxy_reloads_total", result="error") == 1
    assert t["ConnectionsActive"] == prom_sum(prom, "mtls_proxy_connections_active") == 2
    assert t["RequestDuration"] == pytest.approx(
        1000 * prom_sum(prom, "mtls_proxy_request_duration_seconds_sum") / 5, abs=0.001)
    assert t["UpstreamDuration"] == pytest.approx(1000 * (0.003 + 0.1 + 29.9) / 3, abs=0.001)
    # The breakdowns add up to the totals, and to the labelled series of /metrics.
    classes = by_dimension(docs, "Requests", "StatusClass")
    assert classes == {("2xx",): 2, ("4xx",): 1, ("5xx",): 2}
    assert classes[("5xx",)] == sum(prom_sum(prom, "mtls_proxy_requests_total", status=s) for s in ("502", "504"))
    assert by_dimension(docs, "Requests", "Rule") == {("partner-a",): 3, ("(none)",): 1, ("partner-b",): 1}
    assert by_dimension(docs, "Requests", "Rule", "StatusClass")[("partner-a", "5xx")] == 1
    assert by_dimension(docs, "UpstreamErrors", "Kind") == {("timeout",): 1, ("connect",): 1}
    assert by_dimension(docs, "HandshakeFailures", "Reason") == {("expired",): 1}
    assert by_dimension(docs, "ProxyProtocolErrors", "Reason") == {("truncated",): 1}
    assert by_dimension(docs, "Denied", "Reason") == {("no_rule_for_client",): 1}


def test_later_intervals_carry_the_increase_only() -> None:
    emitter, m = EmfEmitter(NS), busy()
    emit(emitter, {0: m.snapshot()})
    before = scraped(m.snapshot())
    m.request("GET", 500, "partner-a", 0.01, 0.01)
    m.request("GET", 200, "partner-a", 0.03, 0.01)
    m.bump(m.handshake_failures, "revoked")
    docs = emit(emitter, {0: m.snapshot()}, NOW + 60)
    after = scraped(m.snapshot())
    t = totals(docs)
    assert t["Requests"] == prom_sum(after, "mtls_proxy_requests_total") - prom_sum(
        before, "mtls_proxy_requests_total") == 2
    assert t["RequestDuration"] == pytest.approx(20.0)  # the mean of this interval only: (10 + 30) / 2 ms
    assert by_dimension(docs, "Requests", "StatusClass") == {("2xx",): 1, ("5xx",): 1}
    assert by_dimension(docs, "HandshakeFailures", "Reason") == {("revoked",): 1}
    assert t["UpstreamErrors"] == 0 and "UpstreamErrors" not in {k for d in docs[1:] for k in metric_values(d)}
    assert docs[0]["_aws"]["Timestamp"] == int((NOW + 60) * 1000)
    # Nothing new: zeros, and the gauges as they are.
    docs = emit(emitter, {0: m.snapshot()}, NOW + 120)
    assert totals(docs)["Requests"] == 0 and totals(docs)["ConnectionsActive"] == 2


def test_workers_add_up_and_match_the_merged_scrape() -> None:
    emitter = EmfEmitter(NS)
    a, b = busy(1), busy(3)
    first = emit(emitter, {("w0", 100): a.snapshot(), ("w1", 101): b.snapshot()})
    assert totals(first)["Requests"] == prom_sum(scraped(a.snapshot(), b.snapshot()), "mtls_proxy_requests_total")
    assert totals(first)["ConnectionsActive"] == 4  # a gauge per worker: they add up
    b.request("GET", 200, "partner-b", 0.001, 0.001)
    second = emit(emitter, {("w0", 100): a.snapshot(), ("w1", 101): b.snapshot()}, NOW + 60)
    assert totals(second)["Requests"] == 1
    assert by_dimension(second, "Requests", "Rule") == {("partner-b",): 1}


def test_a_restarted_worker_is_neither_lost_nor_counted_twice() -> None:
    emitter = EmfEmitter(NS)
    old = busy(2)
    emit(emitter, {("w0", 100): busy(1).snapshot(), ("w1", 101): old.snapshot()})
    # Worker 1 died and came back as a new process: its counters start again at zero.
    new = Metrics()
    new.request("GET", 200, "partner-a", 0.001, 0.001)
    docs = emit(emitter, {("w0", 100): busy(1).snapshot(), ("w1", 202): new.snapshot()}, NOW + 60)
    assert totals(docs)["Requests"] == 1
    # The same source whose counters went down (a reset without a new id): all of its value counts, none negative.
    docs = emit(emitter, {("w0", 100): Metrics().snapshot(), ("w1", 202): new.snapshot()}, NOW + 120)
    assert totals(docs)["Requests"] == 0 and all(
        v >= 0 for d in docs for k, v in metric_values(d).items() if k != "CertDaysToExpiry")


def test_snapshots_are_not_modified() -> None:
    snap = busy().snapshot()
    kept = copy.deepcopy(snap)
    emit(EmfEmitter(NS), {0: snap})
    assert snap == kept


# --- certificates ------------------------------------------------------------------------------------------------------
def test_certificate_days_to_expiry_by_kind_and_name() -> None:
    docs = emit(EmfEmitter(NS), {0: busy().snapshot()})
    days = by_dimension(docs, "CertDaysToExpiry", "CertKind", "Cert")
    assert days == {("server", "server"): 30.0, ("client_ca", "client_ca:Partner Root"): 400.0,
                    ("crl", "crl:Partner Root"): 0.5}
    assert by_dimension(docs, "CertDaysToExpiry", "CertKind")[("crl",)] == 0.5


def test_certificate_days_take_the_earliest_worker_and_may_go_negative() -> None:
    a, b = busy(), busy()
    b.cert_expiry = dict(a.cert_expiry, server=NOW - 86400)  # one worker still holds an expired certificate
    for order in ({1: a.snapshot(), 2: b.snapshot()}, {2: b.snapshot(), 1: a.snapshot()}):
        docs = emit(EmfEmitter(NS), order)
        assert [d["CertDaysToExpiry"] for d in docs if d.get("CertKind") == "server"] == [-1.0]


# --- bounded, valid dimension values -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("rule", "shown"), [
    ("", "(none)"), ("   ", "(none)"), ("partner-ü", "partner-?"), ("tab\there", "tab?here"),
    ("x" * 1000, "x" * emf.MAX_DIMENSION_VALUE), ('quote"and\\slash', 'quote"and\\slash'),
])
def test_dimension_values_are_printable_ascii_and_bounded(rule: str, shown: str) -> None:
    m = Metrics()
    m.request("GET", 200, rule, 0.001, 0.001)
    m.cert_expiry = {f"client_ca:{rule}": NOW + 86400}
    docs = emit(EmfEmitter(NS), {0: m.snapshot()})
    assert by_dimension(docs, "Requests", "Rule") == {(shown,): 1}
    (cert,) = [d for d in docs if "Cert" in d]
    assert cert["Cert"] == emf.dimension_value(f"client_ca:{rule}") and cert["Cert"].isascii()


def test_a_huge_config_still_gives_lines_within_pipe_buf() -> None:
    m = Metrics()
    for i in range(50):
        m.request("GET", 503, f"{'é' * 300}-{i}", 0.001, None)
    emit(EmfEmitter(NS), {0: m.snapshot()})  # emit() checks every line against PIPE_BUF


@pytest.mark.parametrize("namespace", ["", "AWS/ApplicationELB", "has space", "x" * 256, "ünicode"])
def test_bad_namespaces_are_refused(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        EmfEmitter(namespace)


def test_every_handshake_reason_gets_its_own_document() -> None:
    m = Metrics()
    for reason in HANDSHAKE_REASONS:
        m.bump(m.handshake_failures, reason)
    docs = emit(EmfEmitter(NS), {0: m.snapshot()})
    assert by_dimension(docs, "HandshakeFailures", "Reason") == {(r,): 1 for r in HANDSHAKE_REASONS}


def test_log_lines_dropped_is_written_when_the_snapshot_has_it() -> None:
    snap = Metrics().snapshot() | {"log_lines_dropped": 7}
    emitter = EmfEmitter(NS)
    assert totals(emit(emitter, {0: snap}))["LogLinesDropped"] == 7
    assert totals(emit(emitter, {0: snap | {"log_lines_dropped": 9}}, NOW + 60))["LogLinesDropped"] == 2
    assert totals(emit(EmfEmitter(NS), {0: Metrics().snapshot()}))["LogLinesDropped"] == 0  # a zero, every time


# --- the checker itself catches what the specification forbids -------------------------------------------------------
def _valid() -> dict[str, Any]:
    return json.loads(EmfEmitter(NS).lines({0: busy().snapshot()}, NOW)[1])  # a Requests document with dimensions


@pytest.mark.parametrize("breakage", [
    lambda d: d.pop("_aws"),
    lambda d: d["_aws"].pop("Timestamp"),
    lambda d: d["_aws"].__setitem__("Timestamp", NOW),  # seconds, as a float
    lambda d: d["_aws"].__setitem__("Timestamp", int(NOW)),  # seconds
    lambda d: d["_aws"].__setitem__("LogGroup", "x"),
    lambda d: d["_aws"]["CloudWatchMetrics"][0].__setitem__("Namespace", "AWS/Mine"),
    lambda d: d["_aws"]["CloudWatchMetrics"][0].__setitem__("Dimensions", []),
    lambda d: d["_aws"]["CloudWatchMetrics"][0].__setitem__("Dimensions", [[f"d{i}" for i in range(31)]]),
    lambda d: d.pop("Rule"),  # a dimension that is not a top-level member
    lambda d: d.__setitem__("Rule", 3),
    lambda d: d.__setitem__("Rule", ""),
    lambda d: d.__setitem__("Rule", "ü"),
    lambda d: d.__setitem__("Requests", "5"),
    lambda d: d.__setitem__("Requests", True),
    lambda d: d.__setitem__("Requests", list(range(101))),
    lambda d: d["_aws"]["CloudWatchMetrics"][0]["Metrics"][0].__setitem__("Unit", "Days"),
    lambda d: d["_aws"]["CloudWatchMetrics"][0]["Metrics"].append({"Name": "Requests"}),
    lambda d: d["_aws"]["CloudWatchMetrics"][0].__setitem__("Metrics", [{"Name": f"m{i}"} for i in range(101)]),
])
def test_the_checker_refuses_what_the_specification_forbids(breakage: Any) -> None:
    doc = _valid()
    check_document(copy.deepcopy(doc))
    breakage(doc)
    with pytest.raises((AssertionError, KeyError)):
        check_document(doc)


def test_the_checker_refuses_a_line_with_extra_data() -> None:
    line = EmfEmitter(NS).lines({0: busy().snapshot()}, NOW)[0]
    with pytest.raises(json.JSONDecodeError):
        check_line(line.rstrip("\n") + " trailing\n")
    with pytest.raises(AssertionError):
        check_line(line + line)
