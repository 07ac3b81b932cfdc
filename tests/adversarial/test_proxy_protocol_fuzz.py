"""The coverage-guided fuzz target of the PROXY v2 parser, run by atheris for a bounded time.

Owns: running tests/fuzz/fuzz_proxy_protocol.py (its oracle: only ``ProxyProtocolError`` with a known reason,
``parse`` and ``remaining_length`` agree, accepted headers re-encode byte for byte and stop being accepted with one
byte more or less) as a subprocess for ``ADVERSARIAL_FUZZ_SECONDS`` (default 20; set e.g. 600 for a long run), on a
scratch copy of the seed corpus so new inputs never land in the repository, and failing with the crash input when
libFuzzer finds one.

The hypothesis properties and the seed-corpus replay live in tests/test_proxy_protocol.py; truncated, oversized and
malformed headers on the wire in tests/e2e/test_proxy_protocol_wire.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.adversarial.conftest import LongRun
from tests.adversarial.figures import Figures
from tests.harness import ROOT

TARGET = ROOT / "tests" / "fuzz" / "fuzz_proxy_protocol.py"
SEEDS = ROOT / "tests" / "fuzz" / "corpus_proxy_protocol"


@pytest.mark.timeout(LongRun.from_environ().fuzz_seconds + 120)
def test_atheris_finds_nothing_in_the_proxy_protocol_parser(tmp_path: Path, long_run: LongRun,
                                                            figures: Figures) -> None:
    pytest.importorskip("atheris")
    seconds = long_run.fuzz_seconds
    corpus = tmp_path / "corpus"
    shutil.copytree(SEEDS, corpus)
    done = subprocess.run(
        [sys.executable, str(TARGET), f"-max_total_time={seconds}", "-print_final_stats=1", "-timeout=10",
         "-rss_limit_mb=1024", f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=tmp_path, capture_output=True, text=True, timeout=seconds + 90)
    log = done.stdout + done.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-")))
    assert done.returncode == 0 and not crashes, f"libFuzzer finding {crashes}:\n{log[-4000:]}"
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", log).group(1))  # type: ignore[union-attr]
    assert runs > 1000, log[-2000:]  # it really fuzzed (a broken harness would stop at the seeds)
    figures.note(f"atheris: {runs:,} PROXY v2 inputs in {seconds} s, corpus {len(list(SEEDS.iterdir()))} -> "
                 f"{len(list(corpus.iterdir()))} files, no finding")
