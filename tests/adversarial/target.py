"""The proxy under attack as a real process (``python -m proxy serve``), and what /proc and /metrics say about it.

Owns: spawning the proxy with a test config (``tests.harness.spawn_proxy``, which waits for ``/readyz``), its
open file descriptors and resident memory read from /proc, its metrics scraped from the admin port, polling until
the descriptor count is back to a baseline, a fixed-interval RSS sampler with the least-squares slope the load tests
assert on, and the demo upstream (``python -m proxy.dev.demo_upstream``) as a process of its own for load runs.

Must not: sleep to wait for readiness (it polls), or leave a process running after ``stop()``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e.kit import Samples, parse_samples
from tests.harness import ROOT, ProxyProcess, free_port, spawn_proxy, terminate, write_config
from tests.pki import Pki


def spawn(tmp: Path, pki: Pki, upstream_port: int, name: str, env: dict[str, str] | None = None,
          args: tuple[str, ...] = (), **sections: Any) -> ProxyProcess:
    """The real proxy process with ``write_config`` defaults overridden by ``sections`` (``args``: extra
    ``serve`` options such as ``--loop asyncio``)."""
    path = write_config(tmp / f"{name}.toml", pki, upstream_port, **sections)
    return spawn_proxy(path, tmp, env, args=args)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def metrics(proc: ProxyProcess) -> Samples:
    status, text = proc.admin_get("/metrics")
    assert status == 200, text
    return parse_samples(text)


def wait_fds(pid: int, at_most: int, timeout: float = 30.0) -> int:
    """Poll until the process has at most ``at_most`` descriptors; returns the last count (may be higher)."""
    deadline = time.monotonic() + timeout
    while True:
        n = fds(pid)
        if n <= at_most or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def settled_fds(pid: int, timeout: float = 10.0) -> int:
    """The descriptor count once it stopped changing for a moment (start-up and pooled sockets settle)."""
    deadline = time.monotonic() + timeout
    last, stable_since = fds(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        n = fds(pid)
        if n != last:
            last, stable_since = n, time.monotonic()
        elif time.monotonic() - stable_since > 0.5:
            break
    return last


@dataclass
class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread (the load generator owns the event loop)."""

    pid: int
    interval: float = 0.2
    samples: list[tuple[float, float]] = field(default_factory=list)  # (monotonic seconds, MiB)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.monotonic(), rss_mib(self.pid)))
                except (OSError, RuntimeError):
                    return  # the process ended: the test's own assertions say why
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def peak(self) -> float:
        return max(v for _, v in self.samples)

    def slope_per_minute(self, after: float) -> float:
        """Least-squares RSS slope (MiB per minute) over the samples taken ``after`` seconds into the run."""
        t0 = self.samples[0][0]
        pts = [(t - t0, v) for t, v in self.samples if t - t0 >= after]
        if len(pts) < 3:
            raise AssertionError(f"too few RSS samples after warm-up: {len(pts)}")
        n = len(pts)
        mean_t = sum(t for t, _ in pts) / n
        mean_v = sum(v for _, v in pts) / n
        var = sum((t - mean_t) ** 2 for t, _ in pts)
        cov = sum((t - mean_t) * (v - mean_v) for t, v in pts)
        return cov / var * 60.0


@dataclass
class DemoUpstreamProcess:
    """``python -m proxy.dev.demo_upstream`` (API id ``api``, stage ``prod``): the load runs' upstream, off our CPU."""

    proc: subprocess.Popen[bytes]
    port: int

    @classmethod
    def start(cls, pki: Pki, tmp: Path, port: int | None = None, timeout: float = 15.0) -> DemoUpstreamProcess:
        port = port or free_port()
        log = tmp / f"demo-upstream-{port}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.dev.demo_upstream", "--listen", f"127.0.0.1:{port}", "--cert",
                 str(pki.upstream_cert), "--key", str(pki.upstream_key), "--api-id", "api", "--stage", "prod"],
                stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        up = cls(proc, port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"demo upstream exited {proc.returncode}: {log.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return up
            except OSError:
                time.sleep(0.05)
        up.stop()
        raise RuntimeError("demo upstream did not start listening")

    def stop(self) -> None:
        terminate(self.proc)
