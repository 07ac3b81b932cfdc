"""Microbenchmarks (pytest-benchmark) of the pure functions on mtls-proxy's per-request and per-connection path.

Owns: timing, without sockets or TLS, the policy decision (normalize_path + ConnectionPolicy.decide), the request
head rewrite (http1.parse_request_head + headers.request_head), the response head (parse_response_head +
response_head), identity parsing (identity.parse_identity), PROXY v2 parsing (proxy_protocol.parse) and the
per-connection set-up that a full handshake pays once (for_connection + connection_block + connection_prefix).

Must not: assert anything about time (the machine is shared and noisy; compare runs with --benchmark-compare
instead), or live under tests/: a plain ``pytest`` (testpaths = ["tests"]) and CI never collect this file.
Every benchmark checks the value the function returned, so a fast path that breaks fails here instead of
looking fast.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m pytest bench/micro -q                        # table of µs per call
    .venv/bin/python -m pytest bench/micro -q --benchmark-save=base  # then --benchmark-compare=0001
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.wire import http1, proxy_protocol
from proxy.accesslog import connection_prefix
from proxy.config import AllowRule, load
from proxy.dev.devpki import init_dev_pki
from proxy.wire.headers import SPOOFABLE, connection_block, request_head, response_head, upstream_block
from proxy.identity import Identity, parse_identity
from proxy.policy import ConnectionPolicy, Policy, normalize_path

pytest.importorskip("pytest_benchmark", reason="pip install -e '.[bench]'")

RULES = (
    AllowRule(name="reports", san_dns=("*.partner-b.test",), paths=("/reports/**",)),
    AllowRule(name="orders", subject_cn=("client",), methods=("GET", "POST"), paths=("/orders/**", "/v1/*/items")),
    AllowRule(name="health", san_uri=("spiffe://dev.test/*",), methods=("GET",), paths=("/health",)),
)


# --- fixtures: real certificates from the project's own dev PKI -----------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_dev_pki(directory, clients=["partner-b"])
    return directory


def der_of(pki: Path, stem: str) -> bytes:
    return x509.load_pem_x509_certificate((pki / f"{stem}.crt").read_bytes()).public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def identity(pki: Path) -> Identity:
    return parse_identity(der_of(pki, "client"))


@pytest.fixture(scope="module")
def connection_policy(identity: Identity) -> ConnectionPolicy:
    return Policy.compile(RULES, allow_all_verified=False).for_connection(identity, None)


@pytest.fixture(scope="module")
def block(identity: Identity) -> bytes:
    cfg = load(None, {"MTLS_PROXY_SERVER_CERT": "x", "MTLS_PROXY_SERVER_KEY": "x", "MTLS_PROXY_SERVER_CLIENT_CA": "x",
                      "MTLS_PROXY_UPSTREAM_URL": "https://abc123.execute-api.eu-west-1.amazonaws.com",
                      "MTLS_PROXY_ALLOW_ALL_VERIFIED": "true"})
    return connection_block(upstream_block(cfg.upstream), identity, "10.1.2.3", "vpce-0a1b2c3d4e5f60718")


# --- policy decision -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "allowed", "rule"), [
    ("GET", "/orders/123", True, "orders"),
    ("POST", "/v1/eu/items", True, "orders"),
    ("GET", "/orders/a%2Fb/%7Euser/../c", True, "orders"),  # percent-decoding and dot segments first
    ("DELETE", "/orders/123", False, None),
    ("GET", "/admin/users/1", False, None),
], ids=["allowed", "allowed-second-glob", "normalised-path", "method-denied", "path-denied"])
def test_policy_decide(benchmark: Any, connection_policy: ConnectionPolicy, method: str, path: str, allowed: bool,
                       rule: str | None) -> None:
    # connection.ClientConnection._start does exactly this per request.
    decision = benchmark(lambda: connection_policy.decide(method, normalize_path(path)))
    assert (decision.allowed, decision.rule) == (allowed, rule)


# --- request head rewrite --------------------------------------------------------------------------------------
WRK_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:28444\r\n\r\n"
SDK_HEAD = (b"POST /orders/42/lines?expand=true HTTP/1.1\r\nHost: api.partner.example\r\n"
            b"User-Agent: aws-sdk-java/2.25.0 Linux/6.1 OpenJDK_64-Bit_Server_VM/21\r\nAccept: application/json\r\n"
            b"Accept-Encoding: gzip, deflate\r\nContent-Type: application/json\r\nContent-Length: 512\r\n"
            b"X-Request-Id: 6f1c2e0a-7d44-4b8f-9a55-0c0b5d1e2f3a\r\nTraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-"
            b"00f067aa0ba902b7-01\r\nAuthorization: Bearer eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl\r\n"
            b"Connection: keep-alive\r\n\r\n")
SPOOF_HEAD = (b"GET /orders/1 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\nX-Client-Cert-Subject: CN=admin\r\n"
              b"x_forwarded_client_cert: Hash=00\r\nX-Apigw-Api-Id: other\r\nAccept: */*\r\n\r\n")


@pytest.mark.parametrize("head", [WRK_HEAD, SDK_HEAD, SPOOF_HEAD], ids=["wrk-minimal", "sdk-10-headers", "spoofing"])
def test_request_head_rewrite(benchmark: Any, block: bytes, head: bytes) -> None:
    def rewrite() -> bytes:
        req = http1.parse_request_head(head, SPOOFABLE)
        return request_head(req.method, req.target, req.fields, block, req.chunked)

    out = benchmark(rewrite)
    assert isinstance(out, bytes) and out.endswith(block + b"\r\n")
    assert b"6.6.6.6" not in out and b"CN=admin" not in out and b"other" not in out  # client copies dropped
    assert b"Connection:" not in out and out.startswith(head.split(b" ", 1)[0] + b" /")


# --- response head ---------------------------------------------------------------------------------------------
NGINX_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 22:00:00 GMT\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 207\r\nConnection: keep-alive\r\n\r\n")
APIGW_RESPONSE = (b"HTTP/1.1 201 Created\r\nDate: Wed, 25 Nov 2026 22:00:00 GMT\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\nx-amzn-RequestId: 0b4c1a2e-1111-2222-3333-444455556666\r\n"
                  b"x-amz-apigw-id: AbCdEfGhIjKlMnO=\r\nX-Amzn-Trace-Id: Root=1-65f0a1b2-0123456789abcdef01234567\r\n"
                  b"Connection: keep-alive\r\n\r\n")


@pytest.mark.parametrize(("head", "status"), [(NGINX_RESPONSE, 200), (APIGW_RESPONSE, 201)],
                         ids=["nginx-content-length", "apigw-chunked"])
def test_response_head(benchmark: Any, head: bytes, status: int) -> None:
    def parse_and_build() -> bytes:
        resp = http1.parse_response_head(head)
        extra = b"Transfer-Encoding: chunked\r\n" if resp.chunked else b""
        return response_head(resp.status, resp.reason, resp.fields, extra)

    out = benchmark(parse_and_build)
    assert isinstance(out, bytes) and out.startswith(b"HTTP/1.1 %d " % status) and out.endswith(b"\r\n\r\n")
    assert b"Connection:" not in out  # hop-by-hop: the proxy decides the client side's connection handling


# --- identity --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("stem", "cn"), [("client", "client"), ("partner-b", "partner-b")])
def test_identity_parse(benchmark: Any, pki: Path, stem: str, cn: str) -> None:
    der = der_of(pki, stem)
    ident = benchmark(parse_identity, der)
    assert ident.common_names == (cn,) and len(ident.fingerprint) == 64
    assert ident.san_dns == (f"{cn}.dev.test",)


def test_connection_setup(benchmark: Any, identity: Identity) -> None:
    """Once per full handshake (runtime.Runtime.peer without its cache): rules for this client, headers, log."""
    policy = Policy.compile(RULES, allow_all_verified=False)
    up = b"Host: abc123.execute-api.eu-west-1.amazonaws.com\r\n"

    def setup() -> tuple[ConnectionPolicy, bytes, str]:
        return (policy.for_connection(identity, None), connection_block(up, identity, "10.1.2.3", None),
                connection_prefix("10.1.2.3", None, identity.subject, identity.fingerprint))

    cp, blk, prefix = benchmark(setup)
    # The client certificate's CN matches "orders" and its SAN URI spiffe://dev.test/client matches "health".
    assert cp.rule_names == ("orders", "health") and b"X-Client-Cert-Subject: CN=client" in blk and '"client"' in prefix


# --- PROXY protocol v2 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("header", "src", "vpce"), [
    (proxy_protocol.build(("10.0.1.7", 40512), ("10.0.2.9", 443), vpce_id="vpce-0a1b2c3d4e5f60718"),
     "10.0.1.7", "vpce-0a1b2c3d4e5f60718"),
    (proxy_protocol.build(("fd00::7", 40512), ("fd00::9", 443)), "fd00::7", None),
    (proxy_protocol.build(local=True), None, None),
], ids=["ipv4-vpce-tlv", "ipv6", "local-health-check"])
def test_proxy_protocol_parse(benchmark: Any, header: bytes, src: str | None,
                              vpce: str | None) -> None:
    info = benchmark(proxy_protocol.parse, header)
    assert (info.src_addr, info.vpce_id) == (src, vpce)
