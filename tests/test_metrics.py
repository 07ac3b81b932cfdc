"""metrics: counters per process, snapshot/merge arithmetic across workers, and the families built at scrape time
on a private registry (parsed back with prometheus_client's own parser)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import prometheus_client
import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics
from proxy.metrics import DURATION_BUCKETS, Metrics, Snapshot, merge, registry_for
from proxy.wire.proxy_protocol import REASONS as PP_REASONS

Labels = frozenset[tuple[str, str]]

# Every counter table with a bounded label set, and the label values it must export (at 0) from the start.
PRESET: dict[str, tuple[str, ...]] = {
    "denied": metrics.DENIED_REASONS,
    "upstream_errors": metrics.UPSTREAM_ERROR_KINDS,
    "handshake_failures": metrics.HANDSHAKE_REASONS,
    "reloads": ("success", "error"),
    "proxy_protocol_errors": tuple(sorted(PP_REASONS)),
}
# snapshot key -> (family sample name, label name)
FAMILY: dict[str, tuple[str, str]] = {
    "denied": ("mtls_proxy_denied_total", "reason"),
    "upstream_errors": ("mtls_proxy_upstream_errors_total", "kind"),
    "handshake_failures": ("mtls_proxy_tls_handshake_failures_total", "reason"),
    "reloads": ("mtls_proxy_reloads_total", "result"),
    "proxy_protocol_errors": ("mtls_proxy_proxy_protocol_errors_total", "reason"),
}


def scrape(*snaps: Snapshot) -> tuple[dict[str, str], dict[tuple[str, Labels], float]]:
    """Family types and sample values, as a Prometheus server would read them from this registry."""
    text = generate_latest(registry_for(lambda: list(snaps))).decode()
    types: dict[str, str] = {}
    values: dict[tuple[str, Labels], float] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in values, f"duplicate sample {key}"
            values[key] = s.value
    return types, values


def busy(offset: int = 0) -> Metrics:
    """A Metrics object that has seen a bit of everything."""
    m = Metrics()
    m.request("GET", 200, "partner-a", 0.004, 0.003)
    m.request("GET", 200, "partner-a", 0.2, 0.1)
    m.request("POST", 403, None, 0.0005, None)
    m.bump(m.denied, "path_not_allowed")
    m.bump(m.upstream_errors, "timeout")
    m.bump(m.handshake_failures, "untrusted")
    m.bump(m.reloads, "success")
    m.bump(m.proxy_protocol_errors, "bad_tlv")
    m.connections_total = 10 + offset
    m.connections_active = 2 + offset
    m.connections_rejected = 1
    m.cert_expiry = {"server": 2_000_000_000.0 + offset, "client_ca:Root": 1_900_000_000.0 - offset}
    return m


# ---- per-process counters --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, label", [
    *[(m, m) for m in sorted(metrics.KNOWN_METHODS)],
    ("BREW", "OTHER"), ("get", "OTHER"), ("PROPFIND", "OTHER"), ("CONNECT", "OTHER"), ("TRACE", "OTHER"),
])
def test_methods_outside_the_fixed_list_fold_into_other(method: str, label: str) -> None:
    m = Metrics()
    m.request(method, 200, "r", 0.01, None)
    assert m.requests == {(label, "200", "r"): 1}


def test_client_chosen_methods_cannot_grow_the_label_set() -> None:
    m = Metrics()
    for i in range(1000):
        m.request(f"X{i}", 400, None, 0.001, None)
    assert m.requests == {("OTHER", "400", ""): 1000}  # no rule: the empty label


def test_bounded_label_sets_start_at_zero() -> None:
    snap = Metrics().snapshot()
    for key, labels in PRESET.items():
        assert snap[key] == dict.fromkeys(labels, 0), key
    assert PRESET["proxy_protocol_errors"], "the PROXY reasons must not be empty"
    types, values = scrape(snap)
    for key, (sample, label) in FAMILY.items():
        for value in PRESET[key]:
            assert values[(sample, frozenset({(label, value)}))] == 0.0, (sample, value)
    assert types["mtls_proxy_requests"] == "counter"
    assert not [k for k in values if k[0] == "mtls_proxy_requests_total"]  # nothing seen, nothing invented


@pytest.mark.parametrize("value, bucket", [
    (0.0, 0.001), (0.001, 0.001),  # Prometheus buckets are "less than or equal": the bound itself is inside
    (0.0010001, 0.0025), (0.05, 0.05), (30.0, 30.0), (60.0, 60.0), (60.5, math.inf), (1e9, math.inf),
])
def test_histogram_puts_a_value_in_the_first_bucket_whose_bound_is_not_below_it(value: float, bucket: float) -> None:
    h = metrics.Histogram()
    h.observe(value)
    bounds = [*DURATION_BUCKETS, math.inf]
    assert h.counts == [1 if b == bucket else 0 for b in bounds]
    assert (h.count, h.total) == (1, value)


def test_request_feeds_both_histograms_only_when_there_was_an_upstream() -> None:
    m = Metrics()
    m.request("GET", 200, "r", 0.02, 0.01)
    m.request("GET", 403, "r", 0.001, None)  # refused before any upstream work
    assert (m.request_duration.count, m.upstream_duration.count) == (2, 1)
    assert m.upstream_duration.total == 0.01


def test_two_metrics_objects_are_independent_and_the_global_registry_is_untouched() -> None:
    before = {fam.name for fam in prometheus_client.REGISTRY.collect()}
    a, b = Metrics(), Metrics()
    a.request("GET", 200, "r", 0.01, None)
    a.bump(a.denied, "no_rule_for_client")
    a.cert_expiry["server"] = 1.0
    assert b.requests == {} and b.denied["no_rule_for_client"] == 0 and b.cert_expiry == {}
    assert b.request_duration.count == 0
    ra, rb = registry_for(lambda: [a.snapshot()]), registry_for(lambda: [b.snapshot()])
    assert ra is not rb
    assert scrape(a.snapshot())[1][("mtls_proxy_requests_total",
                                    frozenset({("method", "GET"), ("status", "200"), ("rule", "r")}))] == 1
    for registry in (ra, rb):
        generate_latest(registry)
    assert {fam.name for fam in prometheus_client.REGISTRY.collect()} == before
    assert not any(n.startswith("mtls_proxy") for n in before)


def test_snapshot_is_a_copy() -> None:
    m = busy()
    snap = m.snapshot()
    m.request("GET", 200, "partner-a", 0.01, 0.01)
    m.bump(m.denied, "path_not_allowed")
    m.cert_expiry["server"] = 0.0
    assert snap["denied"]["path_not_allowed"] == 1 and snap["cert_expiry"]["server"] == 2_000_000_000.0
    assert snap["request_duration"]["count"] == 3
    assert ["GET", "200", "partner-a", 2] in snap["requests"]


# ---- merging the snapshots of several workers ---------------------------------------------------------------


def test_merge_adds_counters_and_gauges_bucketwise_and_takes_the_earliest_expiry() -> None:
    a, b = busy(0), busy(5)
    b.request("DELETE", 500, "partner-b", 45.0, 44.0)
    b.bump(b.upstream_errors, "timeout")
    b.cert_expiry["crl:Root"] = 1_800_000_000.0
    sa, sb = a.snapshot(), b.snapshot()
    out = merge([sa, sb])

    assert sorted(map(tuple, out["requests"])) == sorted([
        ("GET", "200", "partner-a", 4), ("POST", "403", "", 2), ("DELETE", "500", "partner-b", 1)])
    assert out["denied"] == {**dict.fromkeys(metrics.DENIED_REASONS, 0), "path_not_allowed": 2}
    assert out["upstream_errors"]["timeout"] == 3 and sum(out["upstream_errors"].values()) == 3
    assert out["handshake_failures"]["untrusted"] == 2 and out["reloads"] == {"success": 2, "error": 0}
    assert out["proxy_protocol_errors"]["bad_tlv"] == 2
    assert (out["connections_total"], out["connections_active"], out["connections_rejected"]) == (25, 9, 2)
    assert out["cert_expiry"] == {"server": 2_000_000_000.0, "client_ca:Root": 1_900_000_000.0 - 5,
                                  "crl:Root": 1_800_000_000.0}
    for key in ("request_duration", "upstream_duration"):
        h, ha, hb = out[key], sa[key], sb[key]
        assert h["buckets"] == list(DURATION_BUCKETS)
        assert h["counts"] == [x + y for x, y in zip(ha["counts"], hb["counts"])]
        assert h["count"] == ha["count"] + hb["count"] and h["sum"] == pytest.approx(ha["sum"] + hb["sum"])
    assert out["request_duration"]["count"] == 7 and out["upstream_duration"]["count"] == 5
    # the inputs are not modified
    assert sa == a.snapshot() and sb == b.snapshot()


def test_merge_of_one_snapshot_is_that_snapshot() -> None:
    snap = busy().snapshot()
    assert merge([snap]) == snap


def test_merge_of_nothing_is_all_zero() -> None:
    assert merge([]) == Metrics().snapshot()


def test_merge_accepts_snapshots_after_a_json_round_trip() -> None:
    """Workers send snapshots to the supervisor as JSON (tuples become lists, inf becomes Infinity)."""
    a, b = busy(0), busy(1)
    a.cert_expiry["crl:no-next-update"] = math.inf
    wire = [json.loads(json.dumps(s.snapshot())) for s in (a, b)]
    assert merge(wire) == merge([a.snapshot(), b.snapshot()])


# ---- families: what a scrape shows --------------------------------------------------------------------------


def test_families_parse_back_to_the_snapshot_values() -> None:
    m = busy()
    m.request("get", 599, "partner-b", 100.0, 90.0)  # OTHER, beyond the last bucket
    types, v = scrape(m.snapshot())

    def lab(**kw: str) -> Labels:
        return frozenset(kw.items())

    assert types == {
        "mtls_proxy_requests": "counter", "mtls_proxy_request_duration_seconds": "histogram",
        "mtls_proxy_upstream_duration_seconds": "histogram", "mtls_proxy_upstream_errors": "counter",
        "mtls_proxy_tls_handshake_failures": "counter", "mtls_proxy_denied": "counter",
        "mtls_proxy_connections_active": "gauge", "mtls_proxy_connections": "counter",
        "mtls_proxy_connections_rejected": "counter", "mtls_proxy_cert_expiry_timestamp_seconds": "gauge",
        "mtls_proxy_reloads": "counter", "mtls_proxy_proxy_protocol_errors": "counter",
        "mtls_proxy_log_lines_dropped": "counter",
        "mtls_proxy_client_cert_expiry_timestamp_seconds": "gauge", "mtls_proxy_cert_tracking_dropped": "counter",
        "mtls_proxy_rate_limit_evictions": "counter", "mtls_proxy_source_errors": "counter",
        "mtls_proxy_source_age_seconds": "gauge"}
    requests = {k[1]: val for k, val in v.items() if k[0] == "mtls_proxy_requests_total"}
    assert requests == {lab(method="GET", status="200", rule="partner-a"): 2,
                        lab(method="POST", status="403", rule=""): 1,
                        lab(method="OTHER", status="599", rule="partner-b"): 1}
    assert v[("mtls_proxy_denied_total", lab(reason="path_not_allowed"))] == 1
    assert v[("mtls_proxy_upstream_errors_total", lab(kind="timeout"))] == 1
    assert v[("mtls_proxy_tls_handshake_failures_total", lab(reason="untrusted"))] == 1
    assert v[("mtls_proxy_reloads_total", lab(result="success"))] == 1
    assert v[("mtls_proxy_proxy_protocol_errors_total", lab(reason="bad_tlv"))] == 1
    assert v[("mtls_proxy_connections_active", lab())] == 2
    assert v[("mtls_proxy_connections_total", lab())] == 10
    assert v[("mtls_proxy_connections_rejected_total", lab())] == 1
    assert v[("mtls_proxy_cert_expiry_timestamp_seconds", lab(cert="server"))] == 2_000_000_000.0
    assert v[("mtls_proxy_cert_expiry_timestamp_seconds", lab(cert="client_ca:Root"))] == 1_900_000_000.0

    # Histograms: cumulative buckets with the configured bounds, +Inf == _count, _sum the total.
    for name, observed in (("mtls_proxy_request_duration_seconds", [0.004, 0.2, 0.0005, 100.0]),
                           ("mtls_proxy_upstream_duration_seconds", [0.003, 0.1, 90.0])):
        buckets = {dict(k[1])["le"]: val for k, val in v.items() if k[0] == name + "_bucket"}
        assert [float(le) for le in buckets] == [*DURATION_BUCKETS, math.inf]
        for le, cum in buckets.items():
            assert cum == sum(1 for x in observed if x <= float(le)), (name, le)
        assert v[(name + "_count", lab())] == len(observed)
        assert v[(name + "_sum", lab())] == pytest.approx(sum(observed))


def test_the_registry_merges_every_snapshot_its_source_returns() -> None:
    a, b = busy(0), busy(5)
    _, merged = scrape(a.snapshot(), b.snapshot())
    _, expected = scrape(merge([a.snapshot(), b.snapshot()]))
    assert merged == expected
    assert merged[("mtls_proxy_connections_total", frozenset())] == 25


def test_the_registry_reads_its_source_at_every_scrape() -> None:
    m = Metrics()
    registry = registry_for(lambda: [m.snapshot()])
    key = ("mtls_proxy_connections_total", frozenset())

    def value() -> float:
        text = generate_latest(registry).decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if (s.name, frozenset(s.labels.items())) == key:
                    return s.value
        raise AssertionError("no connections sample")

    assert value() == 0
    m.connections_total = 7
    assert value() == 7


def test_label_values_are_escaped_in_the_exposition() -> None:
    """Rule names come from the config and may contain characters the text format must escape."""
    m = Metrics()
    rule = 'odd "rule" \\ name'
    m.request("GET", 200, rule, 0.01, None)
    _, v = scrape(m.snapshot())
    assert v[("mtls_proxy_requests_total", frozenset({("method", "GET"), ("status", "200"), ("rule", rule)}))] == 1


def test_families_can_be_built_again_from_the_same_snapshot() -> None:
    snap: Any = busy().snapshot()
    first = [(f.name, f.samples) for f in metrics.families(snap)]
    assert first == [(f.name, f.samples) for f in metrics.families(snap)] and len(first) == 18


def test_status_label_for_any_three_digit_status() -> None:
    """The parser lets upstream statuses up to 999 through; their label is still the number."""
    m = Metrics()
    m.request("GET", 799, "r", 0.001, None)
    m.request("GET", 200, "r", 0.001, None)
    assert m.requests == {("GET", "799", "r"): 1, ("GET", "200", "r"): 1}


def test_source_metrics_are_labelled_by_config_key_and_merge_across_workers() -> None:
    a, b = Metrics(), Metrics()
    a.source_errors, a.source_last_ok = {"server.crl": 3}, {"server.crl": time.monotonic() - 100}
    b.source_errors, b.source_last_ok = {"server.crl": 2}, {"server.crl": time.monotonic() - 5}
    _, v = scrape(merge([a.snapshot(), b.snapshot()]))
    assert v[("mtls_proxy_source_errors_total", frozenset({("source", "server.crl")}))] == 5
    age = v[("mtls_proxy_source_age_seconds", frozenset({("source", "server.crl")}))]
    assert 100 <= age < 200  # the stalest worker's copy
