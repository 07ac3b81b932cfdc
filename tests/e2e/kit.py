"""The end-to-end kit: one object (``Ops``) that starts upstreams, configs, proxies, processes and clients for
one test and stops all of it, plus the parsers and probes the e2e and adversarial tests share.

Owns: SniUpstream (a scripted raw-TLS upstream that records each ClientHello's server name), CountingUpstream
(the demo upstream recording every request), Samples/scrape (parsed /metrics), admin_request (raw HTTP to the
admin port, optionally behind a PROXY v2 header), GatedUpstream (holds /slow requests until the test opens the
gate), MemTLSClient (TLS over ssl.MemoryBIO: the test decides which bytes go into which send()), eventually
(poll, never sleep), refused (nothing listens on a port), children (worker pids), Echo/echo_of (the demo
upstream's echo, parsed), CurlResult.
Must not: mock sockets, TLS or clocks; hold module-level mutable state.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.openmetrics.parser import text_string_to_metric_families as _parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as _parse_prometheus

from proxy import config as config_mod
from proxy.admin import AdminServer
from proxy.dev import demo_upstream
from tests.harness import (
    Handler,
    ProxyProcess,
    RawClient,
    Response,
    RunningProxy,
    ScriptedUpstream,
    client_ctx,
    read_request,
    spawn_proxy,
    start_demo_upstream,
    start_proxy,
    stop_proxy,
    write_config,
)
from tests.pki import Pki, UpstreamKind


@dataclass
class _RecordingSource:
    """Stands in for ``Pki`` inside ScriptedUpstream: hands out a server context that records each SNI."""

    pki: Pki
    which: UpstreamKind
    sni: list[str | None]

    def upstream_server_context(self) -> ssl.SSLContext:
        ctx = self.pki.upstream_server_context(self.which)
        ctx.sni_callback = self._record
        return ctx

    def _record(self, _sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.sni.append(name)


@dataclass
class SniUpstream(ScriptedUpstream):
    """A ScriptedUpstream presenting the ``which`` certificate; ``sni`` lists the server name of each ClientHello."""

    which: UpstreamKind = "good"
    sni: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pki = _RecordingSource(self.pki, self.which, self.sni)  # type: ignore[assignment]


@dataclass
class CountingUpstream:
    """The demo upstream (API id ``api``, stage ``prod``) plus the (method, raw target) of every request."""

    port: int
    requests: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Echo:
    """What the demo upstream answered for an echoed request: the target and headers it received."""

    path: str
    headers: tuple[tuple[str, str], ...]

    def all(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k.lower() == n]

    def one(self, name: str) -> str:
        values = self.all(name)
        assert len(values) == 1, f"{name}: expected exactly one, got {values}"
        return values[0]


def echo_of(body: bytes | str) -> Echo:
    data = json.loads(body)
    return Echo(data["path"], tuple((k, v) for k, v in data["headers"]))


@dataclass(frozen=True, slots=True)
class CurlResult:
    returncode: int
    stdout: bytes
    stderr: str


Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Samples:
    """One parsed scrape: family name -> type, and (sample name, labels) -> value."""

    types: Mapping[str, str]
    values: Mapping[tuple[str, Labels], float]

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0.0 when the series is absent (a counter that never moved)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.values.items() if n == name}


def parse_samples(text: str, openmetrics: bool = False) -> Samples:
    parser = _parse_openmetrics if openmetrics else _parse_prometheus
    types: dict[str, str] = {}
    values: dict[tuple[str, Labels], float] = {}
    for fam in parser(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            values[(s.name, frozenset(s.labels.items()))] = s.value
    return Samples(types, values)


@dataclass(frozen=True, slots=True)
class AdminReply:
    status: int
    content_type: str
    body: str


async def admin_request(addr: tuple[str, int], path: str, *, accept: str | None = None, prefix: bytes = b"",
                        method: str = "GET", timeout: float = 5.0) -> AdminReply:
    """One plain HTTP/1.1 request to the admin port; ``prefix`` (a PROXY v2 header) goes first, same send()."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(*addr)
        try:
            head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n"
            if accept is not None:
                head += f"Accept: {accept}\r\n"
            writer.write(prefix + head.encode() + b"\r\n")
            raw = await reader.read()
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
    resp = parse_response(raw)
    return AdminReply(resp.status, resp.header("content-type") or "", resp.body.decode())


async def scrape(addr: tuple[str, int], openmetrics: bool = False) -> Samples:
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else None
    reply = await admin_request(addr, "/metrics", accept=accept)
    assert reply.status == 200, reply
    return parse_samples(reply.body, openmetrics)


def parse_response(raw: bytes) -> Response:
    """A complete HTTP/1.1 response (Content-Length, chunked or read to EOF) from bytes."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        raise ValueError(f"no complete response head in {raw[:200]!r}")
    lines = raw[:end].split(b"\r\n")
    _, status, *reason = lines[0].split(b" ", 2)
    headers = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines[1:]]
    resp = Response(int(status), reason[0] if reason else b"", headers, b"", raw[:end + 4])  # type: ignore[arg-type]
    rest = raw[end + 4:]
    cl = resp.header("content-length")
    if cl is not None:
        resp.body = rest[:int(cl)]
    elif "chunked" in (resp.header("transfer-encoding") or ""):
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body, rest = body + rest[:size], rest[size + 2:]
        resp.body = body
    else:
        resp.body = rest
    return resp


@dataclass
class GatedUpstream:
    """Answers at once, except ``/slow`` requests: those wait until the test opens the gate."""

    got_slow: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: the proxy pools upstream connections
            head, _ = await read_request(reader)
            if b"/slow " in head.split(b"\r\n", 1)[0]:
                self.got_slow.set()
                await asyncio.wait_for(self.gate.wait(), 60)
                body = b"slow"
            else:
                body = b"fast"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()


class MemTLSClient:
    """TLS through ``ssl.MemoryBIO`` over a plain TCP stream: the test owns every byte and every send().

    ``client_hello()`` returns the first flight without sending it, so a test can put a PROXY v2 header and the
    ClientHello into ONE write (asyncio sends it with one send() on a TCP_NODELAY socket), as an NLB does.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ctx: ssl.SSLContext,
                 hostname: str) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=hostname)
        self.plain = b""

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext, hostname: str = "localhost") -> MemTLSClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, ctx, hostname)

    def client_hello(self) -> bytes:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = self.outgoing.read()
        assert hello[:1] == b"\x16", hello[:8]  # a TLS handshake record
        return hello

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.send_raw(data)

    async def handshake(self, timeout: float = 10.0) -> None:
        """Finish the handshake (the ClientHello must already be sent or be pending in the BIO)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    self.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                await self._flush()
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("peer closed during the TLS handshake")
                self.incoming.write(data)
            await self._flush()

    def peer_cert_der(self) -> bytes:
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    async def _recv(self) -> bytes:
        """Next plaintext bytes; b"" on close_notify or TCP end."""
        while True:
            try:
                data = self.tls.read(65536)
                await self._flush()  # TLS 1.3 post-handshake messages may need an answer
                return data
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return b""
            raw = await self.reader.read(65536)
            if not raw:
                return b""
            self.incoming.write(raw)

    async def request(self, data: bytes, timeout: float = 10.0) -> Response:
        self.tls.write(data)
        await self._flush()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    resp = parse_response(self.plain)
                    cl = resp.header("content-length")
                    if cl is not None and len(resp.body) == int(cl):
                        self.plain = self.plain[len(resp.raw_head) + int(cl):]
                        return resp
                except ValueError:
                    pass
                chunk = await self._recv()
                if not chunk:
                    raise ConnectionError(f"closed before a complete response: {self.plain[:200]!r}")
                self.plain += chunk

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                return await self._recv() == b""
        except (ConnectionError, ssl.SSLError):
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        await asyncio.sleep(interval)


async def refused(port: int) -> bool:
    """True when nothing listens on ``port`` any more (the connection is refused)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    except ConnectionResetError:
        return False  # queued just as a listener closed: not yet the steady state, poll again
    writer.close()
    return False


def children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return sorted(out)


@dataclass
class InProcess:
    """A ProxyServer on the test's loop plus its admin port, wired as ``server.run()`` wires them."""

    rp: RunningProxy
    admin: AdminServer

    @property
    def port(self) -> int:
        return self.rp.port

    @property
    def admin_addr(self) -> tuple[str, int]:
        assert self.admin.address is not None
        return self.admin.address

    @property
    def server(self) -> Any:
        return self.rp.server

    def access(self) -> list[dict[str, Any]]:
        return self.rp.access()


def admin_addr(proc: ProxyProcess) -> tuple[str, int]:
    a = proc.cfg.admin.listen
    return (a.host, proc.bound_admin_port or a.port)


class Ops:
    """Everything one e2e test starts; ``close()`` stops all of it (processes first, so nothing outlives it).

    The one place e2e tests get upstreams (demo, recording, scripted), configs, in-process proxies (with or
    without the admin port), real processes and clients from.
    """

    def __init__(self, pki: Pki, tmp: Path) -> None:
        self.pki = pki
        self.tmp = tmp
        self._n = 0
        self._runners: list[Any] = []
        self._scripted: list[ScriptedUpstream] = []
        self.procs: list[ProxyProcess] = []
        self._inproc: list[InProcess] = []
        self._proxies: list[RunningProxy] = []
        self._clients: list[RawClient] = []

    async def upstream(self, which: UpstreamKind = "good") -> int:
        runner, port = await start_demo_upstream(self.pki, which)
        self._runners.append(runner)
        return port

    async def recording_upstream(self) -> CountingUpstream:
        """The demo upstream that also records the (method, raw target) of every request it receives."""
        seen: list[tuple[str, str]] = []

        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            seen.append((request.method, request.raw_path))
            return await handler(request)

        app = demo_upstream.make_app(api_id="api", stage="prod")
        app.middlewares.append(record)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ctx = demo_upstream.server_context(str(self.pki.upstream_cert), str(self.pki.upstream_key))
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        self._runners.append(runner)
        return CountingUpstream(runner.addresses[0][1], seen)

    async def scripted(self, handler: Handler, which: UpstreamKind = "good") -> SniUpstream:
        up = SniUpstream(self.pki, handler, which=which)
        await up.start()
        self._scripted.append(up)
        return up

    def config(self, upstream_port: int, **sections: Any) -> Path:
        self._n += 1
        return write_config(self.tmp / f"ops-{self._n}.toml", self.pki, upstream_port, **sections)

    async def spawn(self, config: Path, env: dict[str, str] | None = None) -> ProxyProcess:
        """The real ``python -m proxy serve`` (blocking start-up runs in a thread: the upstream shares our loop)."""
        proc = await asyncio.to_thread(spawn_proxy, config, self.tmp, env)
        self.procs.append(proc)
        return proc

    async def proxy(self, upstream_port: int, **sections: Any) -> RunningProxy:
        """An in-process proxy (no admin port) for a config of ``sections`` in front of ``upstream_port``."""
        rp = await start_proxy(config_mod.load(self.config(upstream_port, **sections), {}))
        self._proxies.append(rp)
        return rp

    async def start(self, config: Path) -> InProcess:
        rp = await start_proxy(config_mod.load(config, {}))
        server = rp.server
        admin = AdminServer(rp.cfg.admin.listen, proxy_protocol=rp.cfg.server.proxy_protocol,
                            ready=lambda: server.ready, snapshots=lambda: [server.metrics.snapshot()])
        await admin.start()
        ip = InProcess(rp, admin)
        self._inproc.append(ip)
        return ip

    async def client(self, port: int, name: str | None = "good") -> RawClient:
        c = await RawClient.connect(port, client_ctx(self.pki, name))
        self._clients.append(c)
        return c

    async def close(self) -> None:
        for c in self._clients:
            await c.close()
        for proc in self.procs:
            kids = children(proc.proc.pid)  # before the parent dies: orphans are re-parented
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)  # a graceful end closes upstream connections cleanly
                try:
                    await asyncio.to_thread(proc.proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.proc.kill()
                    await asyncio.to_thread(proc.proc.wait)
            for kid in kids:
                try:
                    os.kill(kid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for rp in self._proxies:
            await stop_proxy(rp)
        for ip in self._inproc:
            await stop_proxy(ip.rp)
            await ip.admin.stop()
        for up in self._scripted:
            await up.stop()
        for runner in self._runners:
            await runner.cleanup()
