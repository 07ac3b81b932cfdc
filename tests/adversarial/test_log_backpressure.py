"""A stalled log driver: the real proxy process writing its access log into a pipe whose reader is stopped.

Owns: stdout of ``python -m proxy serve`` is a real pipe to a real ``cat`` (the log driver), which the test stops
with SIGSTOP.  The pipe is given to the proxy blocking (as a container runtime usually does) or already
non-blocking (as the issue found it: the writer then spun on EAGAIN at 100 % CPU).  While the reader is stopped the
proxy keeps answering every request at once, stays idle when there is no traffic (no busy loop), counts what it
cannot keep in ``mtls_proxy_log_lines_dropped_total`` and says so once on stderr.  When ``cat`` runs again the
lines held back flow out without any new request, stderr says so once more, and every line that reaches the file
is whole JSON: lines in the file plus lines counted as dropped equal the requests served.  A SIGTERM drain then
exits 0 promptly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import config as config_mod
from tests.adversarial.recorder import RecordingUpstream
from tests.adversarial.target import metrics
from tests.e2e.kit import eventually
from tests.harness import ROOT, ProxyProcess, RawClient, client_ctx, get, write_config
from tests.pki import Pki

PATH_PAD = 7000  # each access-log line ~7.3 KB: the pipe (64 KiB) and the 1 MiB bound fill in ~150 requests


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


class Driver:
    """``cat`` reading the proxy's stdout pipe into a file; the test stops and resumes it."""

    def __init__(self, out: Path, nonblocking: bool) -> None:
        self.r, self.w = os.pipe()
        if nonblocking:
            os.set_blocking(self.w, False)  # the open file description the proxy inherits
        self.out = out
        with out.open("wb") as fh:
            self.cat = subprocess.Popen(["cat"], stdin=self.r, stdout=fh)
        os.close(self.r)

    def stop(self) -> None:
        self.cat.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.cat.send_signal(signal.SIGCONT)

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def close(self) -> None:
        self.resume()
        try:
            os.close(self.w)
        except OSError:
            pass
        try:
            self.cat.wait(10)
        except subprocess.TimeoutExpired:
            self.cat.kill()
            self.cat.wait()


def spawn_into(driver: Driver, config: Path, tmp: Path) -> ProxyProcess:
    cfg = config_mod.load(config, dict(os.environ))
    err = tmp / "proxy.err"
    with err.open("wb") as err_fh:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config)],
                                stdout=driver.w, stderr=err_fh, cwd=ROOT)
    os.close(driver.w)  # the proxy holds the only write end now: cat sees EOF when it exits
    pp = ProxyProcess(proc, cfg, driver.out, err)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited {proc.returncode}: {err.read_text()}")
        try:
            if pp.discover() and pp.admin_get("/readyz")[0] == 200:
                return pp
        except OSError:
            pass
        time.sleep(0.05)
    pp.stop()
    raise RuntimeError(f"proxy not ready: {err.read_text()}")


@pytest.fixture
def log_recorder(pki: Pki) -> Iterator[RecordingUpstream]:
    up = RecordingUpstream(pki).start()
    yield up
    up.stop()


@pytest.mark.parametrize("nonblocking", [False, True], ids=["blocking-pipe", "non-blocking-pipe"])
async def test_a_stopped_log_reader_costs_lines_not_service(nonblocking: bool, pki: Pki,
                                                            log_recorder: RecordingUpstream, tmp_path: Path) -> None:
    driver = Driver(tmp_path / "access.log", nonblocking)
    config = write_config(tmp_path / "proxy.toml", pki, log_recorder.port)
    proxy = spawn_into(driver, config, tmp_path)
    served = 0
    try:
        c = await RawClient.connect(proxy.port, client_ctx(pki))

        async def requests(n: int, tag: str) -> None:
            nonlocal served
            for i in range(n):
                path = f"/{tag}/{i}/" + "p" * PATH_PAD
                t0 = time.monotonic()
                resp = await c.request(get(path, host="api.test"), timeout=10)
                assert resp.status == 200 and len(resp.body) == len(path) + 5, resp.body[:100]
                assert time.monotonic() - t0 < 5, "a request waited for the log"
                served += 1

        await requests(5, "before")
        await eventually(lambda: asyncio.sleep(0, len(driver.lines()) == 5))
        driver.stop()
        await requests(400, "stalled")  # ~2.9 MB of lines: pipe and bound overflow
        s = await asyncio.to_thread(metrics, proxy)
        dropped = s.get("mtls_proxy_log_lines_dropped_total")
        assert dropped > 0
        cpu = await asyncio.to_thread(cpu_seconds, proxy.proc.pid)
        await asyncio.sleep(1.0)  # no traffic, the output still blocked: the proxy must be idle
        assert await asyncio.to_thread(cpu_seconds, proxy.proc.pid) - cpu < 0.3
        await requests(5, "still-stalled")
        assert proxy.stderr().count("access log output blocked") == 1

        driver.resume()  # the held-back lines flow out by themselves

        async def flowing() -> bool:
            return "access log output flowing again" in proxy.stderr()

        await eventually(flowing)
        await requests(5, "after")
        await c.close()
        s = await asyncio.to_thread(metrics, proxy)
        dropped = s.get("mtls_proxy_log_lines_dropped_total")
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.wait, 10) == 0
        assert time.monotonic() - t0 < 5
    finally:
        proxy.stop()
        driver.close()
    lines = [json.loads(x) for x in driver.lines()]  # every line whole JSON: nothing torn
    assert len(lines) + dropped == served, (len(lines), dropped, served)
    assert [x["path"].split("/")[1] for x in lines][-5:] == ["after"] * 5
    assert proxy.stderr().count("access log output flowing again") == 1
    assert "Traceback" not in proxy.stderr()
