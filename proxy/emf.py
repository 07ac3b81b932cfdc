"""CloudWatch Embedded Metric Format: metric snapshots in, one JSON log line per EMF document out.

Owns: the EMF documents the proxy writes to stdout for CloudWatch to turn into metrics (the ``_aws`` envelope with a
Timestamp in milliseconds and one metric directive per document; dimension values as top-level strings, metric
values as top-level numbers), the CloudWatch metric and dimension names, keeping dimension values valid and bounded
(printable ASCII, never empty, at most ``MAX_DIMENSION_VALUE`` characters), and the interval bookkeeping: counters
are written as their increase since the previous emission, tracked per snapshot source, so the snapshots of several
workers add up and a restarted worker (whose counters start again at zero) is neither lost nor counted twice.

Documents per emission (each one line, far below PIPE_BUF, so it is written whole):
- the totals, without dimensions, always (a quiet interval still gives every alarm a zero, and ConnectionsActive is
  the heartbeat that says the pipeline works);
- Requests by StatusClass, by Rule and by both, one document per (rule, status class) that changed;
- HandshakeFailures, Denied, ProxyProtocolErrors by Reason and UpstreamErrors by Kind, one document per label that
  changed;
- CertDaysToExpiry by CertKind and by CertKind + Cert, one document per loaded certificate, CA and CRL.

Must not: do IO (the caller writes the lines through the access log's writer, so they never interleave with access-log
lines), read the clock (the caller passes ``now``), or take a dimension value from client input (rule names come from
the config, certificate names from the loaded certificates, everything else from fixed sets).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from .config.values import CLOUDWATCH_NAMESPACE

Snapshot = dict[str, Any]
Document = dict[str, Any]

# Limits of the EMF specification and of CloudWatch dimensions.
MAX_METRICS_PER_DIRECTIVE = 100
MAX_DIMENSIONS_PER_SET = 30
MAX_DIMENSION_VALUE = 250  # CloudWatch allows 1024; a longer rule or CA name is cut (and stays one line << PIPE_BUF)
UNITS = frozenset({
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes", "Bits",
    "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second", "Kilobytes/Second",
    "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second", "Kilobits/Second",
    "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None"})

NO_RULE = "(none)"  # dimension values may not be empty: requests no rule matched
# Totals document: metric name -> unit. Counters are per-interval increases, the rest current values.
TOTALS = {
    "Requests": "Count", "Denied": "Count", "HandshakeFailures": "Count", "UpstreamErrors": "Count",
    "ProxyProtocolErrors": "Count", "Connections": "Count", "ConnectionsRejected": "Count",
    "ReloadFailures": "Count", "ConnectionsActive": "Count", "LogLinesDropped": "Count",
    "RequestDuration": "Milliseconds", "UpstreamDuration": "Milliseconds",
}
# Labelled counters: snapshot key -> (metric name, dimension name).
LABELLED = {
    "handshake_failures": ("HandshakeFailures", "Reason"),
    "denied": ("Denied", "Reason"),
    "proxy_protocol_errors": ("ProxyProtocolErrors", "Reason"),
    "upstream_errors": ("UpstreamErrors", "Kind"),
}
UNIT = {**TOTALS, "CertDaysToExpiry": "None"}  # days are no CloudWatch unit
REQUEST_DIMENSIONS = [["StatusClass"], ["Rule"], ["Rule", "StatusClass"]]
CERT_DIMENSIONS = [["CertKind"], ["CertKind", "Cert"]]
_SCALARS = {"connections_total": "Connections", "connections_rejected": "ConnectionsRejected",
            "log_lines_dropped": "LogLinesDropped"}
_HISTOGRAMS = {"request_duration": "RequestDuration", "upstream_duration": "UpstreamDuration"}
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")

Series = tuple[str, ...]


def dimension_value(text: str) -> str:
    """A CloudWatch dimension value: printable ASCII, at least one non-space character, bounded length."""
    value = _UNPRINTABLE.sub("?", text).strip()[:MAX_DIMENSION_VALUE].strip()
    return value or NO_RULE


def status_class(status: str) -> str:
    return f"{status[0]}xx" if len(status) == 3 and status[0] in "12345" and status.isdigit() else "other"


def counters(snap: Snapshot) -> dict[Series, float]:
    """Every cumulative counter of one snapshot as a flat series -> value table."""
    out: dict[Series, float] = {}
    for _method, status, rule, count in snap.get("requests", ()):
        key = ("Requests", rule or "", status_class(status))
        out[key] = out.get(key, 0) + count
    for snap_key, (name, _dim) in LABELLED.items():
        for label, count in snap.get(snap_key, {}).items():
            out[(name, label)] = count
    for snap_key, name in _SCALARS.items():
        if snap_key in snap:
            out[(name,)] = snap[snap_key]
    out[("ReloadFailures",)] = snap.get("reloads", {}).get("error", 0)
    for snap_key, name in _HISTOGRAMS.items():
        if snap_key in snap:
            out[(name, "sum")] = snap[snap_key]["sum"]
            out[(name, "count")] = snap[snap_key]["count"]
    return out


def increase(current: Mapping[Series, float], previous: Mapping[Series, float] | None) -> dict[Series, float]:
    """Counter increase since ``previous``; a series that went down was reset (a new process), so all of it counts."""
    if previous is None:
        return dict(current)
    out = {}
    for key, value in current.items():
        before = previous.get(key, 0)
        out[key] = value - before if value >= before else value
    return out


class EmfEmitter:
    """Turns successive snapshots into EMF lines; one per process that writes metrics (a task's supervisor, or the
    single server process)."""

    def __init__(self, namespace: str) -> None:
        if not CLOUDWATCH_NAMESPACE.fullmatch(namespace):
            raise ValueError(f"not a CloudWatch namespace: {namespace!r}")
        self.namespace = namespace
        self._previous: dict[Hashable, dict[Series, float]] = {}

    def documents(self, snapshots: Mapping[Hashable, Snapshot], now: float) -> list[Document]:
        """The documents for the interval ending ``now`` (Unix seconds). ``snapshots`` maps a stable id of each
        source (a worker and its process id) to its latest snapshot; a source that is gone is forgotten."""
        delta: dict[Series, float] = {}
        current = {source: counters(snap) for source, snap in snapshots.items()}
        for source, table in current.items():
            for key, value in increase(table, self._previous.get(source)).items():
                delta[key] = delta.get(key, 0) + value
        self._previous = current
        stamp = int(now * 1000)
        docs = [self._totals(delta, snapshots.values(), stamp)]
        docs += self._requests(delta, stamp)
        docs += self._labelled(delta, stamp)
        docs += self._certs(snapshots.values(), now, stamp)
        return docs

    def lines(self, snapshots: Mapping[Hashable, Snapshot], now: float) -> list[str]:
        return [encode(doc) for doc in self.documents(snapshots, now)]

    def _document(self, stamp: int, dimensions: list[list[str]], values: Mapping[str, float],
                  members: Mapping[str, str] | None = None) -> Document:
        metrics = [{"Name": name, "Unit": UNIT[name]} for name in values]
        doc: Document = {"_aws": {"Timestamp": stamp, "CloudWatchMetrics": [
            {"Namespace": self.namespace, "Dimensions": dimensions, "Metrics": metrics}]}}
        doc.update(members or {})
        doc.update(values)
        return doc

    def _totals(self, delta: Mapping[Series, float], snaps: Iterable[Snapshot], stamp: int) -> Document:
        values: dict[str, float] = {}
        for name in ("Requests", "Denied", "HandshakeFailures", "UpstreamErrors", "ProxyProtocolErrors"):
            values[name] = sum(v for k, v in delta.items() if k[0] == name)
        for name in ("Connections", "ConnectionsRejected", "ReloadFailures", "LogLinesDropped"):
            if (name,) in delta:
                values[name] = delta[(name,)]
        values["ConnectionsActive"] = sum(s.get("connections_active", 0) for s in snaps)
        for name in _HISTOGRAMS.values():
            count = delta.get((name, "count"), 0)
            if count > 0:  # a mean over the interval; no value when nothing was measured
                values[name] = round(1000 * delta[(name, "sum")] / count, 3)
        return self._document(stamp, [[]], values)

    def _requests(self, delta: Mapping[Series, float], stamp: int) -> list[Document]:
        by_dimension: dict[tuple[str, str], float] = {}
        for key, value in delta.items():
            if key[0] == "Requests" and value:
                dims = (dimension_value(key[1]), key[2])
                by_dimension[dims] = by_dimension.get(dims, 0) + value
        return [self._document(stamp, REQUEST_DIMENSIONS, {"Requests": n}, {"Rule": rule, "StatusClass": cls})
                for (rule, cls), n in sorted(by_dimension.items())]

    def _labelled(self, delta: Mapping[Series, float], stamp: int) -> list[Document]:
        docs = []
        for name, dim in LABELLED.values():
            for key, value in sorted(delta.items()):
                if key[0] == name and len(key) == 2 and value:
                    docs.append(self._document(stamp, [[dim]], {name: value}, {dim: dimension_value(key[1])}))
        return docs

    def _certs(self, snaps: Iterable[Snapshot], now: float, stamp: int) -> list[Document]:
        earliest: dict[str, float] = {}
        for snap in snaps:
            for label, expiry in snap.get("cert_expiry", {}).items():
                earliest[label] = min(expiry, earliest.get(label, expiry))
        docs = []
        for label, expiry in sorted(earliest.items()):
            kind = label.split(":", 1)[0]
            days = round((expiry - now) / 86400, 3)
            if math.isfinite(days):
                docs.append(self._document(stamp, CERT_DIMENSIONS, {"CertDaysToExpiry": days},
                                           {"CertKind": dimension_value(kind), "Cert": dimension_value(label)}))
        return docs


def encode(doc: Document) -> str:
    """One line: compact JSON, ASCII only (non-ASCII escaped), newline-terminated."""
    return json.dumps(doc, separators=(",", ":"), allow_nan=False) + "\n"
