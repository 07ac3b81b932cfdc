"""cli: ``serve`` builds the runtime snapshot once -- the one it checks before binding is the one it serves with.

The real ``serve`` command in its own process, with a Python audit hook (``sys.addaudithook``, the interpreter's
own record of every ``open``) counting how often the server key file is read; the count is printed at exit, after
a SIGTERM drain.  Before, the command line built the snapshot to fail fast and the server built it again, so every
certificate and key was read and parsed twice at start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from proxy import config as config_mod
from tests.harness import ROOT, ProxyProcess, free_port, write_config
from tests.pki import Pki

BOOT = """
import atexit, sys
key, cfg = sys.argv[1], sys.argv[2]
opens = [0]
def hook(event, args):
    if event == "open" and str(args[0]) == key:
        opens[0] += 1
sys.addaudithook(hook)
atexit.register(lambda: print(f"KEY-OPENS {opens[0]}", file=sys.stderr, flush=True))
from proxy.cli import main
sys.exit(main(["serve", "--config", cfg]))
"""


def test_serve_reads_each_file_once_at_start(pki: Pki, tmp_path: Path) -> None:
    config = write_config(tmp_path / "p.toml", pki, free_port())
    err = tmp_path / "serve.err"
    with err.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-c", BOOT, str(pki.server_key), str(config)],
                                stdout=subprocess.DEVNULL, stderr=fh, cwd=ROOT, env=dict(os.environ))
    pp = ProxyProcess(proc, config_mod.load(config, dict(os.environ)), tmp_path / "unused", err)
    try:
        deadline = time.monotonic() + 15
        while not (pp.discover() and pp.admin_get("/readyz")[0] == 200):
            assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        pp.stop()
    assert "KEY-OPENS 1\n" in err.read_text(), err.read_text()[-2000:]
