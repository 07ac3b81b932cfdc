"""End-to-end: the ``[[allow]]`` rules through the real proxy: deny unless a rule allows.

Owns: AND within a rule, OR across rules, deny by default, methods, path globs, SAN and fingerprint matching,
the 403 JSON body, "a refused request never reaches the upstream", dot-segment bypass attempts (matched after
normalisation, and the upstream receives the path that was matched), the query (never matched, forwarded
byte-exact) and ``allow_all_verified``.  The demo upstream echoes the raw target it received (``path``).

Rule-level semantics in depth (every glob corner) are unit-tested in tests/test_policy.py; here every case goes
through real TLS, the real parser and the real upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.e2e.kit import CountingUpstream, echo_of
from tests.harness import RawClient, Response, RunningProxy, client_ctx
from tests.pki import Pki

ProxyFactory = Callable[..., Awaitable[RunningProxy]]


async def ask(pki: Pki, rp: RunningProxy, name: str, method: str, target: str, body: bytes = b"") -> Response:
    """One request on a fresh connection, with the exact target bytes given."""
    client = await RawClient.connect(rp.port, client_ctx(pki, name))
    try:
        head = f"{method} {target} HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n".encode()
        if body or method in ("POST", "PUT", "PATCH"):
            head += b"Content-Length: %d\r\n" % len(body)
        return await client.request(head + b"\r\n" + body, head_request=method == "HEAD")
    finally:
        await client.close()


def last_rule(rp: RunningProxy) -> Any:
    return rp.access()[-1]["rule"]


# ---- AND within a rule, OR across rules, deny by default --------------------------------------------------
AND_RULE = [{"name": "orders-read", "subject_cn": ["client-a"], "methods": ["GET"], "paths": ["/orders/*"]}]


@pytest.mark.parametrize(("name", "method", "target", "status", "reason"), [
    ("good", "GET", "/orders/17", 200, None),
    ("good", "POST", "/orders/17", 403, "method_not_allowed"),  # identity and path match, method does not
    ("good", "GET", "/invoices/17", 403, "path_not_allowed"),  # identity and method match, path does not
    ("other", "GET", "/orders/17", 403, "no_rule_for_client"),  # method and path match, identity does not
])
async def test_every_field_of_a_rule_must_match(pki: Pki, auth_proxy: ProxyFactory,
                                                auth_upstream: CountingUpstream, name: str, method: str,
                                                target: str, status: int, reason: str | None) -> None:
    rp = await auth_proxy(rules=AND_RULE)
    resp = await ask(pki, rp, name, method, target)
    assert resp.status == status, resp.body
    if status == 200:
        assert auth_upstream.requests == [(method, "/prod" + target)]
        assert last_rule(rp) == "orders-read"
    else:
        assert resp.json()["reason"] == reason
        assert auth_upstream.requests == []


async def test_identity_fields_of_a_rule_are_anded(pki: Pki, auth_proxy: ProxyFactory,
                                                   auth_upstream: CountingUpstream) -> None:
    """CN of client-a and DNS SAN of client-b: no certificate has both, so nobody is allowed."""
    rp = await auth_proxy(rules=[{"name": "mixed", "subject_cn": ["client-a"], "san_dns": ["client-b.partner.test"]}])
    for name in ("good", "other"):
        resp = await ask(pki, rp, name, "GET", "/x")
        assert resp.status == 403 and resp.json()["reason"] == "no_rule_for_client", (name, resp.body)
    assert auth_upstream.requests == []


OR_RULES = [
    {"name": "a-orders", "subject_cn": ["client-a"], "paths": ["/orders/**"]},
    {"name": "a-invoices", "subject_cn": ["client-a"], "methods": ["GET"], "paths": ["/invoices/*"]},
    {"name": "b-anything", "subject_cn": ["client-b"]},
]


@pytest.mark.parametrize(("name", "method", "target", "rule"), [
    ("good", "GET", "/orders/1/lines/2", "a-orders"),
    ("good", "DELETE", "/orders/1", "a-orders"),
    ("good", "GET", "/invoices/9", "a-invoices"),
    ("good", "DELETE", "/invoices/9", None),  # only a-invoices covers the path, and not for DELETE
    ("good", "GET", "/admin", None),
    ("other", "PATCH", "/admin/anything", "b-anything"),
    ("rsa", "GET", "/orders/1", None),  # a verified certificate no rule names: denied by default
])
async def test_any_rule_may_allow(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream, name: str,
                                  method: str, target: str, rule: str | None) -> None:
    rp = await auth_proxy(rules=OR_RULES)
    resp = await ask(pki, rp, name, method, target)
    assert resp.status == (200 if rule else 403), resp.body
    assert last_rule(rp) == rule
    assert auth_upstream.requests == ([(method, "/prod" + target)] if rule else [])


# ---- globs: paths, SAN DNS, SAN URI; fingerprints ---------------------------------------------------------
@pytest.mark.parametrize(("target", "allowed"), [
    ("/v1/abc/items", True),
    ("/v1/abc/def/items", False),  # '*' stays inside one segment
    ("/v1/abc/items/x", False),
    ("/v1/items", False),
    ("/v1/abc%2Fdef/items", True),  # %2F is not a separator: one segment
    ("/v2", True),  # '**' matches zero segments
    ("/v2/", True),
    ("/v2/a/b/c/d", True),
    ("/v2x/a", False),
    ("/V2/a", False),  # paths are case-sensitive
    ("/files/report.pdf", True),
    ("/files/report.txt", False),
    ("/files/a/report.pdf", False),
])
async def test_path_globs(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream, target: str,
                          allowed: bool) -> None:
    rp = await auth_proxy(rules=[{"name": "globs", "subject_cn": ["client-a"],
                                  "paths": ["/v1/*/items", "/v2/**", "/files/*.pdf"]}])
    resp = await ask(pki, rp, "good", "GET", target)
    assert resp.status == (200 if allowed else 403), resp.body
    assert len(auth_upstream.requests) == (1 if allowed else 0)


@pytest.mark.parametrize(("field", "pattern", "allowed"), [
    ("san_dns", "client-a.partner.test", True),
    ("san_dns", "CLIENT-A.Partner.Test", True),  # DNS names compare case-insensitively
    ("san_dns", "*.partner.test", True),
    ("san_dns", "client-*.partner.test", True),
    ("san_dns", "*.test", False),  # '*' is one label
    ("san_dns", "**.test", True),
    ("san_dns", "client-b.partner.test", False),
    ("san_uri", "spiffe://partner-a/orders", True),
    ("san_uri", "spiffe://partner-a/*", True),
    ("san_uri", "spiffe://**", True),
    ("san_uri", "spiffe://partner-b/*", False),
    ("san_uri", "spiffe://partner-a/orders/*", False),
    ("san_uri", "SPIFFE://partner-a/orders", False),  # URIs are matched case-sensitively
])
async def test_san_globs(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream, field: str,
                         pattern: str, allowed: bool) -> None:
    rp = await auth_proxy(rules=[{"name": "by-san", field: [pattern]}])
    resp = await ask(pki, rp, "good", "GET", "/san")  # good: DNS client-a.partner.test, URI spiffe://partner-a/orders
    assert resp.status == (200 if allowed else 403), resp.body
    assert len(auth_upstream.requests) == (1 if allowed else 0)


def fingerprint_forms(fp: str) -> list[str]:
    pairs = [fp[i:i + 2] for i in range(0, len(fp), 2)]
    return [fp, fp.upper(), ":".join(pairs).upper(), ":".join(pairs)]


@pytest.mark.parametrize("form", range(4), ids=["lower", "upper", "colon-upper", "colon-lower"])
async def test_fingerprint_rule_in_any_form(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream,
                                            form: int) -> None:
    pinned = fingerprint_forms(pki.clients["good"].fingerprint)[form]
    rp = await auth_proxy(rules=[{"name": "pinned", "fingerprint_sha256": [pinned]}])
    assert (await ask(pki, rp, "good", "GET", "/pin")).status == 200
    # Same CN, other key: a pinned fingerprint is not a CN rule (other_ca_same_cn never gets this far).
    refused = await ask(pki, rp, "rsa", "GET", "/pin")
    assert refused.status == 403 and refused.json()["reason"] == "no_rule_for_client"
    assert auth_upstream.requests == [("GET", "/prod/pin")]
    assert last_rule(rp) is None and rp.access()[0]["rule"] == "pinned"


# ---- the 403 answer --------------------------------------------------------------------------------------
async def test_forbidden_body_names_reason_and_identity(pki: Pki, auth_proxy: ProxyFactory,
                                                        auth_upstream: CountingUpstream) -> None:
    rp = await auth_proxy(rules=AND_RULE)
    good = pki.clients["good"]
    body = b'{"order": 1}'
    resp = await ask(pki, rp, "good", "POST", "/orders/1", body)
    assert resp.status == 403
    assert resp.header("content-type") == "application/json"
    data = resp.json()
    assert data["error"] == "forbidden"
    assert data["reason"] == "method_not_allowed"
    assert data["subject"] == good.subject
    assert data["fingerprint"] == good.fingerprint
    assert isinstance(data.get("message"), str) and data["message"]
    assert auth_upstream.requests == []  # a refused request is never forwarded, body or not
    denied = rp.server.metrics.snapshot()["denied"]
    assert {k: v for k, v in denied.items() if v} == {"method_not_allowed": 1}


async def test_refused_requests_on_a_keep_alive_connection_never_reach_the_upstream(
        pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream) -> None:
    rp = await auth_proxy(rules=AND_RULE)
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        for target, status in [("/admin", 403), ("/orders/1", 200), ("/orders/1/../../admin", 403),
                               ("/orders/2", 200)]:
            resp = await client.request(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert resp.status == status, (target, resp.body)
    finally:
        await client.close()
    assert auth_upstream.requests == [("GET", "/prod/orders/1"), ("GET", "/prod/orders/2")]


# ---- dot segments: matched after normalisation; the upstream gets what was matched --------------------------
PUBLIC = [{"name": "public", "subject_cn": ["client-a"], "paths": ["/public/**"]}]


@pytest.mark.parametrize("target", [
    "/public/../admin",
    "/public/%2e%2e/admin",
    "/public/%2E%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/public/%2e./admin",
    "/public/./../admin",
    "/public/a/../../admin",
    "/public/%2e/%2e%2e/admin",
    "/public/..",
    "/public/%2e%2e",
    "/public/../admin?/public/x",
])
async def test_dot_segment_bypass_is_refused(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream,
                                             target: str) -> None:
    rp = await auth_proxy(rules=PUBLIC)
    resp = await ask(pki, rp, "good", "GET", target)
    assert resp.status == 403, resp.body
    assert resp.json()["reason"] == "path_not_allowed"
    assert auth_upstream.requests == []


@pytest.mark.parametrize(("target", "forwarded"), [
    ("/admin/../public/x", "/prod/public/x"),
    ("/public/a/./b/../c", "/prod/public/a/c"),
    ("/public/%2e%2e/public/x", "/prod/public/x"),
    ("/x/%2E%2e/public/y", "/prod/public/y"),
    ("/public/a/.%2e/b?q=/../z", "/prod/public/b?q=/../z"),
    # "..%2f" is one segment named "..%2f..." (%2F is not a separator), so it is no dot segment: byte-exact.
    ("/public/..%2fadmin", "/prod/public/..%2fadmin"),
    ("/public/..%2Fadmin", "/prod/public/..%2Fadmin"),
    ("/public/%2e%2e%2fadmin", "/prod/public/%2e%2e%2fadmin"),
    ("/public/%7Euser", "/prod/public/%7Euser"),  # nothing to remove: forwarded as sent
])
async def test_upstream_receives_the_normalised_path(pki: Pki, auth_proxy: ProxyFactory,
                                                     auth_upstream: CountingUpstream, target: str,
                                                     forwarded: str) -> None:
    rp = await auth_proxy(rules=PUBLIC)
    resp = await ask(pki, rp, "good", "GET", target)
    assert resp.status == 200, resp.body
    assert echo_of(resp.body).path == forwarded
    assert auth_upstream.requests == [("GET", forwarded)]


# ---- the query ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("query", [
    "?next=/admin/../x&a=%2e%2E&b=%2F&c=..%2f",
    "?",
    "?a=1&a=2&%41=%zz",
    "?/orders/*",
    "?q=%20+%2B;x=y",
])
async def test_query_is_forwarded_byte_exact_and_not_matched(pki: Pki, auth_proxy: ProxyFactory,
                                                             auth_upstream: CountingUpstream, query: str) -> None:
    rp = await auth_proxy(rules=AND_RULE)
    resp = await ask(pki, rp, "good", "GET", "/orders/1" + query)
    assert resp.status == 200, resp.body
    assert echo_of(resp.body).path == "/prod/orders/1" + query
    # The same query after a path no rule allows does not help.
    refused = await ask(pki, rp, "good", "GET", "/admin" + query)
    assert refused.status == 403
    assert auth_upstream.requests == [("GET", "/prod/orders/1" + query)]


# ---- allow_all_verified ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "rule"), [("good", "partner-a"), ("other", "allow_all_verified"),
                                            ("rsa", "allow_all_verified"), ("self_signed", "allow_all_verified")])
async def test_allow_all_verified(pki: Pki, auth_proxy: ProxyFactory, auth_upstream: CountingUpstream, name: str,
                                  rule: str) -> None:
    """Any verified client is allowed; explicit rules are tried first, so their names still show in the log."""
    rp = await auth_proxy(top={"allow_all_verified": True},
                          rules=[{"name": "partner-a", "subject_cn": ["client-a"]}])
    resp = await ask(pki, rp, name, "GET", "/any/where")
    assert resp.status == 200, resp.body
    assert last_rule(rp) == rule
    assert auth_upstream.requests == [("GET", "/prod/any/where")]


async def test_without_allow_all_verified_unknown_clients_are_denied(pki: Pki, auth_proxy: ProxyFactory,
                                                                    auth_upstream: CountingUpstream) -> None:
    rp = await auth_proxy(rules=[{"name": "partner-a", "subject_cn": ["client-a"]}])
    resp = await ask(pki, rp, "other", "GET", "/any/where")
    assert resp.status == 403 and resp.json()["reason"] == "no_rule_for_client"
    assert auth_upstream.requests == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_pipelined_request_behind_a_403_is_answered(pki: Pki, auth_proxy: ProxyFactory,
                                                         auth_upstream: CountingUpstream, method: str) -> None:
    """Both requests in one write: the refused one gets its 403 (without content for HEAD, RFC 9110 §9.3.2),
    the next one is still read and forwarded, and the responses stay in step (RFC 9112 §9.3.2)."""
    rp = await auth_proxy(rules=AND_RULE)
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        await client.send(f"{method} /admin HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                          + b"GET /orders/1 HTTP/1.1\r\nHost: x\r\n\r\n")
        refused = await client.read_response(head_request=method == "HEAD")
        assert refused.status == 403
        # For HEAD a JSON body here would be read as the next status line, and the read below would fail.
        allowed = await client.read_response()
        assert allowed.status == 200, allowed.raw_head + allowed.body
        assert echo_of(allowed.body).path == "/prod/orders/1"
    finally:
        await client.close()
    assert auth_upstream.requests == [("GET", "/prod/orders/1")]
