"""Real parts for end-to-end tests: a proxy in-process or as a process, upstreams, raw TLS clients.

Owns: writing proxy configs that point at the test PKI, starting ``ProxyServer`` on ephemeral ports, the demo
upstream and a scripted raw-TLS upstream (for faults: resets, slow heads, garbage), a raw HTTP/1.1-over-TLS
client that sends exact bytes and reads exact responses, and a helper that runs ``mtls-proxy`` as a real process
and waits for ``/readyz`` (polling, never sleeping a fixed time).

Must not: mock sockets, TLS or clocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy import config as config_mod
from proxy.dev import demo_upstream
from proxy.server import ProxyServer
from tests.pki import ClientCert, Pki

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(v)


def write_config(path: Path, pki: Pki, upstream_port: int, *, server: dict[str, Any] | None = None,
                 upstream: dict[str, Any] | None = None, admin: dict[str, Any] | None = None,
                 rules: list[dict[str, Any]] | None = None, top: dict[str, Any] | None = None,
                 log: dict[str, Any] | None = None, identity: dict[str, Any] | None = None) -> Path:
    """A TOML config for the test PKI; sections are merged over sensible test defaults."""
    # Port 0: the kernel picks free ports at bind time (no race with other processes between choosing and
    # binding); the in-process proxy reports them in server.address, a spawned one in its "listening" log lines.
    srv = {"listen": "127.0.0.1:0", "cert": str(pki.server_cert), "key": str(pki.server_key),
           "client_ca": str(pki.client_ca), "crl": str(pki.crl_bundle), "reload_interval": 0}
    srv.update(server or {})
    up = {"url": "https://api.test/prod", "connect_to": f"127.0.0.1:{upstream_port}", "api_id": "api",
          "ca_bundle": str(pki.upstream_ca), "connect_timeout": 3.0, "read_timeout": 5.0}
    up.update(upstream or {})
    adm = {"listen": "127.0.0.1:0"}
    adm.update(admin or {})
    if rules is None:
        rules = [{"name": "partner-a", "subject_cn": ["client-a"]}]
    lines = [f"{k} = {toml_value(v)}" for k, v in (top or {}).items()]
    for name, section in (("server", srv), ("upstream", up), ("admin", adm), ("log", log or {}),
                          ("identity", identity or {})):
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in section.items() if v is not None]
    for rule in rules:
        lines.append("[[allow]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class AccessLogPipe:
    """Collects the proxy's access log (it writes JSON lines to a file descriptor)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.buf = b""

    def lines(self) -> list[dict[str, Any]]:
        while True:
            try:
                chunk = os.read(self.r, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buf += chunk
        return [json.loads(line) for line in self.buf.decode().splitlines() if line]

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@dataclass
class RunningProxy:
    server: ProxyServer
    cfg: config_mod.Config
    log: AccessLogPipe

    @property
    def port(self) -> int:
        assert self.server.address is not None
        return self.server.address[1]

    def access(self) -> list[dict[str, Any]]:
        self.server.state.access_log.flush()
        return self.log.lines()


async def start_proxy(cfg: config_mod.Config) -> RunningProxy:
    pipe = AccessLogPipe()
    server = ProxyServer(cfg, access_fd=pipe.w)
    await server.start()
    return RunningProxy(server, cfg, pipe)


async def stop_proxy(rp: RunningProxy, timeout: float = 2.0) -> None:
    if not rp.server.state.draining:
        await rp.server.drain(timeout)
    rp.log.close()


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes

    def header(self, name: str) -> str | None:
        n = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == n:
                return v.decode("latin-1")
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """HTTP/1.1 over a real TLS connection with exact bytes: for framing, smuggling and pipelining tests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost",
                                                       limit=1 << 24)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, head_request: bool = False, timeout: float = 10.0) -> Response:
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readuntil(b"\r\n\r\n")
                lines = raw[:-4].split(b"\r\n")
                _, status_b, *reason = lines[0].split(b" ", 2)
                status = int(status_b)
                headers = [tuple(x.strip() for x in ln.split(b":", 1)) for ln in lines[1:]]
                if status >= 200 or status == 101:
                    break
            resp = Response(status, reason[0] if reason else b"", headers, b"", raw)  # type: ignore[arg-type]
            if head_request or status in (204, 304):
                return resp
            te = resp.header("transfer-encoding")
            cl = resp.header("content-length")
            if te is not None and "chunked" in te.lower():
                body = b""
                while True:
                    size_line = await self.reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        await self.reader.readuntil(b"\r\n")
                        break
                    body += await self.reader.readexactly(size)
                    await self.reader.readexactly(2)
                resp.body = body
            elif cl is not None:
                resp.body = await self.reader.readexactly(int(cl))
            else:
                resp.body = await self.reader.read()
            return resp

    async def request(self, data: bytes, **kw: Any) -> Response:
        await self.send(data)
        return await self.read_response(**kw)

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the proxy closed the connection (EOF or reset) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(1)
                return data == b""
        except (ConnectionError, ssl.SSLError):
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


def get(path: str = "/", host: str = "example.test", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + extra + b"\r\n"


async def start_demo_upstream(pki: Pki, which: str = "good") -> tuple[Any, int]:
    cert, key = {"good": (pki.upstream_cert, pki.upstream_key),
                 "wrong_name": (pki.upstream_wrong_name_cert, pki.upstream_wrong_name_key),
                 "untrusted": (pki.upstream_untrusted_cert, pki.upstream_untrusted_key)}[which]
    runner = await demo_upstream.start("127.0.0.1", 0, str(cert), str(key), api_id="api", stage="prod")
    return runner, runner.addresses[0][1]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class ScriptedUpstream:
    """A raw TLS server whose behaviour per connection is a test-supplied coroutine."""

    pki: Pki
    handler: Handler
    server: asyncio.AbstractServer | None = None
    port: int = 0
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> ScriptedUpstream:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            self._writers.add(writer)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
                pass
            finally:
                self._writers.discard(writer)
                writer.transport.abort()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0, ssl=self.pki.upstream_server_context())
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self.server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Read one request (head, body) the way an origin server would, for scripted upstreams."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    body = b""
    if b"\r\ncontent-length:" in lower:
        n = int(lower.split(b"\r\ncontent-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(n)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return head, body


# -- the real process -----------------------------------------------------------------------------------------
@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    cfg: config_mod.Config
    stdout_path: Path
    stderr_path: Path
    bound_port: int = 0  # what the process reported in its "listening" / "admin listening" log lines
    bound_admin_port: int = 0

    @property
    def port(self) -> int:
        return self.bound_port or self.cfg.server.listen.port

    @property
    def admin(self) -> str:
        a = self.cfg.admin.listen
        return f"http://{a.host}:{self.bound_admin_port or a.port}"

    def discover(self) -> bool:
        """Read the bound ports from the event log; True once both are known."""
        try:
            text = self.stderr_path.read_text()
        except OSError:
            return False
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("msg") == "listening":
                self.bound_port = int(event["address"].rsplit(":", 1)[1])
            elif event.get("msg") == "admin listening":
                self.bound_admin_port = int(event["address"].rsplit(":", 1)[1])
        return bool((self.bound_port or self.cfg.server.listen.port)
                    and (self.bound_admin_port or self.cfg.admin.listen.port))

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stop(self) -> None:
        terminate(self.proc)


def terminate(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM (the proxy's drain) and wait; SIGKILL only if it outlives ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn_proxy(config_path: Path, tmp: Path, env: dict[str, str] | None = None,
                ready_timeout: float = 15.0, args: tuple[str, ...] = ()) -> ProxyProcess:
    """Run ``python -m proxy serve --config`` (plus ``args``, e.g. ``--loop asyncio``) and wait until ``/readyz``
    answers 200."""
    cfg = config_mod.load(config_path, {**os.environ, **(env or {})})
    out, err = tmp / f"proxy-{time.monotonic_ns()}.out", tmp / f"proxy-{time.monotonic_ns()}.err"
    with out.open("wb") as out_fh, err.open("wb") as err_fh:  # the child has its own copies of the fds
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config_path), *args],
                                stdout=out_fh, stderr=err_fh, cwd=ROOT, env={**os.environ, **(env or {})})
    pp = ProxyProcess(proc, cfg, out, err)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"proxy exited {proc.returncode}: {err.read_text()}")
        try:
            if pp.discover() and pp.admin_get("/readyz")[0] == 200:
                pp.discover()
                return pp
        except OSError:
            pass
        time.sleep(0.05)
    pp.stop()
    raise RuntimeError(f"proxy not ready: {err.read_text()}")


def client_ctx(pki: Pki, name: str | None = "good", **kw: Any) -> ssl.SSLContext:
    client: ClientCert | None = pki.clients[name] if name else None
    return pki.client_context(client, **kw)
