"""``server.workers = N``: N worker processes sharing the TLS port, one admin endpoint for all of them.

Owns: starting the workers (each is ``python -m proxy serve`` with the same config, binding the port with
SO_REUSEPORT so the kernel spreads connections), restarting a worker that dies (``Backoff``: 0.2 s doubling to
5 s while it keeps dying, back to 0.2 s once a worker had run ``STABLE_AFTER`` seconds), passing
SIGTERM/SIGINT (drain) and SIGHUP (reload) on to every worker, and the admin port: ``/readyz`` is 200 only while
every worker reports ready and no drain has started; ``/metrics`` adds up the workers' snapshots.  With
``metrics.emf`` the supervisor also writes the task's Embedded Metric Format lines from those snapshots (the workers
write none, so nothing is counted twice).

Each worker gets one end of a socketpair (fd number in ``MTLS_WORKER_CONTROL_FD``); the supervisor writes one
byte to ask, the worker answers with a length-prefixed JSON snapshot ({"ready": bool, "metrics": {...}, "certs":
{...}}).  ``certs`` are the certificate-table changes since the previous answer (``proxy.cert_tracker``); the
supervisor asks with ``!`` instead of ``?`` when it needs the whole table (a new worker, or an answer it missed),
merges every worker's into one table, and serves it as ``/certs`` and the client-certificate expiry metric.

Must not: accept client connections itself or share memory with workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

from .accesslog import AccessLog
from .admin import AdminServer
from .cert_tracker import CertTable, Feed
from .config import DEFAULTS, ENVIRONMENT, Config
from .emf_output import EmfOutput
from .sockets import bind
from .metrics import Metrics, Snapshot

log = logging.getLogger("mtls_proxy")
CONTROL_ENV = "MTLS_WORKER_CONTROL_FD"
_LEN = struct.Struct("!I")
ASK, FULL = b"?", b"!"  # FULL also asks for the whole certificate table, not only what changed
BACKOFF_FIRST = 0.2  # seconds before the first restart after a worker died
BACKOFF_MAX = 5.0
# A worker that ran this long had started well: a crash after that is an incident to recover from at once, not
# part of a crash loop (a worker with a broken start dies within a second or two).  Six times the longest backoff,
# so a loop of crashes is never mistaken for a worker that ran well.
STABLE_AFTER = 30.0


class Backoff:
    """The delay before restarting a worker: doubling while it keeps dying, from the start once it ran well."""

    __slots__ = ("failures",)

    def __init__(self) -> None:
        self.failures = 0  # deaths in a row, each within STABLE_AFTER seconds of its start

    def next_delay(self, uptime: float) -> float:
        """Seconds to wait before restarting a worker that died after running ``uptime`` seconds."""
        if uptime >= STABLE_AFTER:
            self.failures = 0
        self.failures += 1
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self.failures - 1, 16))


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.control: socket.socket | None = None
        self.last: dict[str, Any] = {"ready": False, "metrics": None}
        self.restarts = 0  # in the life of the supervisor (for the log)
        self.backoff = Backoff()
        self.started_at = 0.0  # loop time of the last start
        self.certs = Feed()  # which certificate changes come next from this worker (proxy.cert_tracker)

    async def start(self, argv: list[str], env_extra: dict[str, str]) -> None:
        self.started_at = asyncio.get_running_loop().time()
        parent, child = socket.socketpair()
        env = {**os.environ, **env_extra, CONTROL_ENV: str(child.fileno())}
        self.proc = await asyncio.create_subprocess_exec(*argv, env=env, pass_fds=(child.fileno(),))
        child.close()
        parent.setblocking(False)
        self.control = parent
        self.last = {"ready": False, "metrics": None}
        self.certs.restart()

    async def poll(self, certs: CertTable | None = None, timeout: float = 1.0) -> dict[str, Any]:
        """Ask the worker for its state; the last good answer is kept if it does not reply in time.  Its
        certificate changes are merged into ``certs`` (a full table when a previous answer went missing)."""
        sock = self.control
        if sock is None or self.proc is None or self.proc.returncode is not None:
            return {"ready": False, "metrics": self.last.get("metrics")}
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _discard_stale(sock)
                await loop.sock_sendall(sock, FULL if self.certs.need_full else ASK)
                head = await _recv_exact(loop, sock, _LEN.size)
                self.last = json.loads(await _recv_exact(loop, sock, _LEN.unpack(head)[0]))
        except (OSError, TimeoutError, ValueError):
            return {"ready": False, "metrics": self.last.get("metrics")}
        changes = self.last.pop("certs", None)
        if certs is not None:
            self.certs.apply(changes, certs)
        return self.last

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None


def _discard_stale(sock: socket.socket) -> None:
    """Drop a late answer to an earlier poll that timed out: answers are matched to requests by order only, so
    one left queued would be read as the answer to every following poll (each one poll late), and a partial one
    would desynchronise the framing for good."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        pass


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise OSError("worker control channel closed")
        buf += chunk
    return buf


class WorkerControl:
    """The worker side of the control channel: answers every request byte with a snapshot."""

    def __init__(self, fd: int, snapshot: Any) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.snapshot = snapshot
        self._answered: asyncio.Event | None = None

    async def next_answer(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until the supervisor has asked and been answered once more."""
        self._answered = answered = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await answered.wait()
        except TimeoutError:
            return False
        return True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.sock.fileno(), self._on_request, loop)

    def _on_request(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            data = self.sock.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(self.sock.fileno())
            return
        self.sock.setblocking(True)  # small message on a local socketpair: completes at once
        try:
            for byte in data:
                payload = json.dumps(self.snapshot(byte == FULL[0])).encode()
                self.sock.sendall(_LEN.pack(len(payload)) + payload)
        finally:
            self.sock.setblocking(False)
        if self._answered is not None:
            self._answered.set()

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loop.remove_reader(self.sock.fileno())
        except (OSError, ValueError):
            pass
        self.sock.close()


async def _supervise(cfg: Config, argv: list[str]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stopping = False
    workers = [Worker(i) for i in range(cfg.server.workers)]

    cache: dict[str, Any] = {"ready": False, "snaps": []}
    # Embedded Metric Format: the supervisor alone writes the task's lines (see proxy.emf_output).  ``answers``
    # keeps the latest snapshot of every worker process by (worker, pid), a dead one's until its last counts have
    # gone into a line; ``own`` counts the supervisor's own dropped lines.
    answers: dict[tuple[int, int], Snapshot] = {}
    own = Metrics()
    emf: EmfOutput | None = None

    certs = CertTable()  # every worker's certificates, merged (the latest last_seen wins)

    def own_snapshot() -> dict[str, Any]:
        # The expiry metric from the merged table, so it agrees with /certs and survives a worker restart; merging
        # takes the minimum per rule, so this snapshot decides it.
        mine = Metrics()
        mine.client_cert_expiry = certs.expiry_by_rule(time.time())
        mine.cert_tracking_dropped = certs.dropped
        return mine.snapshot()

    async def refresh() -> None:
        while True:
            states = await asyncio.gather(*(w.poll(certs) for w in workers))
            cache["ready"] = all(s.get("ready") for s in states)
            cache["snaps"] = [s["metrics"] for s in states if s.get("metrics")]
            for w, state in zip(workers, states):
                if state.get("metrics") and isinstance(state.get("pid"), int):  # a fresh answer, not a kept one
                    answers[(w.index, state["pid"])] = state["metrics"]
            await asyncio.sleep(0.5)

    def emf_sources() -> dict[Any, Snapshot]:
        sources: dict[Any, Snapshot] = {**answers, "supervisor": own.snapshot()}
        live = {(w.index, w.proc.pid) for w in workers if w.proc is not None and w.proc.returncode is None}
        for key in [k for k in answers if k not in live]:
            del answers[key]  # its final counts are in this emission; a restarted worker has a new pid
        return sources

    def snapshots() -> list[Snapshot]:
        return [*cache["snaps"], own_snapshot(), *([own.snapshot()] if emf is not None else [])]

    admin = AdminServer(cfg.admin.listen, proxy_protocol=cfg.server.proxy_protocol,
                        ready=lambda: cache["ready"] and not stopping, snapshots=snapshots, certs=certs.report)
    await admin.start()
    assert admin.address is not None
    log.info("admin listening", extra={"fields": {"address": _fmt(admin.address)}})
    # Reserve the port (bound with SO_REUSEPORT, never listening, so it takes no connections): a port-0 listen
    # becomes one concrete port every worker binds, and no other process can take it between worker restarts.
    listen = cfg.server.listen
    reserve = bind(listen.host, listen.port, reuse_port=True, listen=False)
    port = reserve.getsockname()[1]
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    env_extra = {"MTLS_PROXY_SERVER_LISTEN": f"{host}:{port}"}
    for w in workers:
        await w.start(argv, env_extra)
    refresher = loop.create_task(refresh())
    if cfg.metrics.emf:
        emf = EmfOutput(loop, cfg.metrics, AccessLog(loop, 1, own), emf_sources, owns_out=True)
        emf.start()

    def forward(sig: signal.Signals) -> None:
        for w in workers:
            if w.proc is not None and w.proc.returncode is None:
                w.proc.send_signal(sig)

    def on_stop() -> None:
        nonlocal stopping
        stopping = True
        forward(signal.SIGTERM)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)

    async def keep_alive(w: Worker) -> None:
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            w.close()
            cache["ready"] = False  # do not wait for the next poll: /readyz must not report a dead worker ready
            if stopping:
                return
            w.restarts += 1
            uptime = loop.time() - w.started_at
            delay = w.backoff.next_delay(uptime)
            log.error("worker exited; restarting", extra={"fields": {
                "worker": w.index, "status": code, "restarts": w.restarts, "uptime_s": round(uptime, 1),
                "delay_s": delay}})
            await asyncio.sleep(delay)
            if stopping:
                return
            await w.start(argv, env_extra)

    keepers = [loop.create_task(keep_alive(w)) for w in workers]
    await stop.wait()
    try:
        await asyncio.wait_for(asyncio.gather(*keepers), cfg.server.shutdown_timeout + 5)
    except TimeoutError:
        log.error("workers did not stop in time; killing them")
        forward(signal.SIGKILL)
        await asyncio.gather(*keepers, return_exceptions=True)
    if emf is not None:
        emf.close()  # every worker has exited after its last poll: these lines complete the task's counts
    refresher.cancel()
    for w in workers:
        w.close()
    reserve.close()
    await admin.stop()
    return 0


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def supervise(cfg: Config, loop: str = "auto") -> int:
    """Run the supervisor (on the event loop ``loop`` names, as ``serve --loop``; its workers get the same)."""
    argv = [sys.executable, "-m", "proxy", "serve", "--loop", loop]
    if cfg.source not in (ENVIRONMENT, DEFAULTS):
        argv += ["--config", cfg.source]
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover
            pass
        else:
            return uvloop.run(_supervise(cfg, argv))
    return asyncio.run(_supervise(cfg, argv))
