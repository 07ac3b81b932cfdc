"""The admin port as an operator and an NLB see it: /healthz, /readyz, /metrics.

Owns: liveness and readiness (also while draining and while the upstream is down), both exposition formats
with every metric name the issue lists, and metric values moving exactly as the traffic that caused them.

The real process where the wiring of ``server.run()`` matters (admin port, signals); the in-process proxy with
an ``AdminServer`` wired the same way for value tests (they run many small scenarios).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import ssl
from typing import Any

import pytest
from cryptography import x509

from tests.e2e.kit import Ops, admin_addr, admin_request, eventually, parse_samples, scrape
from tests.harness import RawClient, client_ctx, free_port, get, read_request

# Every metric the issue names, with its Prometheus type and the label names its samples carry.
ISSUE_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "mtls_proxy_requests_total": ("counter", frozenset({"method", "status", "rule"})),
    "mtls_proxy_request_duration_seconds": ("histogram", frozenset()),
    "mtls_proxy_upstream_duration_seconds": ("histogram", frozenset()),
    "mtls_proxy_upstream_errors_total": ("counter", frozenset({"kind"})),
    "mtls_proxy_tls_handshake_failures_total": ("counter", frozenset({"reason"})),
    "mtls_proxy_denied_total": ("counter", frozenset({"reason"})),
    "mtls_proxy_connections_active": ("gauge", frozenset()),
    "mtls_proxy_connections_total": ("counter", frozenset()),
    "mtls_proxy_cert_expiry_timestamp_seconds": ("gauge", frozenset({"cert"})),
    "mtls_proxy_reloads_total": ("counter", frozenset({"result"})),
    "mtls_proxy_proxy_protocol_errors_total": ("counter", frozenset({"reason"})),
}
HANDSHAKE_REASONS = ("no_cert", "untrusted", "expired", "revoked", "bad_purpose", "protocol", "timeout", "other")
CLOSE = b"Connection: close\r\n"


def family(name: str) -> str:
    return name.removesuffix("_total") if ISSUE_METRICS[name][0] == "counter" else name


async def one_request(port: int, ctx: ssl.SSLContext, data: bytes) -> Any:
    c = await RawClient.connect(port, ctx)
    try:
        return await c.request(data)
    finally:
        await c.close()


# ---- liveness and readiness on the real process ---------------------------------------------------------------


async def test_healthz_and_readyz_answer_on_the_real_process(ops: Ops) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream()))
    addr = admin_addr(proc)
    for path, status in (("/healthz", 200), ("/readyz", 200), ("/nope", 404)):
        assert (await admin_request(addr, path)).status == status, path
    assert (await admin_request(addr, "/metrics", method="POST")).status == 405  # nothing on it changes state


async def test_readyz_does_not_depend_on_the_upstream(ops: Ops) -> None:
    """An API outage must not take every task out of the NLB: /readyz stays 200 while requests get 502."""
    dead = free_port()  # nothing listens here
    proc = await ops.spawn(ops.config(dead, upstream={"connect_timeout": 1.0}))
    addr = admin_addr(proc)
    resp = await one_request(proc.port, client_ctx(ops.pki), get("/down", extra=CLOSE))
    assert resp.status == 502
    assert (await admin_request(addr, "/readyz")).status == 200
    assert (await admin_request(addr, "/healthz")).status == 200
    assert (await scrape(addr)).get("mtls_proxy_upstream_errors_total", kind="connect") == 1


async def test_readyz_turns_503_as_soon_as_a_drain_starts(ops: Ops) -> None:
    """SIGTERM with a slow request in flight: /readyz is 503 while that request is still running."""
    got_request = asyncio.Event()
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        got_request.set()
        await asyncio.wait_for(release.wait(), 30)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()

    up = await ops.scripted(slow)
    proc = await ops.spawn(ops.config(up.port, server={"shutdown_timeout": 20.0}))
    addr = admin_addr(proc)
    assert (await admin_request(addr, "/readyz")).status == 200
    client = await ops.client(proc.port)
    pending = asyncio.create_task(client.request(get("/slow")))
    await asyncio.wait_for(got_request.wait(), 10)

    proc.signal(signal.SIGTERM)
    reply = await eventually(lambda: _readyz_if_503(addr))
    assert reply.status == 503
    assert not pending.done()  # the drain has started, the slow request is still in flight
    assert (await admin_request(addr, "/healthz")).status == 200  # alive while draining

    release.set()
    resp = await asyncio.wait_for(pending, 10)
    assert resp.status == 200 and resp.body == b"slow"
    assert await asyncio.to_thread(proc.wait, 20) == 0
    await client.close()


async def _readyz_if_503(addr: tuple[str, int]) -> Any:
    reply = await admin_request(addr, "/readyz")
    return reply if reply.status == 503 else None


# ---- exposition formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("openmetrics", [False, True], ids=["prometheus-text", "openmetrics"])
async def test_metrics_expose_every_issue_metric_in_both_formats(ops: Ops, openmetrics: bool) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream()))
    resp = await one_request(proc.port, client_ctx(ops.pki), get("/one", extra=CLOSE))
    assert resp.status == 200
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else None
    reply = await admin_request(admin_addr(proc), "/metrics", accept=accept)
    assert reply.status == 200
    if openmetrics:
        assert reply.content_type.startswith("application/openmetrics-text")
        assert reply.body.endswith("# EOF\n")
    else:
        assert reply.content_type.startswith("text/plain; version=0.0.4")
        assert "# EOF" not in reply.body
    samples = parse_samples(reply.body, openmetrics)  # the official parser of that format accepts it
    for name, (kind, labels) in ISSUE_METRICS.items():
        assert samples.types.get(family(name)) == kind, name
        sample_name = name + "_count" if kind == "histogram" else name
        series = samples.series(sample_name)
        assert series, f"{name}: no samples (zero-valued series must be exported before the first event)"
        assert all({k for k, _ in labels_} == labels for labels_ in series), (name, series)
    assert samples.get("mtls_proxy_requests_total", method="GET", status="200", rule="partner-a") == 1
    assert samples.get("mtls_proxy_request_duration_seconds_count") == 1
    assert samples.get("mtls_proxy_upstream_duration_seconds_count") == 1


# ---- values follow traffic (in-process proxy, admin port wired as in server.run) -----------------------------


async def test_requests_and_denials_are_counted_by_method_status_rule_and_reason(ops: Ops) -> None:
    rules = [{"name": "partner-a", "subject_cn": ["client-a"], "methods": ["GET", "POST"]},
             {"name": "partner-b", "subject_cn": ["client-b"], "paths": ["/b/**"]}]
    ip = await ops.start(ops.config(await ops.upstream(), rules=rules))
    traffic = [
        ("good", get("/a"), 200), ("good", get("/a"), 200), ("good", get("/a"), 200),
        ("good", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi", 200),
        ("good", b"DELETE /a HTTP/1.1\r\nHost: x\r\n\r\n", 403),  # method_not_allowed
        ("other", get("/b/x"), 200),
        ("other", get("/elsewhere"), 403),  # path_not_allowed
        ("self_signed", get("/a"), 403),  # trusted certificate, but no rule for it
    ]
    for name, data, status in traffic:
        resp = await one_request(ip.port, client_ctx(ops.pki, name), data)
        assert resp.status == status, (name, data, resp.body)
    s = await scrape(ip.admin_addr)
    expected = {("GET", "200", "partner-a"): 3, ("POST", "200", "partner-a"): 1, ("GET", "200", "partner-b"): 1,
                ("DELETE", "403", ""): 1, ("GET", "403", ""): 2}
    got = {(dict(k)["method"], dict(k)["status"], dict(k)["rule"]): v
           for k, v in s.series("mtls_proxy_requests_total").items()}
    assert got == expected
    assert {dict(k)["reason"]: v for k, v in s.series("mtls_proxy_denied_total").items() if v} == {
        "method_not_allowed": 1, "path_not_allowed": 1, "no_rule_for_client": 1}
    assert s.get("mtls_proxy_request_duration_seconds_count") == len(traffic)
    assert s.get("mtls_proxy_upstream_duration_seconds_count") == 5  # refused requests never go upstream
    buckets = s.series("mtls_proxy_request_duration_seconds_bucket")
    assert buckets[frozenset({("le", "+Inf")})] == len(traffic)


async def _connect_and_read(port: int, ctx: ssl.SSLContext) -> None:
    """A handshake the proxy refuses (TLS 1.3 reports a bad client certificate after the client's side ends)."""
    try:
        c = await RawClient.connect(port, ctx)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        await c.request(get("/", extra=CLOSE), timeout=5)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        await c.close()
    raise AssertionError("the proxy accepted a client it must refuse")


async def _raw_tcp(port: int, data: bytes, close_after: bool) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if data:
        writer.write(data)
    if not close_after:
        try:
            await asyncio.wait_for(reader.read(), 10)  # until the proxy gives up on us (it resets)
        except ConnectionResetError:
            pass
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


HANDSHAKE_CASES = [
    ("no_cert", "client", None),
    ("untrusted", "client", "other_ca_same_cn"),
    ("untrusted", "client", "too_deep"),  # deeper than verify_depth: OpenSSL's CERT_CHAIN_TOO_LONG
    ("expired", "client", "expired"),
    ("expired", "client", "not_yet_valid"),
    ("revoked", "client", "revoked"),
    ("bad_purpose", "client", "no_client_auth"),
    ("protocol", "tcp", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),  # plain HTTP on the TLS port
    ("timeout", "idle", b""),  # says nothing until handshake_timeout
    ("other", "tcp", b""),  # connects and leaves
]


@pytest.mark.parametrize(("reason", "how", "what"), HANDSHAKE_CASES,
                         ids=[f"{r}-{w if isinstance(w, str) else h}" for r, h, w in HANDSHAKE_CASES])
async def test_failed_handshake_increments_exactly_its_reason(ops: Ops, reason: str, how: str, what: Any) -> None:
    ip = await ops.start(ops.config(await ops.upstream(), server={"handshake_timeout": 0.5}))
    before = await scrape(ip.admin_addr)
    assert all(before.get("mtls_proxy_tls_handshake_failures_total", reason=r) == 0 for r in HANDSHAKE_REASONS)
    if how == "client":
        await _connect_and_read(ip.port, client_ctx(ops.pki, what))
    else:
        await _raw_tcp(ip.port, what, close_after=how == "tcp")

    async def counted() -> Any:
        s = await scrape(ip.admin_addr)
        return s if s.get("mtls_proxy_tls_handshake_failures_total", reason=reason) else None

    after = await eventually(counted)
    assert {r: after.get("mtls_proxy_tls_handshake_failures_total", reason=r) for r in HANDSHAKE_REASONS} == {
        r: (1 if r == reason else 0) for r in HANDSHAKE_REASONS}
    assert after.get("mtls_proxy_requests_total", method="GET", status="200", rule="partner-a") == 0
    # ... and the proxy still serves a good client
    assert (await one_request(ip.port, client_ctx(ops.pki), get("/ok", extra=CLOSE))).status == 200


async def _reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.transport.abort()


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(30)


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 2000 What\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(1)


UPSTREAM_CASES = [("connect", 502), ("tls", 502), ("closed", 502), ("timeout", 504), ("protocol", 502)]


@pytest.mark.parametrize(("kind", "status"), UPSTREAM_CASES, ids=[k for k, _ in UPSTREAM_CASES])
async def test_upstream_failures_are_counted_by_kind(ops: Ops, kind: str, status: int) -> None:
    if kind == "connect":
        port = free_port()
    elif kind == "tls":
        port = await ops.upstream("wrong_name")  # certificate not valid for api.test
    else:
        handler = {"closed": _reset_after_request, "timeout": _never_answer, "protocol": _garbage}[kind]
        port = (await ops.scripted(handler)).port
    ip = await ops.start(ops.config(port, upstream={"read_timeout": 0.5, "connect_timeout": 2.0}))
    resp = await one_request(ip.port, client_ctx(ops.pki), get("/x", extra=CLOSE))
    assert resp.status == status, resp.body
    s = await scrape(ip.admin_addr)
    counts = {dict(k)["kind"]: v for k, v in s.series("mtls_proxy_upstream_errors_total").items() if v}
    assert counts == {kind: 1}
    assert s.get("mtls_proxy_requests_total", method="GET", status=str(status), rule="partner-a") == 1


async def test_connections_active_and_total_follow_open_connections(ops: Ops) -> None:
    ip = await ops.start(ops.config(await ops.upstream()))
    clients = [await ops.client(ip.port) for _ in range(3)]
    for c in clients:
        assert (await c.request(get("/k"))).status == 200  # keep-alive: the connections stay open
    s = await scrape(ip.admin_addr)
    assert (s.get("mtls_proxy_connections_active"), s.get("mtls_proxy_connections_total")) == (3, 3)
    for c in clients[:2]:
        await c.close()

    async def one_left() -> bool:
        return (await scrape(ip.admin_addr)).get("mtls_proxy_connections_active") == 1

    await eventually(one_left)
    assert (await scrape(ip.admin_addr)).get("mtls_proxy_connections_total") == 3
    await clients[2].close()


def _cn(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


async def test_cert_expiry_is_the_loaded_notafter_and_crl_next_update(ops: Ops) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream(), server={"client_ca": str(ops.pki.client_ca),
                                                                   "crl": str(ops.pki.crl)}))
    s = await scrape(admin_addr(proc))
    leaf = x509.load_pem_x509_certificates(ops.pki.server_cert.read_bytes())[0]
    cas = x509.load_pem_x509_certificates(ops.pki.client_ca.read_bytes())
    crl = x509.load_pem_x509_crl(ops.pki.crl.read_bytes())
    expiry = {dict(k)["cert"]: v for k, v in s.series("mtls_proxy_cert_expiry_timestamp_seconds").items()}
    assert expiry["server"] == leaf.not_valid_after_utc.timestamp()
    self_signed = ops.pki.clients["self_signed"].leaf
    assert expiry["client_ca:partner-selfsigned"] == self_signed.not_valid_after_utc.timestamp()
    assert len([k for k in expiry if k.startswith("client_ca:")]) == len(cas) == 2
    next_update = crl.next_update_utc
    assert next_update is not None
    crls = [v for k, v in expiry.items() if k.startswith("crl:")]
    assert crls == [next_update.timestamp()]
    assert next_update > dt.datetime.now(dt.timezone.utc)
