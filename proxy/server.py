"""Wiring and lifecycle of one proxy process: start, ready, reload, drain.

Owns: the ``ProxyServer``, which builds the ``ServerState`` connections share (``proxy.state``: config, current
runtime snapshot, upstream pool, metrics, access log, partner state, live connections) and swaps what changes in it,
and ``run()``, the one function where the lifecycle reads top to bottom: start -> ready -> (reload on SIGHUP or file
change)* -> SIGTERM/SIGINT -> drain -> exit.

Reload: the config file and PEM files are re-read off the event loop into a new ``Runtime``; one assignment swaps it
in; new handshakes use it, live connections keep theirs; on any error the old snapshot stays, one line is logged and
``reloads_total{result="error"}`` counts it. Only the allow rules and PEM material are reloadable; other changed
keys are logged as needing a restart.

Drain: ``/readyz`` turns 503 first, then the listener closes, idle keep-alive connections close, in-flight exchanges
finish with ``Connection: close`` until ``shutdown_timeout``, then the rest are reset.

Must not: install signal handlers anywhere but ``run()``; handlers only set events, so the lifecycle's order is
decided in one place and a signal can never run code in the middle of an exchange.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import time
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

from . import config as config_mod
from .accesslog import AccessLog
from .admin import AdminServer
from .config import DEFAULTS, ENVIRONMENT, Config
from .emf_output import EmfOutput
from .errors import ConfigErrors
from .upstream import UpstreamPool
from .listener import Listener
from .sockets import Lingerer, bind
from .metrics import Metrics
from .partners import Partners
from .runtime import Runtime, build_runtime
from .slots import ConnectionSlots
from .state import ServerState
from .supervisor import WorkerControl

log = logging.getLogger("mtls_proxy")

# Keys a reload can apply; anything else that changed is reported as "restart to apply".
_RELOADABLE_SERVER = {"cert", "key", "client_ca", "crl", "send_client_ca_names", "client_sigalgs"}


class ProxyServer:
    def __init__(self, cfg: Config, *, metrics: Metrics | None = None, access_fd: int | None = 1,
                 emf: bool | None = None) -> None:
        """``access_fd``: where the access log (and the metric lines) go.  ``emf``: write Embedded Metric Format
        lines there (default: ``metrics.emf``; a worker of a supervisor never does, its supervisor writes them)."""
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.state: ServerState = None  # type: ignore[assignment]  # built by start(): what connections share
        # CLOCK_MONOTONIC (what the event loop's time() reads) drives the rate-limit buckets, in whole nanoseconds.
        self.partners = Partners(time.monotonic_ns, time.time)
        self.metrics.partner_facts = self._partner_facts
        # accepted sockets not yet closed, including those still handshaking: the one count of them
        self.slots = ConnectionSlots(cfg.server.max_connections, self.metrics)
        self.ready = False
        self._access_fd = access_fd if cfg.log.access else None
        self._stdout_fd = access_fd
        self._emf_enabled = cfg.metrics.emf if emf is None else emf
        self.emf: EmfOutput | None = None
        self._listener: Listener | None = None
        self._stamps: dict[Path, tuple[int, int, int] | None] = {}
        self._sources: Any = None  # proxy.sources.material.Material of the remote PEM sources, if any
        self.address: tuple[str, int] | None = None

    async def start(self, sock: socket.socket | None = None, runtime: Runtime | None = None) -> None:
        """Load certificates, bind, and start accepting.  Raises ConfigErrors or OSError."""
        loop = asyncio.get_running_loop()
        remote = _remote_sources(self.cfg)
        if remote:
            # Imported only here: a proxy with file and env: sources never loads the source readers (or boto3).
            from .sources.material import Material

            self._sources = Material(remote, _VALIDATORS, environ=os.environ)
            await loop.run_in_executor(None, self._sources.load)  # ConfigErrors naming the key: fatal
            self._record_sources()
        rt = runtime or build_runtime(self.cfg, self._sources)
        self._publish_facts(rt)
        self._stamps = _stamp_all(self.cfg.watched_files)
        self.state = ServerState(loop, self.cfg, rt, self.metrics,
                                 UpstreamPool(loop, self.cfg.upstream, rt.upstream_context),
                                 AccessLog(loop, self._access_fd, self.metrics),
                                 Lingerer(loop, limit=self.cfg.server.max_connections), self.partners, self.slots)
        listen = self.cfg.server.listen
        if sock is None:
            sock = bind(listen.host, listen.port, reuse_port=self.cfg.server.workers > 1)
        self.address = sock.getsockname()[:2]
        self._listener = Listener(self.state, sock)
        self._listener.start()
        if self._emf_enabled:
            self._start_emf()
        self.ready = True
        log.info("listening", extra={"fields": {"address": f"{self.address[0]}:{self.address[1]}",
                                                "upstream": self.cfg.upstream.url, "loop": _loop_name(loop)}})

    def _start_emf(self) -> None:
        # The access log's writer when there is one (one writer per descriptor: two would each register the
        # descriptor with the loop, and the second would silently replace the first); else one of its own.
        if self._access_fd is not None:
            out, owned = self.state.access_log, False
        else:
            out, owned = AccessLog(self.state.loop, self._stdout_fd, self.metrics), True
        metrics = self.metrics
        self.emf = EmfOutput(self.state.loop, self.cfg.metrics, out, lambda: {"process": metrics.snapshot()},
                             owns_out=owned)
        self.emf.start()

    def _partner_facts(self) -> tuple[dict[str, float], int, int]:
        p = self.partners
        return p.certs.expiry_by_rule(time.time()), p.certs.dropped, p.buckets.forced_evictions

    @property
    def active(self) -> int:
        return self.slots.active

    # -- reload ------------------------------------------------------------------------------------------
    def files_changed(self) -> bool:
        stamps = _stamp_all(self.cfg.watched_files)
        return stamps != self._stamps

    async def sources_changed(self) -> bool:
        """Re-read every remote source conditionally (off the loop); True when one holds new good content.

        A source that fails, or holds content its validator refuses, keeps its last good copy (the running
        snapshot is untouched), counts ``mtls_proxy_source_errors_total{source}`` and is logged once when it
        turns failing and once when it recovers."""
        if self._sources is None:
            return False
        result = await self.state.loop.run_in_executor(None, self._sources.poll)
        for key, problem in result.became_failing.items():
            log.error("source %s failing, keeping its last good copy: %s", key, problem)
        for key in result.recovered:
            log.info("source %s recovered", key)
        self._record_sources()
        return bool(result.changed)

    def _record_sources(self) -> None:
        for key, health in self._sources.health().items():
            self.metrics.source_errors[key] = health.errors
            self.metrics.source_last_ok[key] = health.last_ok

    async def reload(self) -> bool:
        """Re-read config and files off the loop; swap on success, keep the old snapshot on failure."""
        stamps = _stamp_all(self.cfg.watched_files)
        try:
            rt = await self.state.loop.run_in_executor(None, self._build_reloaded)
        except ConfigErrors as exc:
            self._stamps = stamps  # do not retry the same broken files every interval
            self.metrics.reloads["error"] += 1
            log.error("reload failed, keeping the previous certificates and rules: %s",
                      "; ".join(str(e) for e in exc.errors))
            return False
        self.state.runtime = rt
        self.state.pool.ssl_context = rt.upstream_context
        self._stamps = stamps
        self._publish_facts(rt)
        self.metrics.reloads["success"] += 1
        log.info("reloaded", extra={"fields": {"rules": len(rt.cfg.allow)}})
        return True

    def _build_reloaded(self) -> Runtime:
        cfg = self.cfg
        # An environment-only config is read again only for its allow_from document (the process's environment
        # itself never changes).
        if cfg.source != DEFAULTS and (cfg.source != ENVIRONMENT or cfg.allow_from is not None):
            fresh = config_mod.load(None if cfg.source == ENVIRONMENT else cfg.source)
            changed = _unreloadable_changes(cfg, fresh)
            if changed:
                log.warning("config changes need a restart to apply: %s", ", ".join(changed))
            cfg = config_mod.replace(cfg, allow=fresh.allow, allow_all_verified=fresh.allow_all_verified,
                                     server=dataclasses.replace(
                                         cfg.server, cert=fresh.server.cert, key=fresh.server.key,
                                         client_ca=fresh.server.client_ca, crl=fresh.server.crl))
        return build_runtime(cfg, self._sources)

    def _publish_facts(self, rt: Runtime) -> None:
        self.metrics.cert_expiry = {f.label: f.not_after for f in rt.facts}

    # -- drain -------------------------------------------------------------------------------------------
    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight exchanges finish within ``timeout``, then reset what is left."""
        self.ready = False
        self.state.draining = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.state.connections):
            conn.shutdown()
        if not await self.slots.wait_empty(timeout):
            log.warning("drain timeout: resetting %d connections", len(self.state.connections))
        for conn in list(self.state.connections):
            conn.abort()
        self.state.pool.close()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        self.state.lingerer.close_all()
        if self.emf is not None:
            self.emf.close()  # the last interval's counts, drain included
        self.state.access_log.close()


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": which event loop this process really runs on (``serve --loop``)."""
    return "uvloop" if type(loop).__module__.split(".")[0] == "uvloop" else "asyncio"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _stamp_all(paths: tuple[Path, ...]) -> dict[Path, tuple[int, int, int] | None]:
    return {p: _stamp(p) for p in paths}


def _unreloadable_changes(old: Config, new: Config) -> list[str]:
    changed = []
    for section in ("server", "upstream", "admin", "log", "identity", "metrics"):
        a, b = getattr(old, section), getattr(new, section)
        for f in dataclasses.fields(a):
            if section == "server" and f.name in _RELOADABLE_SERVER:
                continue
            if getattr(a, f.name) != getattr(b, f.name):
                changed.append(f"{section}.{f.name}")
    return changed


async def run(cfg: Config, *, control_fd: int | None = None, runtime: Runtime | None = None,
              shutdown_trigger: Callable[[], Awaitable[None]] | None = None) -> int:
    """The whole life of one proxy process.  Returns the exit status.

    ``shutdown_trigger``: when given, no SIGTERM/SIGINT handlers are installed; the server drains and stops once
    the awaitable it returns completes (an embedding program or a test decides when).  Without it SIGTERM or
    SIGINT starts the drain.

    With ``control_fd`` this is a worker of ``proxy.supervisor``: no admin port of its own, its state is
    reported over the control socket instead.  ``runtime``: the snapshot the command line already built (and
    checked) from ``cfg``; without it one is built here.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    server = ProxyServer(cfg, emf=cfg.metrics.emf and control_fd is None)
    admin: AdminServer | None = None
    control: WorkerControl | None = None
    if control_fd is None:
        admin = AdminServer(cfg.admin.listen, proxy_protocol=cfg.server.proxy_protocol,
                            ready=lambda: server.ready, snapshots=lambda: [server.metrics.snapshot()],
                            certs=lambda: server.partners.certs.report())
        await admin.start()  # /healthz answers from here on; /readyz once the listener is up
    else:
        # The pid tells the supervisor which process these counts belong to (a restarted worker starts at zero).
        pid = os.getpid()
        control = WorkerControl(control_fd, lambda full: {
            "ready": server.ready, "metrics": server.metrics.snapshot(),
            "certs": server.partners.certs.changes(full), "pid": pid})
        control.start(loop)
    try:
        await server.start(runtime=runtime)
    except BaseException:
        if admin is not None:
            await admin.stop()
        raise
    if admin is not None and admin.address is not None:
        log.info("admin listening", extra={"fields": {"address": f"{admin.address[0]}:{admin.address[1]}"}})
    stop_signals = () if shutdown_trigger is not None else (signal.SIGTERM, signal.SIGINT)
    for sig in stop_signals:
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    trigger: asyncio.Task[None] | None = None
    if shutdown_trigger is not None:
        async def _await_trigger() -> None:
            try:
                await shutdown_trigger()
            finally:
                stop.set()  # a trigger that fails still stops the server rather than leaving it running
        trigger = loop.create_task(_await_trigger())
    watcher = loop.create_task(_watch(server, reload_now, stop))
    try:
        await stop.wait()
        log.info("draining", extra={"fields": {"connections": server.active,
                                               "timeout": cfg.server.shutdown_timeout}})
        watcher.cancel()
        await server.drain(cfg.server.shutdown_timeout)
        if control is not None and cfg.metrics.emf:
            # The supervisor writes this worker's metric lines from its polls: stay until it has polled once more,
            # so the requests finished during the drain are in its final lines.
            await control.next_answer(FINAL_POLL_WAIT)
    finally:
        if trigger is not None and not trigger.done():
            trigger.cancel()
        for sig in (*stop_signals, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if admin is not None:
            await admin.stop()
        if control is not None:
            control.close(loop)
    log.info("stopped", extra={"fields": {"pid": os.getpid()}})
    return 0


FINAL_POLL_WAIT = 2.0  # seconds a draining worker waits for the supervisor's last poll (it polls twice a second)


def _remote_sources(cfg: Config) -> dict[str, Any]:
    """Config key -> Location of every remote PEM source (polled every ``reload_interval``)."""
    pems = {"server.cert": cfg.server.cert, "server.key": cfg.server.key, "server.client_ca": cfg.server.client_ca,
            "server.crl": cfg.server.crl, "upstream.ca_bundle": cfg.upstream.ca_bundle}
    pems["allow_from"] = cfg.allow_from
    return {key: src.location for key, src in pems.items() if src is not None and src.remote}


def _pem_only(data: bytes) -> None:
    if b"-----BEGIN " not in data:
        raise ValueError("no PEM data")


def _rules_document(data: bytes) -> None:
    from .config.rules import parse_rules_document

    parse_rules_document(data)  # the rules themselves are checked by the reload, which keeps the old on failure


def _crl_only(data: bytes) -> None:
    from .config import PemSource
    from .errors import ConfigError
    from .tls import load_crls

    try:
        load_crls(data, PemSource(path=Path("-")))
    except ConfigError as exc:
        raise ValueError(exc.message.removeprefix("-: ")) from None


# Content a poll refuses outright (keeping the last good copy); deeper problems (a key that does not match its
# certificate) are caught by building the new snapshot, which keeps the old one on failure.
_VALIDATORS = {"server.cert": _pem_only, "server.key": _pem_only, "server.client_ca": _pem_only,
               "server.crl": _crl_only, "upstream.ca_bundle": _pem_only, "allow_from": _rules_document}


RELOAD_SETTLE = 1.0  # seconds the watched files must stay unchanged before a change-triggered reload
RELOAD_SETTLE_ROUNDS = 10  # a file that never stops changing is loaded after this many settle periods anyway


async def _watch(server: ProxyServer, reload_now: asyncio.Event, stop: asyncio.Event) -> None:
    """Reload on SIGHUP at once, and when watched files change (polled every ``reload_interval``).

    A change is loaded once the files have stopped changing for ``RELOAD_SETTLE`` seconds: certificate and key
    are two files, and a rotation that renames them one after the other would otherwise be caught half done and
    counted (and logged, and perhaps alerted on) as a failed reload.
    """
    interval = server.cfg.server.reload_interval
    while not stop.is_set():
        try:
            await asyncio.wait_for(reload_now.wait(), interval if interval > 0 else None)
        except TimeoutError:
            if not server.files_changed():
                if not await server.sources_changed():
                    continue
            else:
                await _settle(server, reload_now)
        reload_now.clear()
        await server.reload()


async def _settle(server: ProxyServer, reload_now: asyncio.Event) -> None:
    """Return once the watched files look the same twice ``RELOAD_SETTLE`` apart, or at once on SIGHUP."""
    stamps = _stamp_all(server.cfg.watched_files)
    for _ in range(RELOAD_SETTLE_ROUNDS):
        try:
            await asyncio.wait_for(reload_now.wait(), RELOAD_SETTLE)
            return  # the operator says the files are ready
        except TimeoutError:
            pass
        again = _stamp_all(server.cfg.watched_files)
        if again == stamps:
            return
        stamps = again
