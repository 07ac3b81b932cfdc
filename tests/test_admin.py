"""admin: /healthz, /readyz, /metrics (text or OpenMetrics by Accept), 404/405, HEAD, keep-alive, the optional
leading PROXY v2 header, malformed input, the idle timeout, and prometheus_client loaded only at the first scrape.

An ``AdminServer`` on an ephemeral port of the test's loop, spoken to with raw HTTP/1.1 bytes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from proxy import admin as admin_mod
from proxy.wire import proxy_protocol as pp
from proxy.admin import AdminServer
from proxy.config import Address
from proxy.cert_tracker import CertTable
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
CLOSE = b"Connection: close\r\n"


class State:
    def __init__(self) -> None:
        self.ready = True
        self.metrics = Metrics()
        self.certs = CertTable()


@pytest.fixture
def state() -> State:
    return State()


StartAdmin = Callable[..., Awaitable[AdminServer]]


@pytest.fixture
async def start_admin(state: State) -> AsyncIterator[StartAdmin]:
    started: list[AdminServer] = []

    async def start(proxy_protocol: bool = False) -> AdminServer:
        server = AdminServer(Address("127.0.0.1", 0), ready=lambda: state.ready,
                             snapshots=lambda: [state.metrics.snapshot()], certs=state.certs.report,
                             proxy_protocol=proxy_protocol)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class Conn:
    """One raw connection to the admin port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: AdminServer) -> Conn:
        assert server.address is not None
        return cls(*await asyncio.open_connection(*server.address))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, head_only: bool = False) -> Reply:
        async with asyncio.timeout(10):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw[:-4].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            assert lines[0].startswith("HTTP/1.1 ")
            headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
            n = 0 if head_only else int(headers["content-length"])
            return Reply(status, headers, await self.reader.readexactly(n))

    async def closed(self) -> bool:
        async with asyncio.timeout(10):
            try:
                return await self.reader.read(1) == b""
            except ConnectionResetError:
                return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def request(server: AdminServer, path: str, *, method: str = "GET", extra: bytes = b"",
                  prefix: bytes = b"") -> Reply:
    c = await Conn.open(server)
    try:
        await c.send(prefix + f"{method} {path} HTTP/1.1\r\nHost: admin\r\n".encode() + extra + CLOSE + b"\r\n")
        reply = await c.reply(head_only=method == "HEAD")
        assert reply.headers.get("connection") == "close"
        assert await c.closed()
        return reply
    finally:
        await c.close()


# ---- endpoints ------------------------------------------------------------------------------------------------


async def test_healthz(start_admin: StartAdmin, state: State) -> None:
    server = await start_admin()
    state.ready = False  # liveness does not depend on readiness
    r = await request(server, "/healthz")
    assert (r.status, r.body) == (200, b"ok\n")
    assert r.headers["content-type"] == "text/plain; charset=utf-8" and r.headers["cache-control"] == "no-store"


async def test_readyz_follows_the_ready_callback_at_every_request(start_admin: StartAdmin, state: State) -> None:
    server = await start_admin()
    for ready, expected in ((True, (200, b"ready\n")), (False, (503, b"not ready\n")), (True, (200, b"ready\n"))):
        state.ready = ready
        r = await request(server, "/readyz")
        assert (r.status, r.body) == expected


def samples(families: object) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value for fam in families for s in fam.samples}  # type: ignore


@pytest.mark.parametrize("accept, content_type, parser", [
    (None, "text/plain;", parse_text),
    ("text/plain", "text/plain;", parse_text),
    ("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
     "application/openmetrics-text;", parse_openmetrics),
    ("application/openmetrics-text", "application/openmetrics-text;", parse_openmetrics),
], ids=["no-accept", "text", "prometheus-scraper", "openmetrics"])
async def test_metrics_in_the_format_the_scraper_accepts(start_admin: StartAdmin, state: State, accept: str | None,
                                                         content_type: str, parser: Callable[[str], object]) -> None:
    server = await start_admin()
    state.metrics.request("GET", 200, "partner-a", 0.01, 0.005)
    state.metrics.connections_total = 3
    r = await request(server, "/metrics", extra=b"" if accept is None else f"Accept: {accept}\r\n".encode())
    assert r.status == 200 and r.headers["content-type"].startswith(content_type)
    text = r.body.decode()
    if parser is parse_openmetrics:
        assert text.endswith("# EOF\n")
    values = samples(parser(text))
    key = frozenset({("method", "GET"), ("status", "200"), ("rule", "partner-a")})
    assert values[("mtls_proxy_requests_total", key)] == 1
    assert values[("mtls_proxy_connections_total", frozenset())] == 3


async def test_metrics_are_read_at_every_scrape(start_admin: StartAdmin, state: State) -> None:
    server = await start_admin()
    key = ("mtls_proxy_connections_active", frozenset())
    for n in (0, 5, 2):
        state.metrics.connections_active = n
        assert samples(parse_text((await request(server, "/metrics")).body.decode()))[key] == n


async def test_certs_is_json_read_at_every_request(start_admin: StartAdmin, state: State) -> None:
    server = await start_admin()
    empty = await request(server, "/certs")
    assert empty.status == 200 and empty.headers["content-type"] == "application/json"
    assert json.loads(empty.body) == {"cap": state.certs.cap, "dropped": 0, "rules": {}}
    state.certs.seen("partner-a", "ab" * 32, "CN=client-a", "1F", 1_900_000_000.0, 1_800_000_000.0)
    reply = json.loads((await request(server, "/certs")).body)
    assert reply["rules"]["partner-a"][0]["fingerprint"] == "ab" * 32
    assert reply["rules"]["partner-a"][0]["not_after"] == "2030-03-17T17:46:40Z"


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/", "/metrics/x", "/READYZ", "/nope?x=1"])
async def test_unknown_path_is_404(start_admin: StartAdmin, path: str) -> None:
    r = await request(await start_admin(), path)
    assert (r.status, r.body) == (404, b"not found\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/nope"])
async def test_other_methods_are_405(start_admin: StartAdmin, method: str, path: str) -> None:
    r = await request(await start_admin(), path, method=method, extra=b"Content-Length: 0\r\n")
    assert (r.status, r.body) == (405, b"method not allowed\n")


@pytest.mark.parametrize("path, status", [("/healthz", 200), ("/readyz", 200), ("/metrics", 200), ("/x", 404)])
async def test_head_has_the_get_headers_and_no_body(start_admin: StartAdmin, path: str, status: int) -> None:
    server = await start_admin()
    c = await Conn.open(server)
    try:
        # HEAD then GET on one connection: if HEAD sent a body, it would be read as the GET's status line.
        await c.send(f"HEAD {path} HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        head = await c.reply(head_only=True)
        assert head.status == status and int(head.headers["content-length"]) > 0
        after = await c.reply()
        assert (after.status, after.body) == (200, b"ok\n")
    finally:
        await c.close()


async def test_keep_alive_serves_several_requests_on_one_connection(start_admin: StartAdmin, state: State) -> None:
    server = await start_admin()
    c = await Conn.open(server)
    try:
        await c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        first = await c.reply()
        assert (first.status, first.body) == (200, b"ok\n") and "connection" not in first.headers
        state.ready = False
        await c.send(b"GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.reply()).status == 503
        # pipelined, in one segment, answered in order
        await c.send(b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
        assert [(await c.reply()).status for _ in range(3)] == [404, 200, 200]
        assert len(server.connections) == 1
    finally:
        await c.close()


@pytest.mark.parametrize("req", [
    b"GET /healthz HTTP/1.0\r\nHost: a\r\n\r\n",  # HTTP/1.0 without keep-alive
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",  # a body we never read: close
])
async def test_connection_closes_when_the_request_asks_or_has_a_body(start_admin: StartAdmin, req: bytes) -> None:
    c = await Conn.open(await start_admin())
    try:
        await c.send(req)
        r = await c.reply()
        assert r.headers["connection"] == "close"
        assert await c.closed()
    finally:
        await c.close()


# ---- PROXY protocol v2 (NLB health checks) ----------------------------------------------------------------------

HEADERS = {
    "local": pp.build(local=True),
    "inet": pp.build(("10.0.0.9", 3333), ("10.0.0.10", 9100)),
    "inet6-vpce": pp.build(("2001:db8::1", 3333), ("2001:db8::2", 9100), vpce_id="vpce-0123456789abcdef0"),
}


@pytest.mark.parametrize("name", sorted(HEADERS))
async def test_leading_proxy_header_is_stripped_when_enabled(start_admin: StartAdmin, name: str) -> None:
    server = await start_admin(proxy_protocol=True)
    r = await request(server, "/readyz", prefix=HEADERS[name])
    assert (r.status, r.body) == (200, b"ready\n")


async def test_proxy_header_is_optional_when_enabled(start_admin: StartAdmin) -> None:
    r = await request(await start_admin(proxy_protocol=True), "/healthz")
    assert r.status == 200


async def test_proxy_header_split_across_sends(start_admin: StartAdmin) -> None:
    server = await start_admin(proxy_protocol=True)
    header = HEADERS["inet6-vpce"]
    c = await Conn.open(server)
    try:
        for piece in (header[:3], header[3:pp.PREFIX_LEN + 1], header[pp.PREFIX_LEN + 1:-1],
                      header[-1:] + b"GET /healthz"):
            await c.send(piece)
            await asyncio.sleep(0.02)  # separate segments
        await c.send(b" HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.reply()).status == 200
    finally:
        await c.close()


async def test_proxy_header_is_a_bad_request_when_not_enabled(start_admin: StartAdmin) -> None:
    c = await Conn.open(await start_admin(proxy_protocol=False))
    try:
        await c.send(HEADERS["inet"] + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        r = await c.reply()
        assert (r.status, r.headers["connection"]) == (400, "close")
        assert await c.closed()
    finally:
        await c.close()


async def test_only_a_leading_proxy_header_is_tolerated(start_admin: StartAdmin) -> None:
    c = await Conn.open(await start_admin(proxy_protocol=True))
    try:
        await c.send(HEADERS["local"] + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.reply()).status == 200
        await c.send(HEADERS["local"] + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.reply()).status == 400
        assert await c.closed()
    finally:
        await c.close()


async def test_malformed_proxy_header_closes_without_an_answer(start_admin: StartAdmin) -> None:
    bad = bytearray(HEADERS["inet"])
    bad[12] = 0x31  # version 3
    c = await Conn.open(await start_admin(proxy_protocol=True))
    try:
        await c.send(bytes(bad) + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert await c.closed()
    finally:
        await c.close()


# ---- malformed requests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, status", [
    (b"GET /healthz HTTP/1.1\r\nHost a\r\n\r\n", 400),  # no colon
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /healthz HTTP/1.1\nHost: a\n\n", 400),  # bare LF
    (b"GET healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),  # over the 8 KiB admin head limit
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n", 414),  # request line that can never end in time
], ids=["no-colon", "garbage", "no-host", "bare-lf", "not-origin-form", "http2", "head-too-large",
        "uri-too-long"])
async def test_malformed_request_is_answered_and_closed(start_admin: StartAdmin, data: bytes, status: int) -> None:
    server = await start_admin()
    c = await Conn.open(server)
    try:
        await c.send(data)
        r = await c.reply()
        assert (r.status, r.body, r.headers["connection"]) == (status, b"bad request\n", "close")
        assert await c.closed()
    finally:
        await c.close()
    assert (await request(server, "/healthz")).status == 200  # the server is fine


async def test_idle_connection_is_closed(start_admin: StartAdmin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_mod, "IDLE_TIMEOUT", 0.1)
    server = await start_admin()
    c = await Conn.open(server)
    try:
        await c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.reply()).status == 200
        assert await c.closed()  # after the idle timeout, without another request
    finally:
        await c.close()
    async with asyncio.timeout(10):
        while server.connections:
            await asyncio.sleep(0.01)


async def test_stop_closes_open_connections(state: State) -> None:
    server = AdminServer(Address("127.0.0.1", 0), ready=lambda: True, snapshots=lambda: [state.metrics.snapshot()])
    await server.start()
    c = await Conn.open(server)
    try:
        await c.send(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await c.reply()).status == 200
        await asyncio.wait_for(server.stop(), 10)
        assert await c.closed()
    finally:
        await c.close()


# ---- prometheus_client is loaded at the first scrape --------------------------------------------------------

LAZY_IMPORT = r"""
import asyncio, json, sys
from proxy import admin, metrics, server, supervisor
from proxy.config import Address

async def get(addr, path):
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data.split(b" ", 2)[1].decode()

async def main():
    m = metrics.Metrics()
    srv = admin.AdminServer(Address("127.0.0.1", 0), ready=lambda: True, snapshots=lambda: [m.snapshot()])
    await srv.start()
    out = {"after_import": "prometheus_client" in sys.modules}
    out["healthz"] = await get(srv.address, "/healthz")
    out["readyz"] = await get(srv.address, "/readyz")
    out["after_health"] = "prometheus_client" in sys.modules
    out["metrics"] = await get(srv.address, "/metrics")
    out["after_metrics"] = "prometheus_client" in sys.modules
    await srv.stop()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_prometheus_client_is_not_imported_before_the_first_scrape() -> None:
    proc = subprocess.run([sys.executable, "-c", LAZY_IMPORT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"after_import": False, "healthz": "200", "readyz": "200",
                                       "after_health": False, "metrics": "200", "after_metrics": True}
