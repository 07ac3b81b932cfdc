"""End-to-end: ``[[allow]] rate_limit`` / ``burst`` per client certificate, through the real process with its real
(event loop, monotonic) clock and the API Gateway stand-in.

Owns: a burst over the limit answered 429 with ``Retry-After`` and the JSON body (error, reason, subject,
fingerprint), the upstream counting no more requests than the limit allows, the denials counted in
``mtls_proxy_denied_total{reason="rate_limited"}``, the bucket shared by all connections of one certificate but not
by another partner's certificate, a refused request with a body never forwarded, and service again after
``Retry-After``.  Timing is only bounded generously (the machine may be loaded): the assertions that matter are
counts against the limit over the time that really passed.
"""

from __future__ import annotations

import asyncio
import time

from tests.e2e.kit import CountingUpstream, Ops, admin_addr, scrape
from tests.harness import ProxyProcess, RawClient, get
from tests.pki import Pki

RATE, BURST = 2.0, 3
RULES = [{"name": "partners", "subject_cn": ["client-a", "client-b"], "rate_limit": RATE, "burst": BURST}]


async def spawn(ops: Ops, upstream: CountingUpstream) -> ProxyProcess:
    return await ops.spawn(ops.config(upstream.port, rules=RULES))


async def test_a_burst_over_the_limit_gets_429_and_the_upstream_sees_no_more_than_allowed(
        pki: Pki, ops: Ops, auth_upstream: CountingUpstream) -> None:
    proc = await spawn(ops, auth_upstream)
    conns = [await ops.client(proc.port, "good") for _ in range(2)]  # one certificate, two connections
    start = time.monotonic()
    responses = []
    for i in range(12):
        responses.append(await conns[i % 2].request(get(f"/burst/{i}")))
    elapsed = time.monotonic() - start
    ok = [r for r in responses if r.status == 200]
    limited = [r for r in responses if r.status == 429]
    assert len(ok) + len(limited) == 12
    assert BURST <= len(ok) <= BURST + RATE * elapsed  # the whole burst, then no more than the rate refills
    assert len(auth_upstream.requests) == len(ok)  # counted at the upstream: nothing refused was forwarded
    assert limited, "a burst of 12 within the limit's refill time must be refused in part"
    for r in limited:
        retry = r.header("retry-after")
        assert retry is not None and retry.isdigit() and 1 <= int(retry) <= 1 / RATE + 1
        body = r.json()
        assert body["error"] == "too_many_requests" and body["reason"] == "rate_limited"
        assert body["subject"] == pki.clients["good"].subject
        assert body["fingerprint"] == pki.clients["good"].fingerprint
    samples = await scrape(admin_addr(proc))
    assert samples.get("mtls_proxy_denied_total", reason="rate_limited") == len(limited)
    assert samples.get("mtls_proxy_requests_total", method="GET", status="429", rule="partners") == len(limited)

    # after Retry-After, the partner is served again (bounded generously; this is liveness, not a timing claim)
    await asyncio.sleep(int(limited[-1].header("retry-after") or 1))
    assert (await conns[0].request(get("/again"))).status == 200
    for c in conns:
        await c.close()


async def test_each_certificate_has_its_own_bucket(ops: Ops, auth_upstream: CountingUpstream) -> None:
    proc = await spawn(ops, auth_upstream)
    a = await ops.client(proc.port, "good")
    statuses = [(await a.request(get(f"/a/{i}"))).status for i in range(BURST + 3)]
    assert statuses[:BURST] == [200] * BURST and 429 in statuses
    b = await ops.client(proc.port, "other")  # another partner under the same rule
    assert [(await b.request(get(f"/b/{i}"))).status for i in range(BURST)] == [200] * BURST
    renewed = await ops.client(proc.port, "renewed")  # the same partner's other certificate: another bucket too
    assert (await renewed.request(get("/renewed"))).status == 200
    for c in (a, b, renewed):
        await c.close()


async def test_a_limited_request_with_a_body_is_not_forwarded_and_closes(ops: Ops,
                                                                        auth_upstream: CountingUpstream) -> None:
    proc = await spawn(ops, auth_upstream)
    c = await ops.client(proc.port, "good")
    for i in range(BURST):
        assert (await c.request(get(f"/use/{i}"))).status == 200
    seen = len(auth_upstream.requests)
    body = b"x" * 1000
    resp = await c.request(b"POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert resp.status == 429 and resp.header("connection") == "close"
    assert await c.closed_by_peer()
    assert len(auth_upstream.requests) == seen
    await c.close()


async def test_unlimited_rules_are_not_limited(ops: Ops, auth_upstream: CountingUpstream) -> None:
    proc = await ops.spawn(ops.config(auth_upstream.port, rules=[
        {"name": "limited", "subject_cn": ["client-b"], "rate_limit": 1, "burst": 1},
        {"name": "open", "subject_cn": ["client-a"]}]))
    c: RawClient = await ops.client(proc.port, "good")
    assert [(await c.request(get(f"/o/{i}"))).status for i in range(20)] == [200] * 20
    await c.close()
