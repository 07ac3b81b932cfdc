"""Turning per-run figures into the comparison table, the mtls-proxy / NGINX ratios and the target verdicts.

Owns: the columns (and which direction is better for each), the median and best-of-N summaries, the ratio
rows, the check of the issue's targets, and the Markdown rendering.

Must not: measure anything or touch processes; it works on plain dicts so a saved JSON result can be re-read.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

Row = dict[str, object]


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    keys: tuple[str, ...]  # one key, or two shown as "a / b"
    fmt: str
    lower_is_better: bool = False


COLUMNS = (
    Column("keep-alive req/s", ("ka_rps",), "{:,.0f}"),
    Column("CPU µs/request", ("ka_cpu_us_per_req",), "{:,.0f}", lower_is_better=True),
    Column("p50 / p99 ms", ("ka_p50_ms", "ka_p99_ms"), "{:.1f}", lower_is_better=True),
    Column("full handshakes/s", ("hs_cps",), "{:,.0f}"),
    Column("CPU µs/handshake", ("hs_cpu_us_per_conn",), "{:,.0f}", lower_is_better=True),
    Column("10 MB up / down MB/s", ("up_MBps", "down_MBps"), "{:.0f}"),
    Column("RSS idle / peak MB", ("rss_idle_mb", "rss_peak_mb"), "{:.0f}", lower_is_better=True),
)
NUMERIC_KEYS = tuple(k for c in COLUMNS for k in c.keys) + ("rss_peak_proc_mb", "other_pct_max")
LOWER_IS_BETTER = frozenset(k for c in COLUMNS if c.lower_is_better for k in c.keys) | {"rss_peak_proc_mb",
                                                                                         "other_pct_max"}


def summarize(rows: Sequence[Row], how: str) -> list[Row]:
    """One row per target: the median (``how="median"``) or the best (``"best"``) of each figure over its runs.
    Noise from other processes only ever slows a run down, so best-of-N is the least disturbed estimate."""
    by_name: dict[str, list[Row]] = {}
    for r in rows:
        by_name.setdefault(str(r["name"]), []).append(r)
    out = []
    for name, runs in by_name.items():
        s: Row = {"name": name, "summary": f"{how} of {len(runs)}", "ok": all(bool(r.get("ok")) for r in runs)}
        for key in NUMERIC_KEYS:
            values = [float(v) for r in runs if isinstance(v := r.get(key), (int, float))]
            if not values:
                s[key] = None
            elif how == "median":
                s[key] = statistics.median(values)
            else:
                s[key] = min(values) if key in LOWER_IS_BETTER else max(values)
        out.append(s)
    return out


def ratio_row(proxy: Row, nginx: Row) -> Row:
    """Every figure of ``proxy`` divided by NGINX's (> 1 means more: better for rates, worse for CPU/RSS)."""
    r: Row = {"name": f"{proxy['name']} / {nginx['name']}", "ratio": True}
    for key in NUMERIC_KEYS:
        a, b = proxy.get(key), nginx.get(key)
        r[key] = (float(a) / float(b)) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    return r


def _cell(row: Row, column: Column) -> str:
    parts = []
    for key in column.keys:
        v = row.get(key)
        if not isinstance(v, (int, float)):
            parts.append("-")
        elif row.get("ratio"):
            parts.append(f"{v:.2f}x")
        else:
            parts.append(column.fmt.format(v))
    return " / ".join(parts)


def markdown_table(rows: Sequence[Row]) -> str:
    headers = ["target", *(c.header for c in COLUMNS), "other %", "ok"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        other = row.get("other_pct_max")
        cells = [str(row["name"]) + (f" ({row['summary']})" if row.get("summary") else ""),
                 *(_cell(row, c) for c in COLUMNS),
                 "" if row.get("ratio") else ("-" if not isinstance(other, (int, float)) else f"{other:.0f}"),
                 "" if row.get("ratio") else ("yes" if row.get("ok") else "NO")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Verdict:
    target: str
    value: str
    met: bool | None  # None: not measured in this run


def _num(row: Row | None, key: str) -> float | None:
    v = row.get(key) if row else None
    return float(v) if isinstance(v, (int, float)) else None


def check_targets(nginx: Row | None, proxy1: Row | None, proxy2: Row | None) -> list[Verdict]:
    """The performance targets against NGINX, judged on the rows given (the medians, normally)."""
    verdicts = []

    def ratio(key: str, limit: float, above: bool, label: str) -> None:
        a, b = _num(proxy1, key), _num(nginx, key)
        if a is None or b is None or not b:
            verdicts.append(Verdict(label, "not measured", None))
            return
        q = a / b
        verdicts.append(Verdict(label, f"{q:.2f}x", q >= limit if above else q <= limit))

    ratio("ka_cpu_us_per_req", 2.0, False, "keep-alive CPU per request <= 2x NGINX")
    ratio("ka_rps", 0.5, True, "keep-alive requests/s >= 0.5x NGINX")
    ratio("hs_cpu_us_per_conn", 1.2, False, "CPU per full handshake <= 1.2x NGINX")
    ratio("up_MBps", 0.8, True, "10 MB upload MB/s >= 0.8x NGINX")
    ratio("down_MBps", 0.8, True, "10 MB download MB/s >= 0.8x NGINX")
    for key, limit, label in (("rss_peak_proc_mb", 64.0, "peak RSS of one worker <= 64 MB"),
                              ("rss_idle_mb", 40.0, "idle RSS <= 40 MB")):
        v = _num(proxy1, key)
        verdicts.append(Verdict(label, "not measured" if v is None else f"{v:.1f} MB",
                                None if v is None else v <= limit))
    a, b = _num(proxy2, "ka_rps"), _num(proxy1, "ka_rps")
    if a is None or b is None or not b:
        verdicts.append(Verdict("workers = 2 not slower than 1 worker (keep-alive req/s)", "not measured", None))
    else:
        verdicts.append(Verdict("workers = 2 not slower than 1 worker (keep-alive req/s)", f"{a / b:.2f}x",
                                a / b >= 1.0))
    return verdicts


def verdict_lines(verdicts: Sequence[Verdict]) -> str:
    mark = {True: "met", False: "MISSED", None: "n/a"}
    return "\n".join(f"  {mark[v.met]:>6}  {v.target}: {v.value}" for v in verdicts)
