"""Prometheus metrics: plain counters on the hot path, families built only when scraped.

Owns: every metric the proxy exports, their names and label sets, and turning them into Prometheus families on
an injected ``CollectorRegistry`` (never the global one, so two proxies can run in one process).

Why not prometheus_client's Counter/Histogram objects on the request path: each ``labels()`` lookup and
``inc()`` takes a lock and allocates; a dict increment costs a fraction of that.  ``snapshot()`` gives a plain
dict, so a supervisor can add up the snapshots of several worker processes and expose one set of families.

prometheus_client is imported only where families are built (at the first scrape): worker processes of a
supervisor, which only send snapshots, never load it (it pulls in http.server, email, urllib.request: ~3 MB of
resident memory per process).

Labels only ever come from bounded sets: methods are folded into a fixed list, rule names come from the config,
reasons and kinds are fixed strings.

Must not: do IO, or take labels from client input.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric
    from prometheus_client.registry import CollectorRegistry

from .errors import UPSTREAM_ERROR_KINDS
from .policy import DENIED_REASONS as POLICY_DENIALS
from .tls import HANDSHAKE_REASONS
from .wire.proxy_protocol import REASONS as PROXY_PROTOCOL_REASONS

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# The other bounded label sets, exported as zero-valued series from the start: a series that appears only with
# its first event hides that event from rate()/increase() (Prometheus "Instrumentation: avoid missing metrics").
# Each label set is imported from the module that produces the values.  Denials: the policy's, and the rate limit
# (a 429, not a 403).
DENIED_REASONS = (*POLICY_DENIALS, "rate_limited")

Snapshot = dict[str, Any]


_STATUS_LABELS = {code: str(code) for code in range(100, 600)}


class Histogram:
    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    """The live counters of one process."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.denied: dict[str, int] = dict.fromkeys(DENIED_REASONS, 0)
        self.upstream_errors: dict[str, int] = dict.fromkeys(UPSTREAM_ERROR_KINDS, 0)
        self.handshake_failures: dict[str, int] = dict.fromkeys(HANDSHAKE_REASONS, 0)
        self.reloads: dict[str, int] = {"success": 0, "error": 0}
        self.proxy_protocol_errors: dict[str, int] = dict.fromkeys(sorted(PROXY_PROTOCOL_REASONS), 0)
        self.connections_total = 0
        self.connections_active = 0
        self.connections_rejected = 0
        self.log_lines_dropped = 0  # access-log lines the output could not take (proxy.accesslog)
        self.cert_expiry: dict[str, float] = {}
        # Filled from the partner state when a snapshot is taken (proxy.partners, proxy.cert_tracker):
        self.client_cert_expiry: dict[str, float] = {}  # rule -> earliest notAfter seen in the last 24 h
        self.cert_tracking_dropped = 0
        self.rate_limit_evictions = 0
        self.request_duration = Histogram()
        self.upstream_duration = Histogram()
        # Set by the server: returns (client_cert_expiry, cert_tracking_dropped, rate_limit_evictions) at snapshot.
        self.partner_facts: Callable[[], tuple[dict[str, float], int, int]] | None = None
        # Remote sources (proxy.sources), by config key (a bounded label: never the URL): failed polls, and the
        # time.monotonic() of the last good read (shown as an age).
        self.source_errors: dict[str, int] = {}
        self.source_last_ok: dict[str, float] = {}

    def request(self, method: str, status: int, rule: str | None, duration: float, upstream: float | None) -> None:
        key = (method if method in KNOWN_METHODS else "OTHER", _STATUS_LABELS.get(status) or str(status), rule or "")
        req = self.requests
        req[key] = req.get(key, 0) + 1
        # Histogram.observe, inlined: this runs once per request, and two Python calls cost more than the update.
        h = self.request_duration
        h.counts[bisect_left(h.buckets, duration)] += 1
        h.total += duration
        h.count += 1
        if upstream is not None:
            h = self.upstream_duration
            h.counts[bisect_left(h.buckets, upstream)] += 1
            h.total += upstream
            h.count += 1

    @staticmethod
    def bump(table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1

    def snapshot(self) -> Snapshot:
        if self.partner_facts is not None:
            self.client_cert_expiry, self.cert_tracking_dropped, self.rate_limit_evictions = self.partner_facts()
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "denied": dict(self.denied),
            "upstream_errors": dict(self.upstream_errors),
            "handshake_failures": dict(self.handshake_failures),
            "reloads": dict(self.reloads),
            "proxy_protocol_errors": dict(self.proxy_protocol_errors),
            "connections_total": self.connections_total,
            "connections_active": self.connections_active,
            "connections_rejected": self.connections_rejected,
            "log_lines_dropped": self.log_lines_dropped,
            "cert_expiry": dict(self.cert_expiry),
            "client_cert_expiry": dict(self.client_cert_expiry),
            "cert_tracking_dropped": self.cert_tracking_dropped,
            "rate_limit_evictions": self.rate_limit_evictions,
            "request_duration": _hist_snapshot(self.request_duration),
            "upstream_duration": _hist_snapshot(self.upstream_duration),
            "source_errors": dict(self.source_errors),
            "source_age": {k: max(0.0, time.monotonic() - v) for k, v in self.source_last_ok.items()},
        }


def _hist_snapshot(h: Histogram) -> dict[str, Any]:
    return {"buckets": list(h.buckets), "counts": list(h.counts), "sum": h.total, "count": h.count}


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Add up the snapshots of several workers (gauges add too: active connections are per worker)."""
    out: Snapshot = Metrics().snapshot()
    reqs: dict[tuple[str, str, str], int] = {}
    for snap in snapshots:
        for m, s, r, v in snap["requests"]:
            reqs[(m, s, r)] = reqs.get((m, s, r), 0) + v
        for key in ("denied", "upstream_errors", "handshake_failures", "reloads", "proxy_protocol_errors"):
            for k, v in snap[key].items():
                out[key][k] = out[key].get(k, 0) + v
        for key in ("connections_total", "connections_active", "connections_rejected", "log_lines_dropped",
                    "cert_tracking_dropped", "rate_limit_evictions"):
            out[key] += snap[key]
        for key in ("cert_expiry", "client_cert_expiry"):
            for k, v in snap[key].items():
                out[key][k] = min(v, out[key].get(k, v))
        for k, v in snap.get("source_errors", {}).items():
            out["source_errors"][k] = out["source_errors"].get(k, 0) + v
        for k, v in snap.get("source_age", {}).items():  # the stalest worker's copy is what matters
            out["source_age"][k] = max(v, out["source_age"].get(k, v))
        for key in ("request_duration", "upstream_duration"):
            h, o = snap[key], out[key]
            o["counts"] = [a + b for a, b in zip(o["counts"], h["counts"])]
            o["sum"] += h["sum"]
            o["count"] += h["count"]
    out["requests"] = [[*k, v] for k, v in reqs.items()]
    return out


def families(snap: Snapshot) -> Iterator[Metric]:
    """Prometheus families for one (possibly merged) snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    c = CounterMetricFamily("mtls_proxy_requests", "Requests answered, by method, status and matched rule.",
                            labels=["method", "status", "rule"])
    for m, s, r, v in snap["requests"]:
        c.add_metric([m, s, r], v)
    yield c
    yield _hist("mtls_proxy_request_duration_seconds", "Time from request head to the end of the response.",
                snap["request_duration"])
    yield _hist("mtls_proxy_upstream_duration_seconds", "Time from sending a request upstream to its response end.",
                snap["upstream_duration"])
    yield _labelled(CounterMetricFamily, "mtls_proxy_upstream_errors", "Upstream failures by kind.", "kind",
                    snap["upstream_errors"])
    yield _labelled(CounterMetricFamily, "mtls_proxy_tls_handshake_failures",
                    "Client TLS handshakes refused or failed, by reason (from OpenSSL's verify result).", "reason",
                    snap["handshake_failures"])
    yield _labelled(CounterMetricFamily, "mtls_proxy_denied", "Requests refused by the allow rules, by reason.",
                    "reason", snap["denied"])
    yield GaugeMetricFamily("mtls_proxy_connections_active", "Open client connections (including handshaking).",
                            value=snap["connections_active"])
    yield CounterMetricFamily("mtls_proxy_connections", "Client connections accepted.",
                              value=snap["connections_total"])
    yield CounterMetricFamily("mtls_proxy_connections_rejected", "Connections closed at once: max_connections.",
                              value=snap["connections_rejected"])
    yield CounterMetricFamily("mtls_proxy_log_lines_dropped",
                              "Access-log lines dropped because the output (stdout) did not take them in time.",
                              value=snap["log_lines_dropped"])
    yield _labelled(GaugeMetricFamily, "mtls_proxy_cert_expiry_timestamp_seconds",
                    "Expiry (notAfter; for a CRL its nextUpdate) of the loaded server cert, client CAs and CRLs.",
                    "cert", snap["cert_expiry"])
    yield _labelled(GaugeMetricFamily, "mtls_proxy_client_cert_expiry_timestamp_seconds",
                    "Earliest notAfter among the client certificates an allow rule let in during the last 24 hours.",
                    "rule", snap["client_cert_expiry"])
    yield CounterMetricFamily("mtls_proxy_cert_tracking_dropped",
                              "Certificates dropped from the /certs table because it was full.",
                              value=snap["cert_tracking_dropped"])
    yield CounterMetricFamily("mtls_proxy_rate_limit_evictions",
                              "Rate-limit buckets dropped before they refilled (the table was full of active clients).",
                              value=snap["rate_limit_evictions"])
    yield _labelled(CounterMetricFamily, "mtls_proxy_reloads", "Certificate/rule reloads by result.", "result",
                    snap["reloads"])
    yield _labelled(CounterMetricFamily, "mtls_proxy_source_errors",
                    "Polls in which a remote source (by config key) could not be read or held refused content.",
                    "source", snap.get("source_errors", {}))
    yield _labelled(GaugeMetricFamily, "mtls_proxy_source_age_seconds",
                    "Seconds since each remote source (by config key) was last read and accepted.", "source",
                    snap.get("source_age", {}))
    yield _labelled(CounterMetricFamily, "mtls_proxy_proxy_protocol_errors",
                    "Connections closed for a bad PROXY header, by reason.", "reason", snap["proxy_protocol_errors"])


def _labelled(cls: Any, name: str, doc: str, label: str, values: dict[str, float]) -> Metric:
    fam = cls(name, doc, labels=[label])
    for k, v in sorted(values.items()):
        fam.add_metric([k], v)
    return fam


def _hist(name: str, doc: str, h: dict[str, Any]) -> Metric:
    from prometheus_client.core import HistogramMetricFamily

    cum, buckets = 0, []
    for bound, n in zip([*h["buckets"], float("inf")], h["counts"]):
        cum += n
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h["sum"])


class SnapshotCollector:
    """Registers on an injected registry; ``source`` returns the snapshots to merge at scrape time.

    (A prometheus_client Collector by protocol: the registry only needs ``collect``.)
    """

    def __init__(self, source: Callable[[], list[Snapshot]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        snaps = self._source()
        yield from families(snaps[0] if len(snaps) == 1 else merge(snaps))


def registry_for(source: Callable[[], list[Snapshot]]) -> CollectorRegistry:
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source))
    return registry
