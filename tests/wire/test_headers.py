"""headers: the per-connection identity block (contents and order), the upstream block (Host, x-apigw-api-id),
request and response head assembly as exact bytes, and the SPOOFABLE set covering every header the proxy adds."""

from __future__ import annotations

import pytest

from proxy.wire import http1
from proxy.config import Address, UpstreamConfig
from proxy.wire.headers import (
    CHUNKED_LINE,
    CLOSE_LINE,
    KEEP_ALIVE_LINE,
    SPOOFABLE,
    connection_block,
    request_head,
    response_head,
    upstream_block,
)
from proxy.wire.client_cert import rfc9440_lines
from proxy.identity import Identity

IDENTITY = Identity(
    subject="CN=client-a,O=Partner\\, Inc.", common_names=("client-a",), san_dns=("a.partner.test",), san_uri=(),
    serial="1F2E3D", fingerprint="0f" * 32, not_after=2_000_000_000.0,
    xfcc='Hash=' + "0f" * 32 + ';Subject="CN=client-a,O=Partner\\, Inc."', thumbprint="Dw8" * 14 + "8")


def upstream(**changes: object) -> UpstreamConfig:
    values: dict[str, object] = {"url": "https://api.test/prod", "scheme": "https", "host": "api.test", "port": 443,
                                 "base_path": "/prod"}
    values.update(changes)
    return UpstreamConfig(**values)  # type: ignore[arg-type]


def names(block: bytes) -> list[bytes]:
    assert block.endswith(b"\r\n")
    return [line.split(b":", 1)[0] for line in block.split(b"\r\n")[:-1]]


# ---- upstream block -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, expected", [
    ({}, b"Host: api.test\r\n"),
    ({"api_id": "a1b2c3d4e5"}, b"Host: api.test\r\nx-apigw-api-id: a1b2c3d4e5\r\n"),
    ({"port": 8443}, b"Host: api.test:8443\r\n"),
    ({"port": 8443, "api_id": "abc"}, b"Host: api.test:8443\r\nx-apigw-api-id: abc\r\n"),
    ({"host": "::1", "port": 8443}, b"Host: [::1]:8443\r\n"),
    ({"host": "::1"}, b"Host: [::1]\r\n"),
    # connect_to dials somewhere else (a VPC endpoint name): Host still names the API
    ({"connect_to": Address("vpce-0abc-xyz.execute-api.eu-west-1.vpce.amazonaws.com", 443), "api_id": "abc"},
     b"Host: api.test\r\nx-apigw-api-id: abc\r\n"),
    ({"connect_to": Address("127.0.0.1", 9443)}, b"Host: api.test\r\n"),
], ids=["plain", "api-id", "port", "port-api-id", "ipv6-port", "ipv6", "connect-to-vpce", "connect-to-port"])
def test_upstream_block(changes: dict[str, object], expected: bytes) -> None:
    assert upstream_block(upstream(**changes)) == expected


# ---- connection block ---------------------------------------------------------------------------------------


def test_connection_block_contents_and_order() -> None:
    up = upstream_block(upstream(api_id="abc"))
    block = connection_block(up, IDENTITY, "192.0.2.7", None)
    assert block == (
        b"Host: api.test\r\n"
        b"x-apigw-api-id: abc\r\n"
        b"X-Client-Cert-Subject: CN=client-a,O=Partner\\, Inc.\r\n"
        b"X-Client-Cert-Fingerprint: " + b"0f" * 32 + b"\r\n"
        b"X-Client-Cert-Thumbprint: " + b"Dw8" * 14 + b"8\r\n"
        b"X-Client-Cert-Serial: 1F2E3D\r\n"
        b"X-Forwarded-Client-Cert: Hash=" + b"0f" * 32 + b';Subject="CN=client-a,O=Partner\\, Inc."\r\n'
        b"X-Forwarded-For: 192.0.2.7\r\n"
        b"X-Forwarded-Proto: https\r\n")


def test_connection_block_names_the_vpc_endpoint_last_when_known() -> None:
    block = connection_block(b"Host: api.test\r\n", IDENTITY, "2001:db8::7", "vpce-0123456789abcdef0")
    assert names(block) == [b"Host", b"X-Client-Cert-Subject", b"X-Client-Cert-Fingerprint",
                            b"X-Client-Cert-Thumbprint", b"X-Client-Cert-Serial", b"X-Forwarded-Client-Cert",
                            b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Client-Vpce-Id"]
    assert block.endswith(b"X-Forwarded-For: 2001:db8::7\r\nX-Forwarded-Proto: https\r\n"
                          b"X-Client-Vpce-Id: vpce-0123456789abcdef0\r\n")


@pytest.mark.parametrize("vpce", [None, ""])
def test_no_vpce_header_without_an_endpoint_id(vpce: str | None) -> None:
    assert b"Vpce" not in connection_block(b"Host: api.test\r\n", IDENTITY, "10.0.0.1", vpce)


def test_every_added_header_except_host_is_spoofable() -> None:
    """A client can never pre-set a header the proxy adds: the parser drops every SPOOFABLE name first."""
    block = connection_block(upstream_block(upstream(api_id="abc")), IDENTITY, "10.0.0.1", "vpce-1",
                             rfc9440_lines(b"leaf", (b"intermediate",)))
    added = {n.lower() for n in names(block)} - {b"host"}
    assert added <= SPOOFABLE
    assert added == {b"x-apigw-api-id", b"x-client-cert-subject", b"x-client-cert-fingerprint",
                     b"x-client-cert-thumbprint", b"x-client-cert-serial", b"x-forwarded-client-cert",
                     b"x-forwarded-for", b"x-forwarded-proto", b"x-client-vpce-id", b"client-cert", b"client-cert-chain"}


def test_rfc9440_lines_come_last_and_only_when_given() -> None:
    plain = connection_block(b"Host: api.test\r\n", IDENTITY, "10.0.0.1", None)
    assert b"\r\nClient-Cert:" not in plain and b"\r\nClient-Cert-Chain:" not in plain
    lines = rfc9440_lines(b"leaf", ())
    assert connection_block(b"Host: api.test\r\n", IDENTITY, "10.0.0.1", None, lines) == plain + lines


def test_spoofable_also_covers_other_forwarding_headers_and_is_lowercase() -> None:
    assert {b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-port"} <= SPOOFABLE
    assert all(n == n.lower() and b"_" not in n and n.isascii() for n in SPOOFABLE)


@pytest.mark.parametrize("name", sorted(SPOOFABLE))
def test_parser_drops_each_spoofable_name_in_any_spelling(name: bytes) -> None:
    variants = [name, name.upper(), name.title(), name.replace(b"-", b"_")]
    head = (b"GET / HTTP/1.1\r\nHost: x\r\nKeep: 1\r\n"
            + b"".join(v + b": forged\r\n" for v in variants) + b"Also: 2\r\n\r\n")
    req = http1.parse_request_head(head, SPOOFABLE)
    assert req.fields == b"Keep: 1\r\nAlso: 2\r\n"


# ---- head assembly --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked, expected", [
    (False, b"POST /prod/x?y=1 HTTP/1.1\r\nAccept: */*\r\nX-A: 1\r\nHost: api.test\r\nX-B: 2\r\n\r\n"),
    (True, b"POST /prod/x?y=1 HTTP/1.1\r\nAccept: */*\r\nX-A: 1\r\nHost: api.test\r\nX-B: 2\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"),
])
def test_request_head(chunked: bool, expected: bytes) -> None:
    head = request_head("POST", b"/prod/x?y=1", b"Accept: */*\r\nX-A: 1\r\n", b"Host: api.test\r\nX-B: 2\r\n",
                        chunked)
    assert head == expected


def test_request_head_without_client_fields_is_well_formed() -> None:
    head = request_head("GET", b"/", b"", b"Host: api.test\r\n", False)
    assert head == b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n"
    req = http1.parse_request_head(head)  # what we send parses under our own strict parser
    assert (req.method, req.target, req.http11, req.content_length, req.chunked) == ("GET", b"/", True, None, False)


def test_request_head_round_trips_through_the_parser() -> None:
    client = b"PUT /p HTTP/1.0\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\nContent-Length: 3\r\nX-Keep: k\r\n\r\n"
    req = http1.parse_request_head(client, SPOOFABLE)
    block = connection_block(upstream_block(upstream()), IDENTITY, "10.0.0.1", None)
    out = http1.parse_request_head(request_head(req.method, req.target, req.fields, block, req.chunked))
    assert out.http11  # always HTTP/1.1 upstream
    assert out.content_length == 3
    assert b"6.6.6.6" not in out.fields and b"evil" not in out.fields
    assert b"X-Forwarded-For: 10.0.0.1\r\n" in out.fields and b"X-Keep: k\r\n" in out.fields


@pytest.mark.parametrize("status, reason, extra, expected", [
    (200, b"OK", b"", b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"),
    (200, b"OK", CLOSE_LINE, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n"),
    (201, b"Created", KEEP_ALIVE_LINE, b"HTTP/1.1 201 Created\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                                       b"Connection: keep-alive\r\n\r\n"),
    (200, b"OK", CHUNKED_LINE + CLOSE_LINE, b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                                            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"),
    (599, b"", b"", b"HTTP/1.1 599 \r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"),
    (100, b"Continue", b"", b"HTTP/1.1 100 Continue\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"),
    (799, b"Odd", b"", b"HTTP/1.1 799 Odd\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n"),
], ids=["plain", "close", "keep-alive", "chunked-close", "empty-reason", "1xx", "beyond-599"])
def test_response_head(status: int, reason: bytes, extra: bytes, expected: bytes) -> None:
    assert response_head(status, reason, b"Content-Type: text/plain\r\nContent-Length: 2\r\n", extra) == expected


@pytest.mark.parametrize("status", [100, 199, 200, 204, 304, 404, 502, 599, 600, 999])  # the parser allows 3 digits
def test_response_status_line_parses_back(status: int) -> None:
    head = response_head(status, b"Reason Phrase", b"Content-Length: 0\r\n", b"")
    resp = http1.parse_response_head(head)
    assert (resp.status, resp.reason) == (status, b"Reason Phrase")


def test_framing_lines() -> None:
    assert (CHUNKED_LINE, CLOSE_LINE, KEEP_ALIVE_LINE) == (
        b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Connection: keep-alive\r\n")
