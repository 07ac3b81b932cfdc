"""A malformed chunked body already in hand is refused before anything goes upstream (the real process).

Owns:
* a POST whose chunked framing is broken within the bytes that arrived with its head (the first chunk-size line
  ``zz``, ``-1``, ``0x10`` or 17 hex digits; a good first chunk then a broken one; a declared size over
  ``max_body_bytes``) gets its 400 (or 413) and the strict recording upstream sees nothing at all: no request, no
  aborted request, not a byte.  The access log says ``bad_request`` and nothing about the upstream;
* a framing error that arrives later, after part of the body has been streamed upstream, still aborts that
  upstream request (the recorder sees an incomplete request, never a complete one) and the access-log line carries
  ``"error":"bad_request"`` and ``"upstream_aborted":true``;
* what the check must not touch: a complete chunked body or a Content-Length body followed by a malformed
  pipelined request is forwarded whole; only the next request gets its 400.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.adversarial.recorder import RecordingUpstream
from tests.adversarial.target import spawn
from tests.e2e.kit import eventually
from tests.harness import ProxyProcess, RawClient, client_ctx
from tests.pki import Pki

H = b"Host: api.test\r\n"
TE = b"Transfer-Encoding: chunked\r\n"
MAX_BODY = 1_000_000


@dataclass
class Env:
    recorder: RecordingUpstream
    proxy: ProxyProcess
    ctx: ssl.SSLContext


@pytest.fixture(scope="module")
def env(pki: Pki, recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("framing-in-hand")
    proc = spawn(tmp, pki, recorder.port, "framing", server={"max_body_bytes": MAX_BODY},
                 upstream={"pool_idle_timeout": 60.0})
    yield Env(recorder, proc, client_ctx(pki))
    proc.stop()
    assert "Traceback" not in proc.stderr(), proc.stderr()[-4000:]


async def access_line(env: Env, path: str) -> dict[str, Any]:
    """The proxy's access-log line for ``path`` (written in batches: poll)."""
    async def find() -> dict[str, Any] | None:
        for line in env.proxy.stdout().splitlines():
            entry = json.loads(line)
            if entry["path"] == path:
                return entry  # type: ignore[no-any-return]
        return None

    return await eventually(find)  # type: ignore[no-any-return]


async def barrier(env: Env, name: str) -> None:
    """A clean request on a fresh connection, so the recorder has caught up with whatever came before."""
    c = await RawClient.connect(env.proxy.port, env.ctx)
    try:
        resp = await c.request(b"GET /barrier/%s HTTP/1.1\r\n" % name.encode() + H + b"\r\n")
        assert resp.status == 200
    finally:
        await c.close()


async def warm_pool(env: Env, c: RawClient, name: str) -> None:
    """A request first: the next one finds a pooled upstream connection, the case where the head would go at once."""
    resp = await c.request(b"GET /c/warm-%s HTTP/1.1\r\n" % name.encode() + H + b"\r\n")
    assert resp.status == 200


IN_HAND = {
    "size-zz": b"zz\r\nabc\r\n0\r\n\r\n",
    "size-negative": b"-1\r\na\r\n0\r\n\r\n",
    "size-0x-prefix": b"0x10\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n",
    "size-17-hex-digits": b"10000000000000003\r\nabc\r\n0\r\n\r\n",
    "second-chunk-broken": b"5\r\nhello\r\nzz\r\nabc\r\n0\r\n\r\n",
    "data-not-followed-by-crlf": b"3\r\nabcdef\r\n0\r\n\r\n",
    "unfinished-but-already-wrong": b"5\r\nhello\r\n3;=x\r\n",
}


@pytest.mark.parametrize("case", list(IN_HAND))
async def test_broken_framing_in_hand_is_refused_with_nothing_sent_upstream(case: str, env: Env) -> None:
    c = await RawClient.connect(env.proxy.port, env.ctx)
    try:
        await warm_pool(env, c, case)
        mark, sent = env.recorder.mark(), env.recorder.bytes_received()
        path = f"/c/in-hand-{case}"
        resp = await c.request(b"POST %s HTTP/1.1\r\n" % path.encode() + H + TE + b"\r\n" + IN_HAND[case])
        assert resp.status == 400 and resp.json()["error"] == "bad_request", resp.body
        assert resp.header("connection") == "close"
        assert await c.closed_by_peer()
    finally:
        await c.close()
    before_barrier = env.recorder.bytes_received()
    await barrier(env, case)
    got = env.recorder.since(mark)
    assert [(r.kind, r.target) for r in got] == [("request", f"/prod/barrier/{case}")], got
    assert before_barrier == sent  # not one byte of the refused request upstream
    line = await access_line(env, path)
    assert (line["status"], line["error"], line["upstream_ms"]) == (400, "bad_request", None), line
    assert "upstream_aborted" not in line, line


async def test_body_over_max_body_bytes_declared_in_hand_is_413_with_nothing_sent(env: Env) -> None:
    c = await RawClient.connect(env.proxy.port, env.ctx)
    try:
        await warm_pool(env, c, "413")
        mark, sent = env.recorder.mark(), env.recorder.bytes_received()
        resp = await c.request(b"POST /c/in-hand-413 HTTP/1.1\r\n" + H + TE + b"\r\n%x\r\nabc" % (MAX_BODY + 1))
        assert resp.status == 413, resp.body
    finally:
        await c.close()
    before_barrier = env.recorder.bytes_received()
    await barrier(env, "413")
    assert [(r.kind, r.target) for r in env.recorder.since(mark)] == [("request", "/prod/barrier/413")]
    assert before_barrier == sent


async def test_a_later_framing_error_aborts_the_upstream_request_and_says_so(env: Env) -> None:
    c = await RawClient.connect(env.proxy.port, env.ctx)
    try:
        await warm_pool(env, c, "later")
        mark, sent = env.recorder.mark(), env.recorder.bytes_received()
        path = "/c/later-error"
        await c.send(b"POST %s HTTP/1.1\r\n" % path.encode() + H + TE + b"\r\n5\r\nhello\r\n")

        async def streamed() -> bool:  # the head and the first chunk are upstream already
            return await asyncio.to_thread(lambda: env.recorder.bytes_received() > sent + 5)

        await eventually(streamed)
        resp = await c.request(b"zz\r\nabc\r\n0\r\n\r\n")
        assert resp.status == 400 and resp.json()["error"] == "bad_request"
    finally:
        await c.close()

    async def aborted() -> list[Any]:
        return [r for r in env.recorder.since(mark) if r.kind == "incomplete"]

    assert len(await eventually(aborted)) == 1
    assert [r for r in env.recorder.since(mark) if r.kind != "incomplete"] == []  # never a complete request
    line = await access_line(env, path)
    assert (line["status"], line["error"], line["upstream_aborted"]) == (400, "bad_request", True), line
    assert line["bytes_in"] == 5


@pytest.mark.parametrize("body", [TE + b"\r\n5\r\nhello\r\n0\r\n\r\n", b"Content-Length: 5\r\n\r\nhello"],
                         ids=["chunked", "content-length"])
async def test_a_complete_body_is_forwarded_whatever_follows_it(body: bytes, env: Env) -> None:
    name = "chunked" if b"chunked" in body else "content-length"
    mark = env.recorder.mark()
    c = await RawClient.connect(env.proxy.port, env.ctx)
    try:
        await c.send(b"POST /c/whole-%s HTTP/1.1\r\n" % name.encode() + H + body
                     + b"GET /c/next HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # a malformed pipelined request
        first, second = await c.read_response(), await c.read_response()
        assert (first.status, second.status) == (200, 400), (first.body, second.body)
    finally:
        await c.close()
    got = [(r.kind, r.method, r.target, r.body) for r in env.recorder.since(mark)]
    assert got == [("request", "POST", f"/prod/c/whole-{name}", b"hello")]
    line = await access_line(env, f"/c/whole-{name}")
    assert (line["status"], line["error"], line["bytes_in"]) == (200, None, 5) and "upstream_aborted" not in line
