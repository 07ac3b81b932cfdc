"""Forwarding to the upstream, end to end: what the API receives, and hop-by-hop headers never passed on.

Owns: what the upstream receives and what the client gets back through a real in-process proxy: Host and SNI
from ``upstream.url`` while dialling ``connect_to``, upstream certificate verification, ``x-apigw-api-id``, the
URL path prefix, byte-exact targets, hop-by-hop headers both ways, streamed bodies with backpressure, keep-alive
and pipelining, HTTP/1.0 clients, ``Expect: 100-continue`` and the one retry on a stale pooled connection.

Upstreams are the demo API (``proxy.dev.demo_upstream``) or a ``ScriptedUpstream`` whose raw bytes a test controls;
clients are ``RawClient`` (exact bytes), aiohttp and curl.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.dev.demo_upstream import PATTERN, pattern_bytes
from tests.e2e.kit import SniUpstream
from tests.harness import Handler, RawClient, RunningProxy, client_ctx, get, read_request
from tests.pki import Pki

BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])

Recorded = list[tuple[bytes, bytes]]
StartProxy = Callable[..., Awaitable[RunningProxy]]
StartScripted = Callable[..., Awaitable[SniUpstream]]
Connect = Callable[..., Awaitable[RawClient]]


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def recorder(log: Recorded, response: Callable[[bytes], bytes] | None = None) -> Handler:
    """An origin server: records every complete request (head, body) and answers each, keep-alive."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            log.append((head, body))
            writer.write(response(head) if response else ok(head.split(b"\r\n", 1)[0]))
            await writer.drain()

    return handler


def request_line(head: bytes) -> bytes:
    return head.split(b"\r\n", 1)[0]


def fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(lowercase name, value) for every header line of a raw head."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            out.append((name.lower(), value.strip()))
    return out


def values(head: bytes, name: bytes) -> list[bytes]:
    return [v for n, v in fields(head) if n == name]


def echoed(resp: Any) -> dict[str, Any]:
    """The demo upstream's echo, with header names lowercased."""
    data = resp.json()
    data["headers"] = [(k.lower(), v) for k, v in data["headers"]]
    return data


# ---- Host, SNI and the upstream certificate -------------------------------------------------------------


@pytest.mark.parametrize(("url", "host"), [
    ("https://api.test/prod", b"api.test"),
    ("https://api.test:8443/prod", b"api.test:8443"),  # a non-default port is part of Host, never of SNI
])
async def test_host_and_sni_come_from_url_while_dialling_connect_to(
        url: str, host: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port, upstream={"url": url, "connect_to": f"127.0.0.1:{up.port}"})
    c = await fwd_client(rp)
    resp = await c.request(get("/x", host="client-chose-this.example"))
    assert resp.status == 200
    assert up.sni == ["api.test"]
    (head, _), = log
    assert values(head, b"host") == [host]


@pytest.mark.parametrize("which", ["wrong_name", "untrusted"])
async def test_upstream_certificate_is_verified_for_the_url_host(
        which: str, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log), which=which)
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    resp = await c.request(get("/x"))
    assert resp.status == 502
    assert resp.json()["error"] == "upstream_tls_error"
    assert up.sni == ["api.test"]  # the handshake was attempted with the URL's name ...
    assert up.connections == 0 and log == []  # ... and failed before a single HTTP byte was sent


async def test_system_trust_store_does_not_trust_a_private_ca(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port, upstream={"ca_bundle": None})  # no ca_bundle: the system store
    c = await fwd_client(rp)
    resp = await c.request(get("/x"))
    assert resp.status == 502 and resp.json()["error"] == "upstream_tls_error"
    assert log == []


@pytest.mark.parametrize("which", ["wrong_name", "untrusted"])
async def test_verify_false_connects_anyway(
        which: str, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log), which=which)
    rp = await fwd_proxy(up.port, upstream={"verify": False})
    c = await fwd_client(rp)
    resp = await c.request(get("/x"))
    assert resp.status == 200
    assert [request_line(h) for h, _ in log] == [b"GET /prod/x HTTP/1.1"]
    assert up.sni == ["api.test"]  # SNI is still sent: verification is off, naming the API is not


# ---- x-apigw-api-id and the path prefix --------------------------------------------------------------------


@pytest.mark.parametrize(("api_id", "expected"), [("api", ["api"]), (None, [])])
async def test_api_id_header_only_when_configured(
        api_id: str | None, expected: list[str], fwd_demo: int, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    rp = await fwd_proxy(fwd_demo, upstream={"api_id": api_id})
    c = await fwd_client(rp)
    # a client-sent value must never survive (it could route to another private API behind the endpoint)
    resp = await c.request(get("/echo", extra=b"x-apigw-api-id: someone-else\r\n"))
    assert resp.status == 200  # the demo API accepts Host "api.test" (first label = API id) either way
    sent = [v for k, v in echoed(resp)["headers"] if k == "x-apigw-api-id"]
    assert sent == expected


@pytest.mark.parametrize(("url", "target", "forwarded"), [
    ("https://api.test/prod", b"/orders/1?x=1", b"/prod/orders/1?x=1"),
    ("https://api.test/prod", b"/", b"/prod/"),
    ("https://api.test/prod/v1/", b"/orders", b"/prod/v1/orders"),
    ("https://api.test", b"/orders", b"/orders"),
    ("https://api.test/", b"/orders?q", b"/orders?q"),
])
async def test_url_path_is_a_prefix(url: str, target: bytes, forwarded: bytes, fwd_scripted: StartScripted,
                                    fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port, upstream={"url": url})
    c = await fwd_client(rp)
    assert (await c.request(get(target.decode()))).status == 200
    assert [request_line(h) for h, _ in log] == [b"GET " + forwarded + b" HTTP/1.1"]


async def test_prefix_with_demo_stage(fwd_demo: int, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    rp = await fwd_proxy(fwd_demo)
    c = await fwd_client(rp)
    resp = await c.request(get("/a/b?c=d"))
    assert resp.status == 200 and echoed(resp)["path"] == "/prod/a/b?c=d"


# ---- byte-exact targets ------------------------------------------------------------------------------------

EXACT_TARGETS = [
    b"/a//b///c/",
    b"//leading-double",
    b"/a%2Fb/%2f",  # an encoded slash is data, not a separator, and keeps its case
    b"/%41%42c%7e%7E",  # encoded unreserved characters are not decoded on the way
    b"/caf%C3%A9/%e6%bc%a2",
    b"/a%20b%25c%00",
    b"/!$&'()*+,;=:@-._~",
    b"/x.json;v=1",
    b"/.well-known/thing",
    b"/a/.../b",
    b"/Case/MiXeD",
    b"/p?",
    b"/p?q=%2F&r=a+b&s=%41&&t=",
    b"/p?/?:@!$'()*+,;=",
    b"/p?a=b?c=d&e=/../f",  # dot segments in the query are query data
]


@pytest.mark.parametrize("target", EXACT_TARGETS, ids=[t.decode() for t in EXACT_TARGETS])
async def test_path_and_query_forwarded_byte_exact(target: bytes, fwd_scripted: StartScripted,
                                                    fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    resp = await c.request(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert [request_line(h) for h, _ in log] == [b"GET /prod" + target + b" HTTP/1.1"]


async def test_dot_segments_are_the_one_rewrite(fwd_scripted: StartScripted, fwd_proxy: StartProxy,
                                                fwd_client: Connect) -> None:
    # The policy matches the path without dot segments; the upstream must get exactly that path, or a rule
    # could be bypassed.
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    assert (await c.request(get("/a/./b/../c?x=/../y"))).status == 200
    assert (await c.request(get("/a/%2e%2E/d"))).status == 200
    assert [request_line(h) for h, _ in log] == [b"GET /prod/a/c?x=/../y HTTP/1.1", b"GET /prod/d HTTP/1.1"]


# ---- hop-by-hop headers ------------------------------------------------------------------------------------

HOP_REQUEST = (b"Connection: keep-alive, X-Hop-A, x-hop-b\r\n"
               b"X-Hop-A: 1\r\nX-Hop-B: 2\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
               b"TE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: websocket\r\n"
               b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Authenticate: Basic\r\n"
               b"X-End-To-End: kept\r\n")
HOP_NAMES = {b"connection", b"x-hop-a", b"x-hop-b", b"keep-alive", b"proxy-connection", b"te", b"trailer",
             b"upgrade", b"proxy-authorization", b"proxy-authenticate"}


@pytest.mark.parametrize("body", [b"", b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
                         ids=["get", "chunked-post"])
async def test_hop_by_hop_request_headers_are_not_forwarded(
        body: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    if body:
        raw = b"POST /h HTTP/1.1\r\nHost: x\r\n" + HOP_REQUEST + body
    else:
        raw = get("/h", extra=HOP_REQUEST)
    assert (await c.request(raw)).status == 200
    (head, received), = log
    names = {n for n, _ in fields(head)}
    assert not names & HOP_NAMES
    assert values(head, b"x-end-to-end") == [b"kept"]
    # the proxy frames the body itself: exactly one Transfer-Encoding, its own
    assert values(head, b"transfer-encoding") == ([b"chunked"] if body else [])
    assert received == (b"abc" if body else b"")


async def test_hop_by_hop_response_headers_are_not_forwarded(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    response = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Resp-Hop\r\nX-Resp-Hop: secret\r\n"
                b"Keep-Alive: timeout=5, max=100\r\nProxy-Connection: keep-alive\r\n"
                b"Proxy-Authenticate: Basic realm=\"x\"\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\nTE: trailers\r\n"
                b"X-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok")
    up = await fwd_scripted(recorder([], lambda _: response))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    resp = await c.request(get("/h"))
    assert resp.status == 200 and resp.body == b"ok"
    names = {k.lower() for k, _ in resp.headers}
    assert not names & (HOP_NAMES - {b"connection"})
    assert b"x-resp-hop" not in names
    assert resp.header("connection") in (None, "keep-alive", "close")  # only the proxy's own, if any
    assert resp.header("x-end-to-end") == "kept"
    assert b"secret" not in resp.raw_head


# ---- bodies ------------------------------------------------------------------------------------------------


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so memory that earlier tests freed but the allocator kept
    resident cannot absorb -- and hide -- growth during the measurement."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@BOTH_LOOPS
async def test_20mb_download_intact_with_backpressure(pki: Pki, fwd_demo: int, fwd_proxy: StartProxy) -> None:
    size = 20 * 1024 * 1024
    expected = hashlib.sha256(pattern_bytes(size)).hexdigest()
    rp = await fwd_proxy(fwd_demo)
    # A small StreamReader limit: the client itself buffers at most ~128 KiB, so RSS growth would be the proxy's.
    reader, writer = await asyncio.open_connection("127.0.0.1", rp.port, ssl=client_ctx(pki),
                                                   server_hostname="localhost", limit=64 * 1024)
    try:
        writer.write(get(f"/bytes/{size}"))
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\ncontent-length: %d\r\n" % size in head.lower()
        trim_heap()
        base = rss_bytes()
        peak = base
        digest = hashlib.sha256()
        got = 0
        # Read slowly for a while: without backpressure the proxy would pull the whole body from the (fast,
        # local) upstream into memory meanwhile.
        for _ in range(100):
            piece = await reader.read(16 * 1024)
            assert piece
            digest.update(piece)
            got += len(piece)
            await asyncio.sleep(0.02)
            peak = max(peak, rss_bytes())
        while got < size:
            piece = await reader.read(1 << 20)
            assert piece, f"EOF after {got} bytes"
            digest.update(piece)
            got += len(piece)
        peak = max(peak, rss_bytes())
    finally:
        writer.close()
        await writer.wait_closed()
    assert got == size
    assert digest.hexdigest() == expected
    assert peak - base < 12 * 1024 * 1024, f"RSS grew by {(peak - base) / 2**20:.1f} MiB"


def upload_bytes(n: int) -> bytes:
    return hashlib.sha256(b"seed").digest() * (n // 32) + PATTERN[: n % 32]


@BOTH_LOOPS
async def test_9mb_chunked_upload_intact(pki: Pki, fwd_demo: int, fwd_proxy: StartProxy) -> None:
    data = upload_bytes(9 * 1024 * 1024 + 7)
    rp = await fwd_proxy(fwd_demo)

    async def pieces() -> Any:
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]

    async with aiohttp.ClientSession() as session:
        async with session.post(f"https://localhost:{rp.port}/upload", data=pieces(),
                                ssl=client_ctx(pki)) as r:
            assert r.status == 200
            assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
            result = await r.json()
    assert result == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


async def test_9mb_content_length_upload_with_curl(pki: Pki, tmp_path: Path, fwd_demo: int,
                                                   fwd_proxy: StartProxy) -> None:
    data = upload_bytes(9 * 1024 * 1024 + 3)
    body = tmp_path / "upload.bin"
    body.write_bytes(data)
    rp = await fwd_proxy(fwd_demo)
    good = pki.clients["good"]
    # curl sends Content-Length and (for a body over 1 MiB) Expect: 100-continue
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", "--resolve", f"localhost:{rp.port}:127.0.0.1",
        "--cert", str(good.cert), "--key", str(good.key), "--cacert", str(pki.server_ca),
        "--data-binary", f"@{body}", "-H", "Content-Type: application/octet-stream", "-w", "\n%{http_code}",
        f"https://localhost:{rp.port}/upload",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    payload, _, status = out.decode().rpartition("\n")
    assert status == "200"
    assert json.loads(payload) == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_request_body_is_streamed_not_buffered(framing: str, fwd_scripted: StartScripted,
                                                     fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    first, second = b"A" * 50_000, b"B" * 50_000
    seen_first = asyncio.Event()
    done: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        raw = b""
        while b"A" * 1000 not in raw:
            raw += await reader.read(65536)
        seen_first.set()
        while not (raw.endswith(b"0\r\n\r\n") if framing == "chunked"
                   else raw.count(b"A") + raw.count(b"B") == 100_000):
            chunk = await reader.read(65536)
            assert chunk
            raw += chunk
        done.append(raw)
        writer.write(ok())
        await writer.drain()
        await reader.read()

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    if framing == "chunked":
        head = b"POST /s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        part1, part2 = b"%x\r\n%s\r\n" % (len(first), first), b"%x\r\n%s\r\n0\r\n\r\n" % (len(second), second)
    else:
        head = b"POST /s HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        part1, part2 = first, second
    await c.send(head + part1)
    # the upstream gets the first half while the client still holds the second
    await asyncio.wait_for(seen_first.wait(), 10)
    assert not done
    await c.send(part2)
    resp = await c.read_response()
    assert resp.status == 200
    assert done[0].count(b"A") == 50_000 and done[0].count(b"B") == 50_000


@BOTH_LOOPS
async def test_upload_to_a_stalled_upstream_stops_reading_the_client(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    """Backpressure towards the client: while the upstream reads nothing, the proxy stops reading the upload (it
    does not buffer it), and once the upstream reads again the whole body arrives intact."""
    size, piece = 64 * 1024 * 1024, bytes(range(256)) * 256  # 64 MiB in 64 KiB pieces
    go = asyncio.Event()
    result: list[tuple[int, str]] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await go.wait()  # read nothing: this side's buffers fill, then the proxy's
        digest, n = hashlib.sha256(), 0
        while n < size:
            chunk = await reader.read(1 << 20)
            assert chunk
            digest.update(chunk)
            n += len(chunk)
        result.append((n, digest.hexdigest()))
        writer.write(ok())
        await writer.drain()
        await reader.read()

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port, server={"max_body_bytes": 2 * size})
    c = await fwd_client(rp)
    sent = 0

    async def upload() -> None:
        nonlocal sent
        await c.send(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        while sent < size:
            await c.send(piece)  # waits (drain) once nobody reads
            sent += len(piece)

    task = asyncio.create_task(upload())
    await asyncio.sleep(2.0)  # the behaviour under test: how much the proxy took while the upstream read nothing
    stalled_at = sent
    assert stalled_at < size // 2, f"{stalled_at} bytes accepted while the upstream read nothing"
    go.set()
    await asyncio.wait_for(task, 60)
    resp = await c.read_response(timeout=60)
    assert resp.status == 200
    expected = hashlib.sha256(piece * (size // len(piece))).hexdigest()
    assert result == [(size, expected)]


# ---- keep-alive and pipelining ----------------------------------------------------------------------------


@BOTH_LOOPS
async def test_keep_alive_reuses_one_upstream_connection(fwd_scripted: StartScripted, fwd_proxy: StartProxy,
                                                         fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    for i in range(3):
        assert (await c.request(get(f"/get{i}"))).status == 200
        resp = await c.request(b"POST /post%d HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello" % i)
        assert resp.status == 200 and resp.body == b"POST /prod/post%d HTTP/1.1" % i
    assert len(log) == 6
    assert up.connections == 1


async def test_pipelined_requests_answered_in_order(fwd_scripted: StartScripted, fwd_proxy: StartProxy,
                                                    fwd_client: Connect) -> None:
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    await c.send(get("/one") + b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                 + b"POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
                 + get("/four"))
    bodies = [(await c.read_response()).body for _ in range(4)]
    assert bodies == [b"GET /prod/one HTTP/1.1", b"POST /prod/two HTTP/1.1", b"POST /prod/three HTTP/1.1",
                      b"GET /prod/four HTTP/1.1"]
    assert [b for _, b in log] == [b"", b"abc", b"de", b""]
    assert up.connections == 1


CHUNKED_RESPONSE = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
CLOSE_RESPONSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello world"


async def test_http10_keep_alive_client_is_told_the_connection_stays_open(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    """HTTP/1.0 closes by default (RFC 9112 §9.3): a client that asked for keep-alive must read the answer's
    ``Connection: keep-alive`` to reuse the connection, which it then can."""
    log: Recorded = []
    up = await fwd_scripted(recorder(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    for i in range(2):
        resp = await c.request(b"GET /old%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
        assert resp.status == 200 and resp.body == b"GET /prod/old%d HTTP/1.1" % i
        assert resp.header("connection") == "keep-alive"
    assert len(log) == 2


@pytest.mark.parametrize("response", [ok(b"hello world"), CHUNKED_RESPONSE, CLOSE_RESPONSE],
                         ids=["content-length", "chunked", "close-delimited"])
async def test_http10_client_gets_a_framing_it_understands(response: bytes, fwd_scripted: StartScripted,
                                                            fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        if response is CLOSE_RESPONSE:
            writer.close()  # close_notify ends the close-delimited body cleanly
            await writer.wait_closed()
        else:
            await reader.read()

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    resp = await c.request(b"GET /old HTTP/1.0\r\n\r\n")
    assert resp.status == 200
    assert resp.header("transfer-encoding") is None
    assert resp.header("content-length") in (None, "11")
    assert resp.body == b"hello world"
    assert await c.closed_by_peer()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_expect_100_continue(framing: str, fwd_demo: int, fwd_proxy: StartProxy,
                                   fwd_client: Connect) -> None:
    body = b"x" * 5000
    rp = await fwd_proxy(fwd_demo)
    c = await fwd_client(rp)
    if framing == "chunked":
        head = b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    else:
        head = b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        wire = body
    await c.send(head)
    interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    resp = await c.request(wire)
    assert resp.status == 200
    data = echoed(resp)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in {k for k, _ in data["headers"]}  # the proxy answered it; it is not forwarded


# ---- a pooled connection the upstream closed -------------------------------------------------------------


def stale_after_first(log: list[tuple[int, bytes, bytes]]) -> Handler:
    """Connection 1 answers one request, then drops (RST) as soon as the next request starts arriving: the
    proxy's pooled connection turns out dead after it was reused.  Later connections serve normally."""
    count = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        index = count
        while True:
            head, body = await read_request(reader)
            log.append((index, head, body))
            writer.write(ok(request_line(head)))
            await writer.drain()
            if index == 1:
                await reader.read(1)
                return  # ScriptedUpstream aborts the connection: a TCP reset, nothing answered

    return handler


@BOTH_LOOPS
async def test_stale_pooled_connection_get_is_retried_once(fwd_scripted: StartScripted, fwd_proxy: StartProxy,
                                                           fwd_client: Connect) -> None:
    log: list[tuple[int, bytes, bytes]] = []
    up = await fwd_scripted(stale_after_first(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    assert (await c.request(get("/first"))).status == 200
    resp = await c.request(get("/second"))
    assert resp.status == 200 and resp.body == b"GET /prod/second HTTP/1.1"
    assert up.connections == 2
    assert [(i, request_line(h)) for i, h, _ in log] == [(1, b"GET /prod/first HTTP/1.1"),
                                                         (2, b"GET /prod/second HTTP/1.1")]


@BOTH_LOOPS
@pytest.mark.parametrize("request_", [
    b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n100",
    b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",  # no body: still not idempotent
    b"POST /pay HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["with-body", "content-length-0", "no-body"])
async def test_stale_pooled_connection_post_is_never_sent_twice(
        request_: bytes, fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: list[tuple[int, bytes, bytes]] = []
    up = await fwd_scripted(stale_after_first(log))
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    assert (await c.request(get("/first"))).status == 200
    resp = await c.request(request_)
    assert resp.status == 502
    assert resp.json()["error"] == "upstream_closed"
    posts = [i for i, h, _ in log if h.startswith(b"POST")]
    assert len(posts) <= 1 and 2 not in posts  # never re-sent on a fresh connection
    assert up.connections == 1


async def test_idle_connection_closed_by_upstream_is_not_reused(
        fwd_scripted: StartScripted, fwd_proxy: StartProxy, fwd_client: Connect) -> None:
    log: Recorded = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, body = await read_request(reader)
        log.append((head, body))
        writer.write(ok())
        await writer.drain()
        if len(log) == 1:
            writer.close()  # an idle timeout on the upstream side: close_notify + FIN after the response
            await writer.wait_closed()
            return
        await reader.read()

    up = await fwd_scripted(upstream)
    rp = await fwd_proxy(up.port)
    c = await fwd_client(rp)
    assert (await c.request(get("/first"))).status == 200
    async with asyncio.timeout(10):
        while rp.server.state.pool.idle_count:  # the proxy notices the close and drops the idle connection
            await asyncio.sleep(0.01)
    resp = await c.request(b"POST /pay HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n100")
    assert resp.status == 200
    assert up.connections == 2 and log[1][1] == b"100"
