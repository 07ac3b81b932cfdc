"""The adversarial suite's figures: cases per category and what the load runs measured, as one Markdown table.

Owns: the per-session ``Figures`` value (kept in pytest's ``config.stash`` by tests/adversarial/conftest.py, never a
module global), the category of a test (its module), the JSON file with every figure, and the table printed at
the end of the session.  The README's "Adversarial suite" section is a copy of that table.

Must not: decide whether anything passed (the tests' own assertions do); it only counts and reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

# module -> category label, in the order the table lists them
CATEGORIES = {
    "test_smuggling": "request smuggling / desync (raw bytes over TLS)",
    "test_tls_abuse": "TLS abuse (garbage, hostile certificates, resets at every stage)",
    "test_proxy_protocol_fuzz": "PROXY protocol (atheris, bounded)",
    "test_load": "load and soak (real process)",
    "test_degradation": "graceful degradation (max_connections, upstream down)",
    "test_scanner": "TLS scanner view (sslyze)",
    "test_regressions": "regressions (the bugs this suite found)",
    "test_fault_storm": "fault storm (1,000 connections failing at every stage; slot, fd and pool leaks)",
    "test_framing_in_hand": "malformed chunked bodies never reach the upstream",
    "test_log_backpressure": "stalled log driver (real pipe, stopped reader)",
}


@dataclass(frozen=True, slots=True)
class LoadRun:
    """What one load run measured on the proxy process."""

    name: str
    clients: int
    seconds: float
    requests: int
    errors: int
    peak_rss_mib: float
    rss_slope_mib_per_min: float  # least-squares slope of RSS after warm-up
    fds_before: int
    fds_after: int
    slope_asserted: bool = True  # False: the run was shorter than the warm-up, the slope is only reported


STORM_STAGES = ("before-accept", "in-proxy-header", "after-proxy-header", "in-client-hello", "after-client-hello",
                "after-handshake", "in-request-head", "in-request-body", "while-response-streams", "served")


@dataclass(frozen=True, slots=True)
class StormRun:
    """What one fault storm (tests/adversarial/test_fault_storm.py) did and left behind."""

    proxy_protocol: bool
    loop: str
    seed: int
    connections: int
    seconds: float
    reset_at_limit: int
    per_stage: dict[str, int]  # stage -> connections tried
    slots_after: int
    fds_before: int
    fds_after: int
    upstream_opened: int
    upstream_left_open: int
    upstream_anomalies: int
    served_after_ms: float
    drain_ms: float


@dataclass
class Figures:
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)  # nodeid -> (category, outcome)
    runs: list[LoadRun] = field(default_factory=list)
    storms: list[StormRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def outcome(self, nodeid: str, outcome: str) -> None:
        """Record a test's latest outcome ("passed", "failed", "skipped"); a later failure (teardown) wins."""
        category = category_of(nodeid)
        previous = self.outcomes.get(nodeid)
        if previous is not None and previous[1] == "failed":
            return
        self.outcomes[nodeid] = (category, outcome)

    def run(self, run: LoadRun) -> None:
        self.runs.append(run)

    def storm(self, run: StormRun) -> None:
        self.storms.append(run)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def counts(self) -> dict[str, dict[str, int]]:
        table = {label: {"tried": 0, "passed": 0, "failed": 0, "skipped": 0} for label in CATEGORIES.values()}
        for category, outcome in self.outcomes.values():
            row = table.setdefault(category, {"tried": 0, "passed": 0, "failed": 0, "skipped": 0})
            row["tried"] += 1
            row[outcome] += 1
        return {k: v for k, v in table.items() if v["tried"]}

    def table(self) -> list[str]:
        lines = ["| category | cases tried | passed | failed | skipped |", "|---|---:|---:|---:|---:|"]
        total = {"tried": 0, "passed": 0, "failed": 0, "skipped": 0}
        for label, row in self.counts().items():
            lines.append(f"| {label} | {row['tried']} | {row['passed']} | {row['failed']} | {row['skipped']} |")
            for k in total:
                total[k] += row[k]
        lines.append(f"| **total** | {total['tried']} | {total['passed']} | {total['failed']} | {total['skipped']} |")
        if self.runs:
            lines += ["", "| load run | clients | seconds | requests | errors | peak RSS (MiB) "
                          "| RSS slope after warm-up (MiB/min) | proxy fds before / after |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for r in self.runs:
                lines.append(f"| {r.name} | {r.clients} | {r.seconds:.0f} | {r.requests:,} | {r.errors} "
                             f"| {r.peak_rss_mib:.1f} | {r.rss_slope_mib_per_min:+.2f}"
                             f"{'' if r.slope_asserted else ' (still warming up)'} | {r.fds_before} / {r.fds_after} |")
        if self.storms:
            lines += ["", "| fault storm | seed | connections (s) | reset at the limit | before accept | in / after "
                          "PROXY header | in / after ClientHello | after handshake | in head | in body | while the "
                          "response streams | served | slots after | fds before / after | upstream opened / left "
                          "open / anomalies | drain (ms) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in self.storms:
                n = r.per_stage.get
                pp = f"{n('in-proxy-header', 0)} / {n('after-proxy-header', 0)}" if r.proxy_protocol else "-"
                lines.append(
                    f"| proxy_protocol {'on' if r.proxy_protocol else 'off'}, {r.loop} | {r.seed} | "
                    f"{r.connections:,} ({r.seconds:.1f}) | {r.reset_at_limit} | {n('before-accept', 0)} | {pp} | "
                    f"{n('in-client-hello', 0)} / {n('after-client-hello', 0)} | {n('after-handshake', 0)} | "
                    f"{n('in-request-head', 0)} | {n('in-request-body', 0)} | {n('while-response-streams', 0)} | "
                    f"{n('served', 0)} | {r.slots_after} | {r.fds_before} / {r.fds_after} | {r.upstream_opened} / "
                    f"{r.upstream_left_open} / {r.upstream_anomalies} | {r.drain_ms:.0f} |")
        if self.notes:
            lines.append("")
            lines += [f"- {n}" for n in self.notes]
        return lines

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"categories": self.counts(), "load_runs": [asdict(r) for r in self.runs],
                                    "fault_storms": [asdict(r) for r in self.storms], "notes": self.notes},
                                   indent=2) + "\n")


def category_of(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return CATEGORIES.get(module, module)
