"""The per-connection request-head cache of ``ClientConnection._start``: a keep-alive client that repeats a head
byte for byte is not parsed again, and nothing else about the request changes (policy, identity block, log).

Owns: the cache's behaviour only; the state machine itself is tested in ``tests/test_connection.py``, whose
in-memory proxy these tests reuse.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy import connection as connection_mod
from proxy.connection import HEAD_CACHE_MAX
from proxy.wire import http1
from tests.test_connection import (  # noqa: F401  # make_proxy and proxy are fixtures
    Proxy, assert_open, exchange, forwarded, get, make_proxy, ok, one, proxy, settle)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every head ``parse_request_head`` is called with."""
    seen: list[bytes] = []
    real = http1.parse_request_head

    def counting(head: bytes, drop: frozenset[bytes] = frozenset()) -> http1.RequestHead:
        seen.append(head)
        return real(head, drop)

    monkeypatch.setattr(connection_mod.http1, "parse_request_head", counting)
    return seen


async def test_an_identical_head_on_the_same_connection_is_parsed_once_and_forwarded_the_same(
        proxy: Proxy, parses: list[bytes]) -> None:
    c = proxy.connect()
    rs = [await exchange(proxy, c, get(b"/orders/1"), ok(b"%d" % i)) for i in range(3)]
    assert [r.body for r in rs] == [b"0", b"1", b"2"]
    assert parses == [get(b"/orders/1")]
    assert proxy.upstream_bytes() == forwarded(b"GET /prod/orders/1 HTTP/1.1") * 3  # identity block each time
    assert [x["path"] for x in proxy.access()] == ["/orders/1"] * 3
    assert_open(c)


async def test_a_different_head_is_parsed_and_replaces_the_remembered_one(proxy: Proxy, parses: list[bytes]) -> None:
    c = proxy.connect()
    for path in (b"/orders/1", b"/orders/2", b"/orders/1", b"/orders/1"):
        await exchange(proxy, c, get(path), ok())
    assert parses == [get(b"/orders/1"), get(b"/orders/2"), get(b"/orders/1")]
    assert proxy.upstream_bytes() == b"".join(forwarded(b"GET /prod/orders/%d HTTP/1.1" % n) for n in (1, 2, 1, 1))


async def test_the_policy_still_decides_every_repeated_head(proxy: Proxy, parses: list[bytes]) -> None:
    c = proxy.connect()
    c.send(get(b"/admin"))
    assert one(c.tr.take()).status == 403
    c.send(get(b"/admin"))
    assert one(c.tr.take()).status == 403
    assert parses == [get(b"/admin")]
    assert proxy.metrics.denied["path_not_allowed"] == 2
    await settle()
    assert proxy.pool.dialled == []
    assert_open(c)


async def test_a_refused_head_is_never_remembered(proxy: Proxy, parses: list[bytes]) -> None:
    c = proxy.connect()
    await exchange(proxy, c, get(b"/orders/1"), ok())
    bad = b"GET /orders/1 HTTP/1.1\r\nHost : proxy.test\r\n\r\n"  # whitespace before the colon
    c.tr.take()
    c.send(bad)
    assert one(c.tr.take()).status == 400
    assert parses == [get(b"/orders/1"), bad]
    d = proxy.connect()  # a new connection starts with nothing remembered
    d.send(bad)
    assert one(d.tr.take()).status == 400
    assert parses == [get(b"/orders/1"), bad, bad]


async def test_a_head_over_the_cache_limit_is_parsed_every_time(proxy: Proxy, parses: list[bytes]) -> None:
    c = proxy.connect()
    big = get(b"/orders/1", b"X-Pad: " + b"a" * HEAD_CACHE_MAX + b"\r\n")
    for _ in range(2):
        r = await exchange(proxy, c, big, ok())
        assert r.status == 200
    assert len(big) > HEAD_CACHE_MAX
    assert parses == [big, big]


