"""Regression tests for the bugs the adversarial suite found, each against the real proxy process.

Owns one focused test per bug, beyond the table cases that first showed it:

* a peer's reset arriving with or right behind data was not noticed on uvloop until header/idle timeout: libuv
  answers EPOLLERR by running the reader once and dropping it, and ``TLSTransport._read_ready`` returned after a
  small read without reading on to the error (also: a handshake finished inside that one run left the new transport
  without a reader) -- first seen as 10-60 s hangs in test_tls_abuse.py's resets mid-head and after the handshake;
* after a reload (SIGHUP or a changed file) every new upstream connection raised ValueError ("Session refers to a
  different SSLContext": the pool offered the old context's TLS session to the new context, also when a connection
  dialled before the reload was released after it), which nothing turned into a status -- requests that needed a
  new upstream connection hung silently; first seen in test_load.py's reload soak;
* two empty lines before a request line ended an empty head and were answered 400 when they arrived in the same
  read as the request, but not when split across reads (RFC 9112 §2.2 says ignore them) -- test_smuggling.py
  "leading-empty-lines"; here split over TLS records as well;
* a chunk-size line over 4 KiB was refused only when it arrived in pieces -- test_smuggling.py "chunk-ext-5kib".
"""

from __future__ import annotations

import asyncio
import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.adversarial.recorder import RecordingUpstream
from tests.adversarial.target import metrics, settled_fds, spawn, wait_fds
from tests.e2e.kit import MemTLSClient, eventually
from tests.harness import ProxyProcess, RawClient, client_ctx, get
from tests.pki import Pki

LONG = 60.0  # header and idle timeout: a connection the proxy failed to notice would sit this long


@dataclass
class Env:
    pki: Pki
    recorder: RecordingUpstream
    proxy: ProxyProcess
    baseline_fds: int


@pytest.fixture(scope="module")
def env(pki: Pki, recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("regressions")
    proc = spawn(tmp, pki, recorder.port, "regressions", server={"header_timeout": LONG, "idle_timeout": LONG},
                 upstream={"pool_idle_timeout": 0.3})
    yield Env(pki, recorder, proc, settled_fds(proc.proc.pid))
    proc.stop()
    assert "Traceback" not in proc.stderr(), proc.stderr()[-4000:]


def reset(c: MemTLSClient) -> None:
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.writer.transport.abort()


@pytest.mark.parametrize("after", ["partial-head", "handshake"])
async def test_reset_is_noticed_at_once_not_after_a_timeout(after: str, env: Env) -> None:
    """TLS 1.3 (the client does not read the session tickets, so even its close is a reset): 20 times in a row."""
    for i in range(20):
        c = await MemTLSClient.connect(env.proxy.port, client_ctx(env.pki))
        await c.handshake()
        if after == "partial-head":
            c.tls.write(b"GET /c/%d HTTP/1.1\r\nHost: api.test\r\nX-Pad: abc" % i)
            await c.send_raw(c.outgoing.read())
        t0 = time.monotonic()
        reset(c)
        left = await asyncio.to_thread(wait_fds, env.proxy.proc.pid, env.baseline_fds, LONG / 4)
        assert left <= env.baseline_fds, f"round {i}: still {left} fds after {time.monotonic() - t0:.1f} s"
    assert (await asyncio.to_thread(metrics, env.proxy)).get("mtls_proxy_connections_active") == 0


async def test_new_upstream_connections_work_after_a_reload(env: Env) -> None:
    c = await RawClient.connect(env.proxy.port, client_ctx(env.pki))
    assert (await c.request(get("/c/before-reload"))).status == 200  # pools a connection, keeps its TLS session
    # and one exchange in flight across the reload: its connection (old context) is released to the pool after it
    held = await RawClient.connect(env.proxy.port, client_ctx(env.pki))
    env.recorder.hold()
    await held.send(get("/hold/across-reload"))
    await eventually(lambda: asyncio.to_thread(lambda: env.recorder.holding == 1))
    before = (await asyncio.to_thread(metrics, env.proxy)).get("mtls_proxy_reloads_total", result="success")
    env.proxy.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        s = await asyncio.to_thread(metrics, env.proxy)
        return s.get("mtls_proxy_reloads_total", result="success") == before + 1

    await eventually(reloaded)
    env.recorder.release()
    assert (await held.read_response()).status == 200
    await held.close()
    await eventually(lambda: asyncio.to_thread(lambda: env.recorder.open_connections() == 0))  # pool expired
    for i in range(3):  # each needs a new upstream connection, dialled with the new context
        resp = await c.request(get(f"/c/after-reload-{i}"), timeout=20)
        assert resp.status == 200 and resp.body == f"/prod/c/after-reload-{i}".encode()
        await eventually(lambda: asyncio.to_thread(lambda: env.recorder.open_connections() == 0))
    await c.close()


@pytest.mark.parametrize("split", [False, True], ids=["one-record", "record-per-line"])
async def test_empty_lines_before_the_request_line_are_ignored(split: bool, env: Env) -> None:
    c = await MemTLSClient.connect(env.proxy.port, client_ctx(env.pki))
    await c.handshake()
    parts = [b"\r\n", b"\r\n", b"\r\n", b"GET /c/empty-lines HTTP/1.1\r\nHost: api.test\r\n\r\n"]
    for part in parts if split else [b"".join(parts)]:
        c.tls.write(part)
        await c.send_raw(c.outgoing.read())
    resp = await c.request(b"")
    assert resp.status == 200 and resp.body == b"/prod/c/empty-lines"
    await c.close()


async def test_chunk_size_line_limit_does_not_depend_on_segmentation(env: Env) -> None:
    head = b"POST /c/long-chunk-line HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    line = b"3;a=" + b"b" * 5000 + b"\r\n"
    for pieces in ([head + line], [head, line[:2000], line[2000:]]):
        c = await MemTLSClient.connect(env.proxy.port, client_ctx(env.pki))
        await c.handshake()
        for piece in pieces:
            c.tls.write(piece)
            await c.send_raw(c.outgoing.read())
        resp = await c.request(b"")
        assert resp.status == 400, resp.body
        await c.close()
    assert not [r for r in env.recorder.since() if r.kind == "request" and "long-chunk-line" in r.target]
