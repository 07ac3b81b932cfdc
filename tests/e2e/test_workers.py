"""``server.workers = 2``: a supervisor, two worker processes on one port, one admin port.

Owns: both workers serving (the kernel spreads connections over the SO_REUSEPORT sockets: /proc shows which
worker holds each established connection), /metrics on the supervisor's admin port adding up both workers,
SIGHUP reaching every worker, a killed worker being replaced while the other keeps serving, and SIGTERM
draining every worker (an in-flight request completes) before the supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.e2e.kit import (GatedUpstream, Ops, admin_addr, admin_request, children, eventually, refused,
                                scrape)
from tests.harness import ProxyProcess, RawClient, get

CLOSE = b"Connection: close\r\n"


def sockets_on(pid: int, port: int, state: str = "01") -> int:
    """How many TCP sockets on local ``port`` in ``state`` (01 ESTABLISHED, 0A LISTEN) ``pid`` holds (/proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == state:
                inodes.add(parts[9])
    held = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held += 1
    return held


async def workers_of(proc: ProxyProcess, n: int = 2) -> list[int]:
    async def ready() -> list[int] | None:
        kids = children(proc.proc.pid)
        if len(kids) != n or not all(sockets_on(k, proc.port, "0A") for k in kids):
            return None
        return kids if (await admin_request(admin_addr(proc), "/readyz")).status == 200 else None

    return await eventually(ready, timeout=30)  # type: ignore[no-any-return]


async def statuses(ops: Ops, port: int, n: int) -> list[int]:
    out = []
    for i in range(n):
        c = await ops.client(port)
        out.append((await c.request(get(f"/w/{i}", extra=CLOSE))).status)
        await c.close()
    return out


async def spawn_workers(ops: Ops, upstream_port: int, **server: object) -> ProxyProcess:
    return await ops.spawn(ops.config(upstream_port, server={"workers": 2, **server}))


async def test_two_workers_serve_and_the_admin_port_sums_their_metrics(ops: Ops) -> None:
    proc = await spawn_workers(ops, await ops.upstream())
    kids = await workers_of(proc)
    clients: list[RawClient] = []
    for i in range(20):  # keep-alive: each connection stays on the worker that accepted it
        c = await ops.client(proc.port)
        assert (await c.request(get(f"/w/{i}"))).status == 200
        clients.append(c)
    held = {kid: sockets_on(kid, proc.port) for kid in kids}
    assert sum(held.values()) == 20 and all(held.values()), held  # both workers accepted connections
    assert sockets_on(proc.proc.pid, proc.port) == 0  # the supervisor never accepts
    for c in clients:
        await c.close()

    async def summed() -> bool:
        s = await scrape(admin_addr(proc))
        return (s.get("mtls_proxy_requests_total", method="GET", status="200", rule="partner-a") == 20
                and s.get("mtls_proxy_connections_total") == 20 and s.get("mtls_proxy_connections_active") == 0)

    await eventually(summed)  # the supervisor polls its workers about twice a second
    s = await scrape(admin_addr(proc), openmetrics=True)
    assert s.get("mtls_proxy_request_duration_seconds_count") == 20


async def test_sighup_reaches_every_worker(ops: Ops) -> None:
    proc = await spawn_workers(ops, await ops.upstream())
    await workers_of(proc)
    proc.signal(signal.SIGHUP)

    async def both_reloaded() -> bool:
        s = await scrape(admin_addr(proc))
        return s.get("mtls_proxy_reloads_total", result="success") == 2

    await eventually(both_reloaded)
    assert (await scrape(admin_addr(proc))).get("mtls_proxy_reloads_total", result="error") == 0
    assert await statuses(ops, proc.port, 4) == [200] * 4


async def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(ops: Ops) -> None:
    proc = await spawn_workers(ops, await ops.upstream())
    kids = await workers_of(proc)
    victim, survivor = kids
    os.kill(victim, signal.SIGKILL)

    async def victim_gone() -> bool:
        return victim not in children(proc.proc.pid)

    await eventually(victim_gone)
    assert await statuses(ops, proc.port, 10) == [200] * 10  # the other worker serves meanwhile

    new_kids = await workers_of(proc)
    assert survivor in new_kids and victim not in new_kids
    replacement = next(k for k in new_kids if k != survivor)
    clients = []
    for i in range(16):
        c = await ops.client(proc.port)
        assert (await c.request(get(f"/after/{i}"))).status == 200
        clients.append(c)
    assert sockets_on(replacement, proc.port) > 0  # the replacement serves too
    for c in clients:
        await c.close()
    assert "worker exited; restarting" in proc.stderr()


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(ops: Ops) -> None:
    gated = GatedUpstream()
    up = await ops.scripted(gated)
    proc = await spawn_workers(ops, up.port, shutdown_timeout=20.0)
    kids = await workers_of(proc)
    slow = await ops.client(proc.port)
    in_flight = asyncio.create_task(slow.request(get("/slow")))
    await asyncio.wait_for(gated.got_slow.wait(), 10)

    proc.signal(signal.SIGTERM)

    async def not_ready() -> bool:
        return (await admin_request(admin_addr(proc), "/readyz")).status == 503

    await eventually(not_ready)  # the supervisor's own flag: set before the workers even got the signal
    await eventually(lambda: refused(proc.port))  # every worker has closed its listener: all are draining
    assert not in_flight.done()
    gated.gate.set()
    resp = await asyncio.wait_for(in_flight, 10)
    assert (resp.status, resp.body, resp.header("connection")) == (200, b"slow", "close")
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert not [k for k in kids if Path(f"/proc/{k}").exists()]  # the workers are gone (and were reaped)
    await slow.close()
