"""End-to-end: ``mtls-proxy serve --loop`` picks the event loop the real process runs on, and says which.

The default (``auto``) is uvloop, as in production; ``--loop asyncio`` runs the same process on asyncio's own loop
(the adversarial suite runs its fault storm on both).  The ``listening`` event-log line names the loop actually
running -- read from the loop object, not from the option -- and a supervisor passes the choice to its workers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT, RawClient, client_ctx, free_port, get, spawn_proxy, write_config
from tests.pki import Pki


def loops_logged(stderr: str) -> list[str]:
    out = []
    for line in stderr.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("msg") == "listening":
            out.append(event["loop"])
    return out


@pytest.mark.parametrize("option, expected", [((), "uvloop"), (("--loop", "uvloop"), "uvloop"),
                                              (("--loop", "asyncio"), "asyncio")],
                         ids=["default", "uvloop", "asyncio"])
async def test_the_process_runs_on_the_loop_it_was_asked_for(option: tuple[str, ...], expected: str, pki: Pki,
                                                             tmp_path: Path) -> None:
    from tests.harness import start_demo_upstream

    runner, port = await start_demo_upstream(pki)
    proc = None
    try:
        proc = spawn_proxy(write_config(tmp_path / "p.toml", pki, port), tmp_path, args=option)
        assert loops_logged(proc.stderr()) == [expected]
        c = await RawClient.connect(proc.port, client_ctx(pki))
        assert (await c.request(get("/x", host="api.test"))).status == 200
        await c.close()
    finally:
        if proc is not None:
            proc.stop()
        await runner.cleanup()


def test_workers_get_the_supervisors_choice(pki: Pki, tmp_path: Path) -> None:
    proc = spawn_proxy(write_config(tmp_path / "w.toml", pki, free_port(), server={"workers": 2}), tmp_path,
                       args=("--loop", "asyncio"))
    try:
        assert loops_logged(proc.stderr()) == ["asyncio", "asyncio"]
    finally:
        proc.stop()


def test_an_unknown_loop_is_refused() -> None:
    r = subprocess.run([sys.executable, "-m", "proxy", "serve", "--loop", "tokio"], cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "--loop" in r.stderr
