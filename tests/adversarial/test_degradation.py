"""Graceful degradation of the real proxy process: over the connection limit, and with the upstream down.

Owns:
* beyond ``max_connections``: with every slot held by clients that keep sending requests, 200 more connections are
  each refused at once (a reset at accept, long before ``handshake_timeout`` could matter) and counted, while the
  clients inside keep getting answers without a single error; a freed slot is usable again;
* upstream down, two ways -- nothing listens (connection refused) and a black hole that accepts TCP but never speaks
  TLS: many concurrent requests each get a 502 well within ``connect_timeout`` (refused) or right after it (black
  hole), the proxy piles nothing up (once the storm is over it holds exactly one descriptor per client
  connection), the client connections stay usable, and when the upstream comes back on the same port the same
  connections get 200s and the upstream sees exactly one clean request per client.

tests/e2e/test_limits.py checks the limit itself in-process with three connections; this module adds the real
process, load on both sides of the limit, and the upstream-down storm.  Bounds on durations are generous multiples
below the configured timeouts, so a busy machine cannot fail them and a proxy that waited for a timeout would.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.figures import Figures
from tests.adversarial.recorder import RecordingUpstream
from tests.adversarial.target import DemoUpstreamProcess, fds, metrics, settled_fds, spawn, wait_fds
from tests.e2e.kit import eventually
from tests.harness import ProxyProcess, RawClient, client_ctx, free_port, get
from tests.pki import Pki

HANDSHAKE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 10.0


@pytest.fixture
def demo(pki: Pki, tmp_path: Path) -> Iterator[DemoUpstreamProcess]:
    up = DemoUpstreamProcess.start(pki, tmp_path)
    yield up
    up.stop()


def active(proxy: ProxyProcess) -> float:
    return metrics(proxy).get("mtls_proxy_connections_active")


async def refused_at_once(port: int) -> float:
    """Seconds until the proxy ends a fresh TCP connection (EOF or reset) without a byte."""
    t0 = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionResetError:
        return time.monotonic() - t0  # the reset overtook the end of connect()
    try:
        data = await asyncio.wait_for(reader.read(), HANDSHAKE_TIMEOUT / 2)
        assert data == b"", data[:100]
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return time.monotonic() - t0


# ---- beyond max_connections -------------------------------------------------------------------------------------


async def test_beyond_max_connections_refused_at_once_while_inside_clients_keep_working(
        pki: Pki, demo: DemoUpstreamProcess, tmp_path: Path, figures: Figures) -> None:
    limit, extra = 40, 200
    proxy = spawn(tmp_path, pki, demo.port, "limit",
                  server={"max_connections": limit, "handshake_timeout": HANDSHAKE_TIMEOUT},
                  upstream={"pool_idle_timeout": 0.5})  # pooled upstream sockets go quickly: fds settle
    try:
        baseline = await asyncio.to_thread(settled_fds, proxy.proc.pid)
        inside = [await RawClient.connect(proxy.port, client_ctx(pki)) for _ in range(limit)]
        stop = asyncio.Event()
        done: list[int] = [0] * limit
        errors: list[str] = []

        async def keep_busy(i: int, c: RawClient) -> None:
            n = 0
            while not stop.is_set():
                try:
                    resp = await c.request(get(f"/inside/{i}/{n}"), timeout=60)
                    assert resp.status == 200 and resp.json()["path"] == f"/prod/inside/{i}/{n}", resp.body[:200]
                except (OSError, ssl.SSLError, asyncio.IncompleteReadError, AssertionError, TimeoutError) as exc:
                    errors.append(f"inside {i}: {exc!r}")
                    return
                done[i] += 1
                n += 1

        busy = [asyncio.create_task(keep_busy(i, c)) for i, c in enumerate(inside)]
        await eventually(lambda: asyncio.to_thread(lambda: active(proxy) == limit))
        before = list(done)
        refusals = []
        for batch in range(0, extra, 20):
            refusals += await asyncio.gather(*(refused_at_once(proxy.port) for _ in range(batch, batch + 20)))
        # a TLS client is refused the same way
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await RawClient.connect(proxy.port, client_ctx(pki))

        async def everyone_answered_since() -> bool:  # every inside client got answers across the flood
            return bool(errors) or all(d > b for d, b in zip(done, before, strict=True))

        await eventually(everyone_answered_since)
        served_during = [d - b for d, b in zip(done, before, strict=True)]
        stop.set()
        await asyncio.gather(*busy)

        assert errors == []
        assert max(refusals) < HANDSHAKE_TIMEOUT / 4, max(refusals)  # refused at accept, not by a timeout
        s = await asyncio.to_thread(metrics, proxy)
        assert s.get("mtls_proxy_connections_rejected_total") == extra + 1
        assert s.get("mtls_proxy_connections_active") == limit

        await inside.pop().close()  # a freed slot serves a newcomer
        await eventually(lambda: asyncio.to_thread(lambda: active(proxy) == limit - 1))
        newcomer = await RawClient.connect(proxy.port, client_ctx(pki))
        assert (await newcomer.request(get("/newcomer"))).status == 200
        inside.append(newcomer)
        for c in inside:
            await c.close()
        after = await asyncio.to_thread(wait_fds, proxy.proc.pid, baseline)
        assert after <= baseline
        figures.note(f"max_connections {limit}: {extra} extra connections each refused in <= "
                     f"{max(refusals) * 1000:.0f} ms; the {limit} inside kept being answered ({sum(served_during)} "
                     f"requests), 0 errors; fds {baseline} -> {after}")
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.stderr()


# ---- upstream down --------------------------------------------------------------------------------------------


class FdPeak:
    """The most descriptors the proxy held while sampled (every 20 ms in a thread)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, fds(self.pid))
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@pytest.mark.parametrize("down", ["refused", "black-hole"])
async def test_upstream_down_fast_502_no_pile_up_then_recovery(down: str, pki: Pki, tmp_path: Path,
                                                               figures: Figures) -> None:
    clients, rounds = 100, 5 if down == "refused" else 1
    connect_timeout = CONNECT_TIMEOUT if down == "refused" else 2.0
    hole = socket.create_server(("127.0.0.1", 0), backlog=4096) if down == "black-hole" else None  # never accepts
    port = hole.getsockname()[1] if hole is not None else free_port()
    recorder: RecordingUpstream | None = None
    proxy: ProxyProcess | None = None
    try:
        proxy = spawn(tmp_path, pki, port, "down", upstream={"connect_timeout": connect_timeout})
        baseline = await asyncio.to_thread(settled_fds, proxy.proc.pid)
        conns = [await RawClient.connect(proxy.port, client_ctx(pki)) for _ in range(clients)]
        peak = FdPeak(proxy.proc.pid)
        latencies: list[float] = []

        async def storm(c: RawClient, i: int) -> None:
            for r in range(rounds):
                t0 = time.monotonic()
                resp = await c.request(get(f"/down/{i}/{r}"), timeout=connect_timeout * 3 + 30)
                latencies.append(time.monotonic() - t0)
                assert resp.status == 502, resp.body[:200]
                assert json.loads(resp.body)["error"] == "upstream_unreachable", resp.body[:200]
                assert resp.header("connection") is None  # the client connection stays usable

        await asyncio.gather(*(storm(c, i) for i, c in enumerate(conns)))
        if down == "refused":
            assert max(latencies) < connect_timeout / 2, max(latencies)
        else:
            assert connect_timeout * 0.9 <= min(latencies) and max(latencies) < connect_timeout + 20, latencies
        # nothing piles up: the failed dials are gone, one descriptor per open client connection is left
        settled = await asyncio.to_thread(wait_fds, proxy.proc.pid, baseline + clients)
        assert settled == baseline + clients, (settled, baseline, clients)
        fd_peak = peak.stop()
        s = await asyncio.to_thread(metrics, proxy)
        assert s.get("mtls_proxy_upstream_errors_total", kind="connect") == clients * rounds

        # the upstream comes back on the same port: the same client connections recover
        if hole is not None:
            hole.close()
        recorder = RecordingUpstream(pki, port=port).start()
        for i, c in enumerate(conns):
            resp = await c.request(get(f"/back/{i}"))
            assert resp.status == 200 and resp.body == f"/prod/back/{i}".encode(), resp.body[:200]
        got = recorder.since()
        assert sorted(r.target for r in got) == sorted(f"/prod/back/{i}" for i in range(clients))
        assert {r.kind for r in got} == {"request"}
        for c in conns:
            await c.close()
        figures.note(f"upstream down ({down}): {clients * rounds} requests from {clients} connections -> 502 in "
                     f"<= {max(latencies):.2f} s each (connect_timeout {connect_timeout:g} s); proxy fds peak "
                     f"{fd_peak}, {baseline} + {clients} after the storm; all {clients} recovered when it returned")
    finally:
        if proxy is not None:
            proxy.stop()
        if recorder is not None:
            recorder.stop()
        if hole is not None:
            hole.close()
    assert proxy is not None and "Traceback" not in proxy.stderr()
