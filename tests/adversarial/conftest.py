"""Fixtures and the figures plugin of the adversarial suite (tests/adversarial/).

Owns: counting every adversarial test's outcome per category, the ``figures`` fixture that load tests record their
measurements into, printing the summary table at the end of the session (and writing it as JSON to
``$ADVERSARIAL_JSON``, default ``build/adversarial.json``), and the fixtures shared by more than one
module: ``recorder`` (a strict recording upstream, tests/adversarial/recorder.py) and ``long_run`` (the opt-in
durations from the environment).

Opt-in long runs (defaults are what CI runs; not MTLS_PROXY_*: the proxy refuses unknown variables of its own
prefix, and the processes under test inherit this environment):
    ADVERSARIAL_SOAK_SECONDS   load run duration (default 12; the issue's soak is 60)
    ADVERSARIAL_SOAK_CLIENTS   concurrent TLS clients (default 150; the issue's soak is 500)
    ADVERSARIAL_FUZZ_SECONDS   atheris run of the PROXY v2 parser (default 20)
    ADVERSARIAL_STORM_CONNECTIONS  connections per fault-storm run (default 1000; test_fault_storm.py)
    ADVERSARIAL_STORM_SEED     the fault storm's seed (default: a new one, printed with the figures)

Must not: hold module-level mutable state (the figures live in ``config.stash``); every fixture stops what it started.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.adversarial.figures import Figures
from tests.adversarial.recorder import RecordingUpstream
from tests.harness import ROOT
from tests.pki import Pki

FIGURES = pytest.StashKey[Figures]()


def _figures(config: pytest.Config) -> Figures:
    if FIGURES not in config.stash:
        config.stash[FIGURES] = Figures()
    return config.stash[FIGURES]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_crl: tests/adversarial/test_load.py: start the proxy without a CRL")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call" or report.outcome != "passed":  # setup/teardown only count when they did not pass
        _figures(item.config).outcome(report.nodeid, report.outcome)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    figures = config.stash.get(FIGURES, None)
    if figures is None or not figures.outcomes:
        return
    terminalreporter.section("adversarial suite")
    for line in figures.table():
        terminalreporter.write_line(line)
    path = Path(os.environ.get("ADVERSARIAL_JSON") or ROOT / "build" / "adversarial.json")
    figures.write_json(path)
    terminalreporter.write_line(f"(figures written to {path})")


@pytest.fixture(scope="session")
def figures(pytestconfig: pytest.Config) -> Figures:
    return _figures(pytestconfig)


@dataclass(frozen=True, slots=True)
class LongRun:
    soak_seconds: float
    soak_clients: int
    fuzz_seconds: int

    @classmethod
    def from_environ(cls) -> LongRun:
        """Also used at import time, for ``pytest.mark.timeout`` of the long tests."""
        return cls(soak_seconds=float(os.environ.get("ADVERSARIAL_SOAK_SECONDS") or 12),
                   soak_clients=int(os.environ.get("ADVERSARIAL_SOAK_CLIENTS") or 150),
                   fuzz_seconds=int(os.environ.get("ADVERSARIAL_FUZZ_SECONDS") or 20))


@pytest.fixture(scope="session")
def long_run() -> LongRun:
    return LongRun.from_environ()


@pytest.fixture(scope="module")
def recorder(pki: Pki) -> Iterator[RecordingUpstream]:
    up = RecordingUpstream(pki).start()
    yield up
    up.stop()
