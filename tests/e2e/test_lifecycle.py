"""Lifecycle of the real process: drain on SIGTERM, reload on SIGHUP and on file change.

Owns: a slow in-flight request finishing with ``Connection: close`` while new connections are refused, idle
keep-alive connections close and the process exits 0 within ``shutdown_timeout`` (also when a request outlives
it); certificate, client CA, CRL and allow-rule reloads under continuous load with zero failed requests, new
handshakes seeing the new certificate while live connections keep theirs; bad files keeping the old state with
one clear log line and ``reloads_total{result="error"}``.

Every test runs ``python -m proxy serve`` (signals and exit codes are the point); upstreams run on the test's
loop, so blocking calls on the process go through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509

from proxy import config as config_mod
from tests.e2e.kit import GatedUpstream, Ops, admin_addr, admin_request, eventually, refused, scrape
from tests.harness import ProxyProcess, RawClient, get, write_config
from tests.pki import ClientCert, Pki

CLOSE = b"Connection: close\r\n"


# ---- drain -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_drain_finishes_in_flight_refuses_new_closes_idle_and_exits_0(ops: Ops, sig: signal.Signals) -> None:
    gated = GatedUpstream()
    up = await ops.scripted(gated)
    proc = await ops.spawn(ops.config(up.port, server={"shutdown_timeout": 20.0}))
    idle = await ops.client(proc.port)
    first = await idle.request(get("/fast"))
    assert first.status == 200 and first.header("connection") is None  # keep-alive, now idle
    slow = await ops.client(proc.port)
    in_flight = asyncio.create_task(slow.request(get("/slow")))
    await asyncio.wait_for(gated.got_slow.wait(), 10)

    proc.signal(sig)
    await eventually(lambda: refused(proc.port))  # the listener is closed
    assert await idle.closed_by_peer(timeout=10)  # idle keep-alive connections are closed
    readyz = await admin_request(admin_addr(proc), "/readyz")
    assert readyz.status == 503
    assert not in_flight.done()  # all of the above happened while the slow request was in flight

    gated.gate.set()
    resp = await asyncio.wait_for(in_flight, 10)
    assert (resp.status, resp.body) == (200, b"slow")
    assert resp.header("connection") == "close"  # its head was written after the drain began
    assert await slow.closed_by_peer(timeout=10)
    assert await asyncio.to_thread(proc.wait, 20) == 0  # within shutdown_timeout
    assert "drain timeout" not in proc.stderr()
    await idle.close()
    await slow.close()


async def test_request_outliving_shutdown_timeout_is_cut_and_the_process_still_exits_0(ops: Ops) -> None:
    gated = GatedUpstream()  # the gate is never opened
    up = await ops.scripted(gated)
    proc = await ops.spawn(ops.config(up.port, server={"shutdown_timeout": 1.0}))
    slow = await ops.client(proc.port)
    in_flight = asyncio.create_task(slow.request(get("/slow")))
    await asyncio.wait_for(gated.got_slow.wait(), 10)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 1.0 + 10) == 0
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ssl.SSLError)):
        await asyncio.wait_for(in_flight, 10)  # reset: a truncated answer must not look complete
    assert "drain timeout" in proc.stderr()
    await slow.close()


async def test_drain_does_not_wait_for_sockets_that_never_finished_tls(ops: Ops) -> None:
    """Idle TCP (an NLB TCP health check, a scanner) at SIGTERM: cut at once, not after shutdown_timeout."""
    proc = await ops.spawn(ops.config(await ops.upstream(), server={"shutdown_timeout": 40.0}))
    _, writer = await asyncio.open_connection("127.0.0.1", proc.port)
    half = await asyncio.open_connection("127.0.0.1", proc.port)
    half[1].write(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello

    async def both_accepted() -> bool:
        return (await scrape(admin_addr(proc))).get("mtls_proxy_connections_active") == 2

    await eventually(both_accepted)
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 15) == 0  # well before the 40 s shutdown_timeout
    assert "drain timeout" not in proc.stderr()
    for w in (writer, half[1]):
        w.close()
        try:
            await w.wait_closed()
        except ConnectionError:
            pass


# ---- reload: PKI and load ----------------------------------------------------------------------------------


@dataclass
class ServerPki:
    """A server CA of the test's own (``Pki`` keeps its server CA key private) with two valid leaves."""

    ca: trustme.CA
    leaves: list[trustme.LeafCert]
    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path) -> ServerPki:
        ca = trustme.CA(organization_name="mtls-proxy tests", organization_unit_name="reload server CA")
        now = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
        # different notAfter, so the expiry metric shows which one is loaded
        leaves = [ca.issue_cert("localhost", "127.0.0.1", common_name=f"localhost-{i}",
                                not_after=now + dt.timedelta(days=90 + 30 * i)) for i in range(2)]
        sp = cls(ca, leaves, directory / "server.crt", directory / "server.key")
        sp.install(0)
        return sp

    def der(self, i: int) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.leaves[i].cert_chain_pems[0].bytes().decode())

    def not_after(self, i: int) -> float:
        return x509.load_der_x509_certificate(self.der(i)).not_valid_after_utc.timestamp()

    def install(self, i: int, key_of: int | None = None) -> None:
        """Replace both files atomically (rename over), as a secrets sidecar or ``cp`` + ``mv`` would."""
        leaf = self.leaves[i]
        _replace(self.key, self.leaves[i if key_of is None else key_of].private_key_pem.bytes())
        _replace(self.cert, b"".join(p.bytes() for p in leaf.cert_chain_pems))

    def client(self, pki: Pki, name: str | None = "good") -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if name is not None:
            cc: ClientCert = pki.clients[name]
            ctx.load_cert_chain(cc.cert, cc.key)
        return ctx


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


@dataclass
class Load:
    """Four client loops: a new TLS connection every fifth request, keep-alive in between."""

    failures: list[str] = field(default_factory=list)
    done: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    certs: list[bytes] = field(default_factory=list)  # the server certificate of each new connection, in order
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def loop(self, i: int, port: int, ctx: ssl.SSLContext) -> None:
        client: RawClient | None = None
        n = 0
        while not self.stop.is_set():
            try:
                if client is None:
                    client = await RawClient.connect(port, ctx)
                    self.certs.append(client.writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
                resp = await client.request(get(f"/load/{i}/{n}"))
                if resp.status != 200:
                    self.failures.append(f"loop {i} request {n}: {resp.status} {resp.body[:200]!r}")
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.failures.append(f"loop {i} request {n}: {exc!r}")
                client = None
            n += 1
            self.done[i] += 1
            if client is not None and n % 5 == 0:
                await client.close()
                client = None
        if client is not None:
            await client.close()

    async def progressed(self, at_least: int) -> None:
        """Wait until every loop has made ``at_least`` more requests than now."""
        marks = list(self.done)

        async def moved() -> bool:
            return all(d >= m + at_least for d, m in zip(self.done, marks))

        await eventually(moved, timeout=30)


@asynccontextmanager
async def load_running(port: int, ctx: ssl.SSLContext) -> AsyncIterator[Load]:
    load = Load()
    tasks = [asyncio.create_task(load.loop(i, port, ctx)) for i in range(4)]
    try:
        await load.progressed(5)
        yield load
        await load.progressed(10)  # the load keeps running well after the reload
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)


@dataclass
class ReloadSetup:
    proc: ProxyProcess
    server: ServerPki
    config: Path
    client_ca: Path
    sections: dict[str, Any]

    async def new_handshake_cert(self, pki: Pki) -> bytes:
        c = await RawClient.connect(self.proc.port, self.server.client(pki))
        der = c.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        await c.close()
        return der  # type: ignore[no-any-return]

    async def reloads(self) -> dict[str, float]:
        s = await scrape(admin_addr(self.proc))
        return {dict(k)["result"]: v for k, v in s.series("mtls_proxy_reloads_total").items()}

    def rewrite_config(self, pki: Pki, rules: list[dict[str, Any]]) -> None:
        tmp = self.config.with_name("next.toml")
        write_config(tmp, pki, 0, rules=rules, **self.sections)
        os.replace(tmp, self.config)


async def start_reloadable(ops: Ops, reload_interval: float, crl: Path | None = None) -> ReloadSetup:
    server = ServerPki.create(ops.tmp)
    client_ca = ops.tmp / "client-ca.pem"
    _replace(client_ca, ops.pki.client_ca.read_bytes())
    cfg = ops.config(await ops.upstream())
    loaded = config_mod.load(cfg, {})
    sections: dict[str, Any] = {
        "server": {"listen": str(loaded.server.listen), "cert": str(server.cert), "key": str(server.key),
                   "client_ca": str(client_ca), "crl": str(crl) if crl else None, "reload_interval": reload_interval},
        "upstream": {"connect_to": str(loaded.upstream.connect_to)},
        "admin": {"listen": str(loaded.admin.listen)},
    }
    write_config(cfg, ops.pki, 0, rules=[{"name": "partner-a", "subject_cn": ["client-a"]}], **sections)
    proc = await ops.spawn(cfg)
    return ReloadSetup(proc, server, cfg, client_ca, sections)


async def _status(port: int, ctx: ssl.SSLContext) -> int | str:
    """The status of one request on a new connection, or the name of the error that ended it."""
    try:
        c = await RawClient.connect(port, ctx)
    except (ssl.SSLError, OSError) as exc:
        return type(exc).__name__
    try:
        return (await c.request(get("/probe", extra=CLOSE))).status
    except (ssl.SSLError, OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    finally:
        await c.close()


# ---- reload: good changes under load -------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["sighup", "file-change"])
async def test_reload_under_load_swaps_cert_ca_and_rules_without_a_failed_request(ops: Ops, trigger: str) -> None:
    rs = await start_reloadable(ops, reload_interval=0.2 if trigger == "file-change" else 0)
    pki = ops.pki
    old, new = rs.server.der(0), rs.server.der(1)
    assert await rs.new_handshake_cert(pki) == old
    assert isinstance(await _status(rs.proc.port, rs.server.client(pki, "other_ca_same_cn")), str)  # not trusted
    assert await _status(rs.proc.port, rs.server.client(pki, "other")) == 403  # client-b: no rule yet
    live = await RawClient.connect(rs.proc.port, rs.server.client(pki))
    assert (await live.request(get("/live"))).status == 200

    async with load_running(rs.proc.port, rs.server.client(pki)) as load:
        rs.server.install(1)
        _replace(rs.client_ca, pki.client_ca.read_bytes() + pki.other_client_ca.read_bytes())
        rs.rewrite_config(pki, [{"name": "partner-a", "subject_cn": ["client-a"]},
                                {"name": "partner-b", "subject_cn": ["client-b"]}])
        if trigger == "sighup":
            rs.proc.signal(signal.SIGHUP)

        async def swapped() -> bool:
            return await rs.new_handshake_cert(pki) == new

        await eventually(swapped)

    assert load.failures == []
    assert old in load.certs and new in load.certs  # the load made handshakes on both sides of the swap
    reloads = await rs.reloads()
    assert reloads == {"success": 1, "error": 0}  # file-change: the renames settle first, then one reload
    assert await _status(rs.proc.port, rs.server.client(pki, "other_ca_same_cn")) == 200  # newly trusted CA
    assert await _status(rs.proc.port, rs.server.client(pki, "other")) == 200  # new rule partner-b
    # the connection from before the reload still works, on the certificate it started with
    assert (await live.request(get("/live"))).status == 200
    assert live.writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == old
    await live.close()
    s = await scrape(admin_addr(rs.proc))
    assert s.get("mtls_proxy_cert_expiry_timestamp_seconds", cert="server") == rs.server.not_after(1)
    cas = [dict(k)["cert"] for k in s.series("mtls_proxy_cert_expiry_timestamp_seconds")]
    assert len([c for c in cas if c.startswith("client_ca:")]) == 3  # main CA, self-signed, and now the other CA


async def test_crl_reload_refuses_a_newly_revoked_client(ops: Ops) -> None:
    crl = ops.pki.write_crl(ops.tmp / "crl.pem", [ops.pki.clients["revoked"]], number=3)
    rs = await start_reloadable(ops, reload_interval=0, crl=crl)
    rs.rewrite_config(ops.pki, [{"name": "partner-a", "subject_cn": ["client-a", "client-b"]}])
    rs.proc.signal(signal.SIGHUP)
    await eventually(lambda: _reloaded(rs, 1))
    other = rs.server.client(ops.pki, "other")
    assert await _status(rs.proc.port, other) == 200
    tmp = ops.tmp / "crl.next"
    ops.pki.write_crl(tmp, [ops.pki.clients["revoked"], ops.pki.clients["other"]], number=4)
    os.replace(tmp, crl)
    rs.proc.signal(signal.SIGHUP)
    await eventually(lambda: _reloaded(rs, 2))
    assert isinstance(await _status(rs.proc.port, other), str)
    s = await scrape(admin_addr(rs.proc))
    assert s.get("mtls_proxy_tls_handshake_failures_total", reason="revoked") == 1
    assert await _status(rs.proc.port, rs.server.client(ops.pki)) == 200


async def _reloaded(rs: ReloadSetup, n: int) -> bool:
    return (await rs.reloads()).get("success") == n


# ---- reload: bad changes keep the old state ------------------------------------------------------------------

GARBAGE_PEM = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


def _break(rs: ReloadSetup, how: str) -> str:
    """Make one bad change; returns the config key the log line must name."""
    if how == "garbage-cert-pem":
        _replace(rs.server.cert, GARBAGE_PEM)
        return "server.cert"
    if how == "key-not-matching":
        rs.server.install(1, key_of=0)
        return "server.key"
    if how == "garbage-client-ca":
        _replace(rs.client_ca, b"not pem at all\n")
        return "server.client_ca"
    if how == "key-file-removed":
        rs.server.key.unlink()
        return "server.key"
    if how == "bad-config":
        rs.config.write_text(rs.config.read_text() + "\n[server\n")
        return "invalid TOML"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["garbage-cert-pem", "key-not-matching", "garbage-client-ca", "key-file-removed",
                                 "bad-config"])
async def test_bad_reload_keeps_serving_the_old_state(ops: Ops, how: str) -> None:
    rs = await start_reloadable(ops, reload_interval=0)
    old = rs.server.der(0)
    live = await RawClient.connect(rs.proc.port, rs.server.client(ops.pki))
    assert (await live.request(get("/live"))).status == 200

    async with load_running(rs.proc.port, rs.server.client(ops.pki)) as load:
        names = _break(rs, how)
        rs.proc.signal(signal.SIGHUP)

        async def counted() -> bool:
            return (await rs.reloads()).get("error") == 1

        await eventually(counted)
        assert await rs.new_handshake_cert(ops.pki) == old

    assert load.failures == []
    assert set(load.certs) == {old}
    assert (await live.request(get("/live"))).status == 200
    lines = [ln for ln in rs.proc.stderr().splitlines() if "reload failed" in ln]
    assert len(lines) == 1 and names in lines[0], lines
    assert (await rs.reloads()) == {"success": 0, "error": 1}

    # repaired files are picked up by the next reload
    rs.server.install(1)
    _replace(rs.client_ca, ops.pki.client_ca.read_bytes())
    rs.rewrite_config(ops.pki, [{"name": "partner-a", "subject_cn": ["client-a"]}])
    rs.proc.signal(signal.SIGHUP)
    await eventually(lambda: _reloaded(rs, 1))
    assert await rs.new_handshake_cert(ops.pki) == rs.server.der(1)
    await live.close()


async def test_file_change_reload_waits_for_cert_and_key_to_settle(ops: Ops) -> None:
    """A rotation that renames the key, then the certificate a moment later, is one clean reload, not an error.

    Polling every 50 ms, the watcher certainly sees the key alone (it would not match the certificate); the
    change is only loaded once both files have stayed put for the settle period.
    """
    rs = await start_reloadable(ops, reload_interval=0.05)
    old, new = rs.server.der(0), rs.server.der(1)
    assert await rs.new_handshake_cert(ops.pki) == old
    _replace(rs.server.key, rs.server.leaves[1].private_key_pem.bytes())
    await asyncio.sleep(0.3)  # six poll intervals with a key that does not match the certificate
    _replace(rs.server.cert, b"".join(p.bytes() for p in rs.server.leaves[1].cert_chain_pems))

    async def swapped() -> bool:
        return await rs.new_handshake_cert(ops.pki) == new

    await eventually(swapped)
    assert await rs.reloads() == {"success": 1, "error": 0}
    assert "reload failed" not in rs.proc.stderr()


async def test_no_reload_happens_without_a_signal_or_change(ops: Ops) -> None:
    """The file watcher compares stamps: an unchanged tree is not reloaded every interval."""
    rs = await start_reloadable(ops, reload_interval=0.1)
    await asyncio.sleep(0.5)  # several poll intervals (this is the behaviour under test, not a readiness wait)
    assert await rs.reloads() == {"success": 0, "error": 0}
    assert await _status(rs.proc.port, rs.server.client(ops.pki)) == 200


async def test_run_drains_when_its_shutdown_trigger_completes(ops: Ops) -> None:
    """``server.run(shutdown_trigger=...)``: the drain starts when the awaitable completes, no signal involved."""
    from proxy import server as server_mod
    from tests.harness import free_port

    gated = GatedUpstream()
    up = await ops.scripted(gated)
    port = free_port()
    cfg = config_mod.load(ops.config(up.port, server={"listen": f"127.0.0.1:{port}", "shutdown_timeout": 20.0}), {})
    fire = asyncio.Event()
    running = asyncio.create_task(server_mod.run(cfg, shutdown_trigger=fire.wait))
    slow = await eventually(lambda: _connect_or_none(ops, port))
    in_flight = asyncio.create_task(slow.request(get("/slow")))
    await asyncio.wait_for(gated.got_slow.wait(), 10)

    fire.set()
    await eventually(lambda: refused(port))  # new connections are refused once the trigger has fired
    assert not in_flight.done()
    gated.gate.set()
    resp = await asyncio.wait_for(in_flight, 10)
    assert (resp.status, resp.body) == (200, b"slow")
    assert await asyncio.wait_for(running, 20) == 0  # run() returns after the drain
    assert await refused(port)
    await slow.close()


async def _connect_or_none(ops: Ops, port: int) -> RawClient | None:
    try:
        return await ops.client(port)
    except OSError:
        return None
