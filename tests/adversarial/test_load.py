"""Load and soak against the real proxy process: zero errors, flat memory, descriptors back to baseline.

Owns: N concurrent clients (``ADVERSARIAL_SOAK_CLIENTS``, default 150; the issue's soak is 500), each on its own TLS
connection with a client certificate, mixed request and response sizes, for ``ADVERSARIAL_SOAK_SECONDS`` (default
12; the issue's soak is 60) through ``python -m proxy serve`` to the demo upstream running as a process of its own;
and the same with a client-CA reload (SIGHUP) in the middle.  Each run asserts: zero errors (every response checked
byte for byte by tests/adversarial/load.py), the proxy counted exactly the requests the clients completed, the RSS
slope after warm-up is about zero, and the proxy's descriptors return to their baseline once the clients are gone.
The figures (requests, errors, peak RSS, slope, descriptors) go into the suite's summary table.

The load generator runs in this process on uvloop; the proxy and the upstream each have their own process, so on a
2-core machine the three share the CPU -- throughput figures are what this machine gave, not a benchmark (bench/).
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.adversarial.conftest import LongRun
from tests.adversarial.figures import Figures, LoadRun
from tests.adversarial.load import LoadStats, run_clients
from tests.adversarial.target import (
    DemoUpstreamProcess,
    RssSampler,
    metrics,
    settled_fds,
    spawn,
    wait_fds,
)
from tests.harness import ProxyProcess, client_ctx, get
from tests.pki import Pki

pytestmark = pytest.mark.timeout(LongRun.from_environ().soak_seconds * 2 + 120)
# Warm-up, measured on this machine: the proxy's RSS climbs from ~50 to ~110 MiB over its first ~40,000 requests
# (~40 s here), then stays flat (150 s / 159,000 requests: +0.2 MiB/min after it).  Python-level memory stays at
# ~13 MB throughout (tracemalloc), and jemalloc shows the same curve, so it is native memory reaching a plateau,
# not a leak of Python objects.  The slope is therefore asserted only on runs long enough to get past it
# (ADVERSARIAL_SOAK_SECONDS >= SLOPE_MIN_SECONDS); the default CI run reports it and asserts a peak bound that any
# per-request leak of a body-sized buffer would break within seconds.
WARM_UP_SECONDS = 60.0
SLOPE_MIN_SECONDS = 120.0
MAX_SLOPE = 5.0  # MiB per minute after warm-up (a 1 KiB-per-request leak at ~1,000 requests/s is ~60 MiB/min)
MAX_PEAK_MIB = 256.0


@dataclass
class Target:
    proxy: ProxyProcess
    upstream: DemoUpstreamProcess
    client_ca: Path
    baseline_fds: int


@pytest.fixture
def target(pki: Pki, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Target]:
    """The proxy process in front of the demo upstream process; ``@pytest.mark.no_crl`` drops the CRL (the other
    client CA a reload adds publishes none, and CRL_CHECK_LEAF would refuse its clients)."""
    upstream = DemoUpstreamProcess.start(pki, tmp_path)
    client_ca = tmp_path / "client-ca.crt"
    client_ca.write_bytes(pki.client_ca.read_bytes())
    server: dict[str, Any] = {"client_ca": str(client_ca)}
    if request.node.get_closest_marker("no_crl"):
        server["crl"] = None
    try:
        proxy = spawn(tmp_path, pki, upstream.port, "load", server=server,
                      upstream={"connect_timeout": 10.0, "read_timeout": 60.0, "pool_idle_timeout": 1.0},
                      log={"access": False})
    except BaseException:
        upstream.stop()
        raise
    try:
        yield Target(proxy, upstream, client_ca, settled_fds(proxy.proc.pid))
    finally:
        proxy.stop()
        upstream.stop()
    assert "Traceback" not in proxy.stderr(), proxy.stderr()[-4000:]


def requests_counted(proxy: ProxyProcess) -> int:
    return int(sum(metrics(proxy).series("mtls_proxy_requests_total").values()))


async def during(seconds: float, action: object) -> None:
    """Run ``action`` (a coroutine function) halfway through a run of ``seconds``."""
    await asyncio.sleep(seconds / 2)  # not a readiness wait: the point in time of the reload is the test's choice
    await action()  # type: ignore[operator]


def soak(target: Target, pki: Pki, long_run: LongRun, figures: Figures, name: str,
         midway: object | None = None, extra_requests: int = 0) -> LoadStats:
    """One load run; ``midway`` runs halfway through, ``extra_requests`` are the ones it sends itself."""
    pid = target.proxy.proc.pid
    sampler = RssSampler(pid).start()

    async def main() -> LoadStats:
        load = asyncio.ensure_future(run_clients(target.proxy.port, client_ctx(pki), long_run.soak_clients,
                                                 long_run.soak_seconds))
        if midway is not None:
            await during(long_run.soak_seconds, midway)
        return await load

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        stats = runner.run(main())
    sampler.stop()
    fds_after = wait_fds(pid, target.baseline_fds)
    warm_up = WARM_UP_SECONDS if long_run.soak_seconds >= SLOPE_MIN_SECONDS else long_run.soak_seconds * 0.4
    slope = sampler.slope_per_minute(after=warm_up)
    figures.run(LoadRun(name, long_run.soak_clients, long_run.soak_seconds, stats.requests, len(stats.errors),
                        sampler.peak, slope, target.baseline_fds, fds_after,
                        slope_asserted=long_run.soak_seconds >= SLOPE_MIN_SECONDS))
    assert stats.errors == [], f"{len(stats.errors)} errors, first: {stats.errors[:5]}"
    assert stats.requests > long_run.soak_clients  # every client completed requests
    assert set(stats.kinds) == {"echo", "download", "upload-cl", "upload-chunked"}, stats.kinds
    assert requests_counted(target.proxy) == stats.requests + extra_requests  # none lost, none duplicated
    assert sampler.peak < MAX_PEAK_MIB, f"peak RSS {sampler.peak:.0f} MiB"
    if long_run.soak_seconds >= SLOPE_MIN_SECONDS:
        assert slope < MAX_SLOPE, f"RSS grows {slope:.1f} MiB/min after warm-up (samples: {sampler.samples[-5:]})"
    assert fds_after <= target.baseline_fds, f"fds {fds_after} > baseline {target.baseline_fds}"
    return stats


def test_soak_many_tls_clients_mixed_sizes(target: Target, pki: Pki, long_run: LongRun, figures: Figures) -> None:
    soak(target, pki, long_run, figures, "soak")


@pytest.mark.no_crl
def test_soak_with_client_ca_reload_midway(target: Target, pki: Pki, long_run: LongRun, figures: Figures) -> None:
    """SIGHUP with a changed client CA file in the middle: no error, and new handshakes trust the new CA."""
    newcomer = client_ctx(pki, "other_ca_same_cn")

    async def newcomer_status() -> int | None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", target.proxy.port, ssl=newcomer,
                                                           server_hostname="localhost")
        except (ssl.SSLError, ConnectionError):
            return None
        writer.write(get("/newcomer", extra=b"Connection: close\r\n"))
        try:
            raw = await asyncio.wait_for(reader.read(), 30)
        except (ssl.SSLError, ConnectionError):
            return None  # TLS 1.3: the refusal arrives after the client's side of the handshake
        finally:
            writer.close()
        return int(raw.split(b" ", 2)[1]) if raw else None

    async def reload() -> None:
        assert await newcomer_status() is None  # not trusted yet
        target.client_ca.write_bytes(pki.client_ca.read_bytes() + pki.other_client_ca.read_bytes())
        target.proxy.signal(signal.SIGHUP)
        for _ in range(300):  # poll the admin port until the reload is counted
            if (await asyncio.to_thread(metrics, target.proxy)).get("mtls_proxy_reloads_total", result="success"):
                break
            await asyncio.sleep(0.1)
        s = await asyncio.to_thread(metrics, target.proxy)
        assert s.get("mtls_proxy_reloads_total", result="success") == 1
        assert s.get("mtls_proxy_reloads_total", result="error") == 0
        assert await newcomer_status() == 200  # trusted from the next handshake on

    stats = soak(target, pki, long_run, figures, "soak + client-CA reload (SIGHUP)", midway=reload,
                 extra_requests=1)  # the newcomer's one request
    assert stats.connections > long_run.soak_clients  # clients reconnected, some of them after the reload
