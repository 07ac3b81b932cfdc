"""PROXY protocol v2 on the wire (``server.proxy_protocol = true``), as an AWS NLB sends it.

Owns: the exact-read contract between the PROXY header and TLS on one socket (header and ClientHello in ONE
send(); header split over several segments with pauses), what the header's facts become (X-Forwarded-For,
X-Client-Vpce-Id, the access log's client and vpce, ``source_vpce`` rules), trusting only the first header,
every malformed-header class (closed, counted by reason, the proxy keeps serving), the LOCAL command of NLB
health checks, and the admin port accepting a health check behind a PROXY header.

The client side runs TLS over ``ssl.MemoryBIO`` (``MemTLSClient``) so the test decides which bytes share a
segment.  Both event loops: ``sock_recv`` with an exact size is what keeps the ClientHello in the kernel.
"""

from __future__ import annotations

import asyncio
import signal
import struct
from typing import Any

import pytest

from proxy.wire import proxy_protocol as pp
from tests.e2e.kit import InProcess, MemTLSClient, Ops, admin_addr, admin_request, eventually, scrape
from tests.harness import client_ctx, get

BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
NLB_DST = ("10.0.12.34", 443)
VPCE = "vpce-0a1b2c3d4e5f67890"


def echoed(resp: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in resp.json()["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


async def pp_proxy(ops: Ops, rules: list[dict[str, Any]] | None = None, **server: Any) -> InProcess:
    return await ops.start(ops.config(await ops.upstream(), rules=rules,
                                      server={"proxy_protocol": True, "proxy_protocol_timeout": 1.0, **server}))


async def pp_errors(ip: InProcess) -> dict[str, float]:
    s = await scrape(ip.admin_addr)
    return {dict(k)["reason"]: v for k, v in s.series("mtls_proxy_proxy_protocol_errors_total").items() if v}


async def assert_serves(ip: InProcess, ops: Ops) -> None:
    """A well-behaved NLB connection still gets through."""
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    await c.send_raw(pp.build(("198.51.100.1", 40000), NLB_DST, vpce_id=VPCE) + c.client_hello())
    await c.handshake()
    assert (await c.request(get("/still-serving", extra=b"Connection: close\r\n"))).status == 200
    await c.close()


# ---- exact reads: the ClientHello behind the header is never lost --------------------------------------------


@BOTH_LOOPS
@pytest.mark.parametrize("src", [("203.0.113.7", 51234), ("2001:db8::7", 51234)], ids=["ipv4", "ipv6"])
async def test_header_and_client_hello_in_one_send(ops: Ops, src: tuple[str, int]) -> None:
    ip = await pp_proxy(ops)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    dst = NLB_DST if ":" not in src[0] else ("2001:db8::1", 443)
    segment = pp.build(src, dst, vpce_id=VPCE) + c.client_hello()
    await c.send_raw(segment)  # one write on an idle TCP_NODELAY socket: one send(), one segment
    await c.handshake()
    # The client tries to smuggle its own identity facts: they are removed, the NLB's facts are added.
    spoof = b"X-Client-Vpce-Id: vpce-0badbadbadbadbad0\r\nX-Forwarded-For: 192.0.2.66\r\nx_client_vpce_id: vpce-01\r\n"
    resp = await c.request(get("/echo", extra=spoof))
    assert resp.status == 200, resp.body
    headers = echoed(resp)
    assert headers["x-forwarded-for"] == [src[0]]
    assert headers["x-client-vpce-id"] == [VPCE]
    assert "x_client_vpce_id" not in headers
    await c.close()
    line = (await eventually(lambda: _access_lines(ip)))[-1]
    assert (line["client"], line["vpce"], line["status"]) == (src[0], VPCE, 200)


async def _access_lines(ip: InProcess) -> list[dict[str, Any]]:
    return ip.access()


SPLITS = {
    "byte-then-prefix-then-rest": [1, 15, None],  # None: the rest of the header
    "inside-signature-and-tlv": [5, 20, None],
    "last-header-bytes-with-hello": [16, -1],  # -1: the header's last byte goes out with the ClientHello
}


@BOTH_LOOPS
@pytest.mark.parametrize("cuts", list(SPLITS.values()), ids=list(SPLITS))
async def test_header_split_across_segments_with_pauses(ops: Ops, cuts: list[int | None]) -> None:
    ip = await pp_proxy(ops, proxy_protocol_timeout=10.0)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    header = pp.build(("203.0.113.9", 1234), NLB_DST, vpce_id=VPCE, tlvs=[(pp.PP2_TYPE_NOOP, b"\0" * 7)])
    hello = c.client_hello()
    pos = 0
    for cut in cuts:
        if cut is None:
            await c.send_raw(header[pos:])
            await c.send_raw(hello)
            break
        if cut == -1:
            await c.send_raw(header[pos:] + hello)
            break
        await c.send_raw(header[pos:pos + cut])
        pos += cut
        await asyncio.sleep(0.2)  # a pause between segments (not a readiness wait)
    await c.handshake()
    resp = await c.request(get("/split"))
    assert resp.status == 200
    assert echoed(resp)["x-forwarded-for"] == ["203.0.113.9"]
    await c.close()
    assert await pp_errors(ip) == {}


# ---- facts from the header drive policy ---------------------------------------------------------------------


@pytest.mark.parametrize(("vpce", "status"), [("vpce-0aaa", 200), ("vpce-0bbb", 403), (None, 403)],
                         ids=["listed-endpoint", "other-endpoint", "no-endpoint-tlv"])
async def test_source_vpce_rules_allow_and_deny_by_endpoint(ops: Ops, vpce: str | None, status: int) -> None:
    rules = [{"name": "partner-a-via-vpce", "subject_cn": ["client-a"], "source_vpce": ["vpce-0aaa"]}]
    ip = await pp_proxy(ops, rules=rules)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    await c.send_raw(pp.build(("198.51.100.20", 5555), NLB_DST, vpce_id=vpce) + c.client_hello())
    await c.handshake()
    resp = await c.request(get("/v"))
    assert resp.status == status, resp.body
    await c.close()
    s = await scrape(ip.admin_addr)
    if status == 200:
        assert s.get("mtls_proxy_requests_total", method="GET", status="200", rule="partner-a-via-vpce") == 1
    else:
        assert resp.json()["reason"] == "no_rule_for_client"
        assert s.get("mtls_proxy_denied_total", reason="no_rule_for_client") == 1


async def test_only_the_first_header_is_trusted(ops: Ops) -> None:
    """A client-sent PROXY header behind the NLB's is part of the TLS stream: garbage, the handshake fails."""
    ip = await pp_proxy(ops)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    nlb = pp.build(("198.51.100.30", 1000), NLB_DST, vpce_id=VPCE)
    forged = pp.build(("192.0.2.99", 1), NLB_DST, vpce_id="vpce-0f0f0f0f0f0f0f0f0")
    await c.send_raw(nlb + forged + c.client_hello())
    with pytest.raises((ConnectionError, OSError)):
        await c.handshake()
    await c.close()

    async def failed() -> Any:
        s = await scrape(ip.admin_addr)
        return s if s.get("mtls_proxy_tls_handshake_failures_total", reason="protocol") == 1 else None

    s = await eventually(failed)
    assert await pp_errors(ip) == {}  # the first header was fine
    assert s.get("mtls_proxy_requests_total", method="GET", status="200", rule="partner-a") == 0
    await assert_serves(ip, ops)


# ---- malformed headers: closed, counted, the proxy keeps serving -------------------------------------------


def _with(header: bytes, offset: int, value: int) -> bytes:
    return header[:offset] + bytes([value]) + header[offset + 1:]


GOOD = pp.build(("198.51.100.40", 2000), NLB_DST, vpce_id=VPCE)
BAD_HEADERS: dict[str, tuple[bytes, str]] = {
    "v1-text-header": (b"PROXY TCP4 198.51.100.40 10.0.12.34 2000 443\r\n", "v1"),
    "version-1-binary": (_with(GOOD, 12, 0x11), "bad_version"),
    "unknown-command": (_with(GOOD, 12, 0x2F), "bad_command"),
    "unknown-family": (_with(GOOD, 13, 0x51), "bad_family"),
    "udp-transport": (_with(GOOD, 13, 0x12), "bad_family"),
    "address-block-short": (GOOD[:14] + struct.pack("!H", 4) + GOOD[16:20], "bad_address"),
    "tlv-overruns-header": (GOOD[:14] + struct.pack("!H", 12 + 3) + GOOD[16:28] + b"\xea\x00\x09", "bad_tlv"),
    "vpce-bad-characters": (pp.build(("198.51.100.40", 2000), NLB_DST, vpce_id="vpce-0AB;rm"), "bad_vpce"),
    "oversized": (GOOD[:14] + struct.pack("!H", 4000) + GOOD[16:], "oversized"),
    "closed-inside-header": (GOOD[:30], "truncated"),
}


@pytest.mark.parametrize("name", list(BAD_HEADERS))
async def test_malformed_header_closes_the_connection_and_is_counted(ops: Ops, name: str) -> None:
    data, reason = BAD_HEADERS[name]
    ip = await pp_proxy(ops)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    if name == "closed-inside-header":
        await c.send_raw(data)
        c.writer.write_eof()  # the peer gives up half-way through the header
    else:
        await c.send_raw(data + c.client_hello())  # an NLB-like single segment
    assert await c.closed_by_peer(timeout=10)
    await c.close()
    assert await eventually(lambda: pp_errors(ip)) == {reason: 1}
    s = await scrape(ip.admin_addr)
    assert sum(s.series("mtls_proxy_tls_handshake_failures_total").values()) == 0  # TLS never started
    await assert_serves(ip, ops)


async def test_missing_header_is_refused(ops: Ops) -> None:
    """A client that reaches the port without the NLB (TLS straight away) is closed before TLS starts."""
    ip = await pp_proxy(ops)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    await c.send_raw(c.client_hello())
    with pytest.raises((ConnectionError, OSError)):
        await c.handshake()
    await c.close()
    assert await eventually(lambda: pp_errors(ip)) == {"not_proxy": 1}
    await assert_serves(ip, ops)


async def test_header_not_completed_in_time_is_closed_while_others_are_served(ops: Ops) -> None:
    ip = await pp_proxy(ops, proxy_protocol_timeout=1.0)
    slow = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    await slow.send_raw(GOOD[:20])  # and nothing more
    await assert_serves(ip, ops)  # served while the slow one still holds its half header
    assert await slow.closed_by_peer(timeout=15)
    await slow.close()
    assert await eventually(lambda: pp_errors(ip)) == {"truncated": 1}


# ---- LOCAL: NLB health checks --------------------------------------------------------------------------------


async def test_local_command_serves_with_the_socket_address(ops: Ops) -> None:
    ip = await pp_proxy(ops)
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki))
    await c.send_raw(pp.build(local=True, tlvs=[(pp.PP2_TYPE_AWS, b"\x01vpce-0aaa")]) + c.client_hello())
    await c.handshake()
    resp = await c.request(get("/local"))
    assert resp.status == 200
    headers = echoed(resp)
    assert headers["x-forwarded-for"] == ["127.0.0.1"]  # LOCAL: the real peer, never the block's contents
    assert "x-client-vpce-id" not in headers
    await c.close()


async def test_local_health_check_that_just_closes_is_not_an_error(ops: Ops) -> None:
    """NLB health checks (LOCAL): neither a PROXY error nor a failed handshake, whether TCP or HTTPS."""
    ip = await pp_proxy(ops)
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", ip.port)
        writer.write(pp.build(local=True))
        writer.write_eof()
        try:
            await asyncio.wait_for(reader.read(), 10)  # the proxy closes (a reset is fine for a TCP check)
        except ConnectionResetError:
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionResetError:
            pass

    # An NLB HTTPS health check: LOCAL header, then TLS without a client certificate.
    c = await MemTLSClient.connect(ip.port, client_ctx(ops.pki, None))
    await c.send_raw(pp.build(local=True) + c.client_hello())
    try:
        await c.handshake()
        await c.request(get("/health"))
    except (ConnectionError, OSError):
        pass  # refused: a client certificate is always required
    else:
        raise AssertionError("a request without a client certificate was answered")
    await c.close()

    async def all_closed() -> Any:
        s = await scrape(ip.admin_addr)
        return s if s.get("mtls_proxy_connections_total") == 4 and not s.get("mtls_proxy_connections_active") else None

    s = await eventually(all_closed)
    assert sum(s.series("mtls_proxy_proxy_protocol_errors_total").values()) == 0
    assert sum(s.series("mtls_proxy_tls_handshake_failures_total").values()) == 0
    await assert_serves(ip, ops)


# ---- the admin port behind the NLB (real process) ----------------------------------------------------------


async def test_admin_port_accepts_health_checks_behind_a_proxy_header(ops: Ops) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream(), server={"proxy_protocol": True}))
    addr = admin_addr(proc)
    for prefix in (pp.build(local=True), pp.build(("10.0.0.9", 3333), ("10.0.0.10", 9100)), b""):
        reply = await admin_request(addr, "/readyz", prefix=prefix)  # header and request in one send()
        assert (reply.status, reply.body) == (200, "ready\n"), prefix
    # split: the header in two pieces, then the request
    reader, writer = await asyncio.open_connection(*addr)
    header = pp.build(local=True)
    writer.write(header[:7])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(header[7:])
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 200")
    proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 0
