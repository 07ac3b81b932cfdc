"""proxy.wire.http1: strict request and response head parsing, as byte tables (chunked coding: test_chunked)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire import http1
from proxy.errors import (
    BadRequest,
    ExpectationFailed,
    HeadersTooLarge,
    NotImplementedCoding,
    UpstreamProtocolError,
    UriTooLong,
    VersionNotSupported,
)
from proxy.wire.headers import SPOOFABLE


def req(*header_lines: bytes, line: bytes = b"GET /a?b=c HTTP/1.1") -> bytes:
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in header_lines) + b"\r\n"


def test_simple_get() -> None:
    h = http1.parse_request_head(req(b"Host: x", b"Accept: */*", b"X-Custom:  v  "), SPOOFABLE)
    assert h.method == "GET"
    assert h.target == b"/a?b=c"
    assert h.path == "/a" and h.query == b"?b=c"
    assert h.http11 and h.keep_alive
    assert h.content_length is None and not h.chunked and not h.has_body
    # end-to-end lines are forwarded raw (byte-exact), Host is replaced by the proxy
    assert h.fields == b"Accept: */*\r\nX-Custom:  v  \r\n"


@pytest.mark.parametrize("head, exc, message", [
    (req(b"Host: x", b"Content-Length: 5", b"Transfer-Encoding: chunked"), BadRequest, "both"),  # CL+TE
    (req(b"Host: x", b"Transfer-Encoding: chunked", b"Content-Length: 5"), BadRequest, "both"),  # TE+CL
    (req(b"Host: x", b"Content-Length: 5", b"Content-Length: 5"), BadRequest, "duplicate"),
    (req(b"Host: x", b"Content-Length: 5, 5"), BadRequest, "Content-Length"),
    (req(b"Host: x", b"Content-Length: -1"), BadRequest, "Content-Length"),
    (req(b"Host: x", b"Content-Length: 0x10"), BadRequest, "Content-Length"),
    (req(b"Host: x", b"Content-Length: +5"), BadRequest, "Content-Length"),
    (req(b"Host: x", b"X-A: 1", b" folded"), BadRequest, "folding"),  # obs-fold
    (req(b"Host: x", b"X-A : 1"), BadRequest, "whitespace"),  # whitespace before colon
    (req(b"Host: x", b"X-A\t: 1"), BadRequest, "whitespace"),
    (req(b"Host: x", b"X-A: a\x00b"), BadRequest, "invalid character"),  # NUL
    (req(b"Host: x", b"X-A: a\x01b"), BadRequest, "invalid character"),
    (req(b"Host: x", b"X-A: a\rb"), BadRequest, "CR or LF"),
    (req(b"Host: x", b"NoColon"), BadRequest, "colon"),
    (req(b"Host: x", b"B@d: 1"), BadRequest, "header name"),
    (req(), BadRequest, "Host"),  # HTTP/1.1 without Host
    (req(b"Host: a", b"Host: b"), BadRequest, "Host"),
    (req(b"Host: x", line=b"GET  /a HTTP/1.1"), BadRequest, "request line"),
    (req(b"Host: x", line=b"GET /a HTTP/1.1 "), BadRequest, "request line"),
    (req(b"Host: x", line=b"GET http://evil/a HTTP/1.1"), BadRequest, "origin-form"),
    (req(b"Host: x", line=b"GET * HTTP/1.1"), BadRequest, "origin-form"),
    (req(b"Host: x", line=b"GET /a#frag HTTP/1.1"), BadRequest, "origin-form"),
    (req(b"Host: x", line=b"GET /a\x7f HTTP/1.1"), BadRequest, "origin-form"),
    (req(b"Host: x", line=b"G(T /a HTTP/1.1"), BadRequest, "method"),
    (req(b"Host: x", line=b"GET /a HTTP/2.0"), VersionNotSupported, "not supported"),
    (req(b"Host: x", line=b"GET /a HTTP/1.1x"), BadRequest, "request line"),
    (req(b"Host: x", line=b"GET /a http/1.1"), BadRequest, "request line"),
    (req(b"Host: x", b"Transfer-Encoding: gzip, chunked"), NotImplementedCoding, "unsupported"),
    (req(b"Host: x", b"Transfer-Encoding: xchunked"), BadRequest, "final"),
    (req(b"Host: x", b"Transfer-Encoding: chunked, identity"), BadRequest, "final"),
    (req(b"Host: x", b"Transfer-Encoding: identity"), BadRequest, "final"),
    (req(b"Host: x", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"), BadRequest, "more than once"),
    (req(b"Host: x", b"Transfer-Encoding: chunked,"), BadRequest, "final"),
    (req(b"Transfer-Encoding: chunked", line=b"POST / HTTP/1.0"), BadRequest, "HTTP/1.0"),
    (req(b"Host: x", b"Expect: 200-ok"), ExpectationFailed, "100-continue"),
])
def test_refused_heads(head: bytes, exc: type[Exception], message: str) -> None:
    with pytest.raises(exc) as info:
        http1.parse_request_head(head, SPOOFABLE)
    assert message.lower() in str(info.value).lower()


@pytest.mark.parametrize("te", [b"chunked", b"Chunked", b"CHUNKED", b" chunked "])
def test_chunked_coding_name_is_case_insensitive(te: bytes) -> None:
    h = http1.parse_request_head(req(b"Host: x", b"Transfer-Encoding:" + te), SPOOFABLE)
    assert h.chunked and h.has_body
    assert b"transfer-encoding" not in h.fields.lower()


def test_lines_before_and_after_cut_ones_are_kept_exactly() -> None:
    h = http1.parse_request_head(req(b"Accept: */*", b"Host: x", b"Keep-Alive: 5", b"X-Last: z"), SPOOFABLE)
    assert h.fields == b"Accept: */*\r\nX-Last: z\r\n"
    r = http1.parse_response_head(resp(b"Server: s", b"Connection: keep-alive", b"Content-Length: 0", b"X-Z: 1"))
    assert r.fields == b"Server: s\r\nContent-Length: 0\r\nX-Z: 1\r\n"


def test_a_single_header_named_in_connection_is_dropped() -> None:
    h = http1.parse_request_head(req(b"Host: x", b"Connection: X-Hop", b"X-Hop: 1", b"X-Kept: yes"), SPOOFABLE)
    assert h.fields == b"X-Kept: yes\r\n" and h.keep_alive
    r = http1.parse_response_head(resp(b"Connection: X-Hop", b"X-Hop: 1", b"X-Kept: yes"))
    assert r.fields == b"X-Kept: yes\r\n" and r.keep_alive


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    h = http1.parse_request_head(req(
        b"Host: x", b"Connection: keep-alive, X-Secret-Hop", b"Keep-Alive: timeout=5", b"Proxy-Connection: x",
        b"TE: trailers", b"Trailer: X-T", b"Upgrade: websocket", b"Proxy-Authorization: Basic Zm9v",
        b"Proxy-Authenticate: Basic", b"X-Secret-Hop: 1", b"X-Kept: yes"), SPOOFABLE)
    assert h.fields == b"X-Kept: yes\r\n"


@pytest.mark.parametrize("name", [
    b"X-Client-Cert-Subject", b"x-client-cert-fingerprint", b"X-Client-Cert-Serial", b"X-Forwarded-Client-Cert",
    b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Client-Vpce-Id", b"x-apigw-api-id", b"Forwarded",
    b"X_Client_Cert_Subject", b"x_forwarded_for", b"X-Client_Cert-Fingerprint", b"X_FORWARDED_CLIENT_CERT",
    b"Content_Length", b"Transfer_Encoding", b"Host_",
])
def test_spoofable_identity_headers_and_underscore_twins_are_removed(name: bytes) -> None:
    h = http1.parse_request_head(req(b"Host: x", name + b": spoofed", b"X-Ok: 1"), SPOOFABLE)
    if name == b"Host_":
        assert h.fields == b"Host_: spoofed\r\nX-Ok: 1\r\n"  # not a twin of anything: kept
    else:
        assert h.fields == b"X-Ok: 1\r\n"


def test_content_length_body_and_keep_alive_rules() -> None:
    h = http1.parse_request_head(req(b"Host: x", b"Content-Length: 12", line=b"POST /u HTTP/1.1"))
    assert h.content_length == 12 and h.has_body and h.fields == b"Content-Length: 12\r\n"
    # up to 18 digits (below 2**63); a 19th is refused before int() sees it, in both directions
    assert http1.parse_request_head(req(b"Host: x", b"Content-Length: " + b"9" * 18)).content_length == 10**18 - 1
    with pytest.raises(BadRequest, match="Content-Length"):
        http1.parse_request_head(req(b"Host: x", b"Content-Length: " + b"1" * 19))
    assert http1.parse_response_head(resp(b"Content-Length: " + b"9" * 18)).content_length == 10**18 - 1
    with pytest.raises(UpstreamProtocolError, match="Content-Length"):
        http1.parse_response_head(resp(b"Content-Length: " + b"1" * 19))
    assert not http1.parse_request_head(req(b"Host: x", b"Connection: close")).keep_alive
    assert not http1.parse_request_head(req(line=b"GET / HTTP/1.0")).keep_alive
    h10 = http1.parse_request_head(req(b"Connection: Keep-Alive", line=b"GET / HTTP/1.0"))
    assert h10.keep_alive and not h10.http11


def test_expect_continue_only_with_a_body() -> None:
    h = http1.parse_request_head(req(b"Host: x", b"Expect: 100-continue", b"Content-Length: 3"))
    assert h.expect_continue
    h = http1.parse_request_head(req(b"Host: x", b"Content-Length: 3", line=b"POST / HTTP/1.1"))
    assert not h.expect_continue  # a body alone is no reason to send 100 Continue
    h = http1.parse_request_head(req(b"Host: x", b"Expect: 100-Continue"))
    assert not h.expect_continue
    assert b"expect" not in h.fields.lower()  # never forwarded upstream


def test_leading_empty_lines_are_ignored() -> None:
    assert http1.parse_request_head(b"\r\n\r\n" + req(b"Host: x")).method == "GET"


def test_find_head_end_limits() -> None:
    assert http1.find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n") == -1
    assert http1.find_head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest") == len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(BadRequest, match="bare LF"):
        http1.find_head_end(b"GET / HTTP/1.1\nHost: x\n\n")
    with pytest.raises(UriTooLong):
        http1.find_head_end(b"GET /" + b"a" * (http1.MAX_REQUEST_LINE + 10))
    with pytest.raises(HeadersTooLarge):
        http1.find_head_end(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 20000)
    with pytest.raises(HeadersTooLarge):
        http1.parse_request_head(req(b"Host: x", *[b"X-%d: 1" % i for i in range(http1.MAX_HEADERS + 1)]))


def test_find_head_end_waits_for_a_partial_request_line() -> None:
    assert http1.find_head_end(b"GET /ord") == -1
    assert http1.find_head_end(b"GET /" + b"a" * (http1.MAX_REQUEST_LINE - 5)) == -1  # exactly the longest line


def test_find_head_end_names_an_endless_request_line_over_the_head_limit() -> None:
    with pytest.raises(UriTooLong):  # not 431: the request line alone is the problem
        http1.find_head_end(b"GET /" + b"a" * (http1.MAX_HEAD + 10))


def test_find_head_end_limit_is_inclusive() -> None:
    line = b"GET / HTTP/1.1\r\n"
    head = line + b"X-A: " + b"b" * (100 - len(line) - 7) + b"\r\n"
    assert len(head) == 100
    assert http1.find_head_end(head, limit=100) == -1  # at the limit: still waiting for the blank line
    with pytest.raises(HeadersTooLarge):
        http1.find_head_end(head + b"X", limit=100)
    assert http1.find_head_end(head[:-2] + b"\r\n\r\n", limit=100) == 102  # a complete head of limit bytes


def test_uri_too_long_in_complete_head() -> None:
    with pytest.raises(UriTooLong):
        http1.parse_request_head(req(b"Host: x", line=b"GET /" + b"a" * http1.MAX_REQUEST_LINE + b" HTTP/1.1"))


def test_header_count_limit_is_inclusive() -> None:
    fields = [b"X-%d: 1" % i for i in range(http1.MAX_HEADERS - 1)]
    assert http1.parse_request_head(req(b"Host: x", *fields)).fields.count(b"\r\n") == http1.MAX_HEADERS - 1


def test_request_line_length_limit_is_inclusive() -> None:
    line = b"GET /" + b"a" * (http1.MAX_REQUEST_LINE - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(line) == http1.MAX_REQUEST_LINE
    assert http1.parse_request_head(req(b"Host: x", line=line)).method == "GET"
    with pytest.raises(UriTooLong):
        http1.parse_request_head(req(b"Host: x", line=line.replace(b"GET /", b"GET /a")))


def test_malformed_over_long_request_line_is_uri_too_long() -> None:
    """The cold path that explains a refused request line puts the length check first."""
    line = b"GET /a b" + b"c" * http1.MAX_REQUEST_LINE + b" HTTP/1.1"
    with pytest.raises(UriTooLong):
        http1.parse_request_head(req(b"Host: x", line=line))
    with pytest.raises(BadRequest, match="malformed"):
        http1.parse_request_head(req(b"Host: x", line=b"GET /a b HTTP/1.1"))


def test_extension_method_is_kept_as_sent() -> None:
    h = http1.parse_request_head(req(b"Host: x", line=b"PROPFIND /dav HTTP/1.1"))
    assert h.method == "PROPFIND" and h.target == b"/dav"


def test_http10_with_two_hosts_is_refused() -> None:
    with pytest.raises(BadRequest, match="more than one Host"):
        http1.parse_request_head(req(b"Host: a", b"Host: b", line=b"GET / HTTP/1.0"))
    assert http1.parse_request_head(req(b"Host: a", line=b"GET / HTTP/1.0")).method == "GET"


@given(st.binary(max_size=300))
def test_request_parser_only_raises_proxy_errors(data: bytes) -> None:
    from proxy.errors import ProxyError
    try:
        end = http1.find_head_end(data)
        if end > 0:
            http1.parse_request_head(data[:end], SPOOFABLE)
    except ProxyError:
        pass


def resp(*lines: bytes, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    return status + b"\r\n" + b"".join(ln + b"\r\n" for ln in lines) + b"\r\n"


def test_response_heads() -> None:
    r = http1.parse_response_head(resp(b"Content-Length: 3", b"Connection: keep-alive", b"X-A: 1"))
    assert (r.status, r.reason, r.content_length, r.chunked, r.keep_alive) == (200, b"OK", 3, False, True)
    assert r.fields == b"Content-Length: 3\r\nX-A: 1\r\n"
    r = http1.parse_response_head(resp(b"Transfer-Encoding: chunked", status=b"HTTP/1.1 404"))
    assert r.status == 404 and r.chunked and r.reason == b""
    assert not http1.parse_response_head(resp(b"Connection: close")).keep_alive
    assert not http1.parse_response_head(resp(status=b"HTTP/1.0 200 OK")).keep_alive
    # identical duplicate Content-Length is tolerated (RFC 9110 §8.6) and forwarded once
    r = http1.parse_response_head(resp(b"Content-Length: 3", b"Content-Length: 3"))
    assert r.fields == b"Content-Length: 3\r\n"
    # many fields: up to MAX_HEADERS pass (a long head alone is no reason to refuse), one more is refused
    many = [b"X-%d: 1" % i for i in range(http1.MAX_HEADERS - 1)]
    assert http1.parse_response_head(resp(b"X-Long: " + b"v" * 2000, *many)).fields.count(b"\r\n") == 100
    with pytest.raises(UpstreamProtocolError, match="more than"):
        http1.parse_response_head(resp(*many, b"X-A: 1", b"X-B: 2"))
    # a head with nothing to remove is forwarded as it came
    r = http1.parse_response_head(resp(b"X-A: 1", b"Content-Type: text/plain"))
    assert r.fields == b"X-A: 1\r\nContent-Type: text/plain\r\n" and r.content_length is None


@pytest.mark.parametrize("head", [
    resp(b"Content-Length: 3", b"Content-Length: 4"),
    resp(b"Content-Length: 3", b"Transfer-Encoding: chunked"),
    resp(b"Transfer-Encoding: gzip"),
    resp(b"Content-Length: x"),
    resp(b"X-A : 1"),
    resp(status=b"HTTP/1.1 2000 OK"),
    resp(status=b"HTTP/2 200 OK"),
    resp(status=b"garbage"),
    resp(b" folded"),
])
def test_bad_response_heads(head: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        http1.parse_response_head(head)


# -- the one-match fast path: the same decisions as the two checks it stands for ------------------------------
import re as _re  # noqa: E402

from proxy.wire import grammar  # noqa: E402

_BACKTRACKING_BLOCK = _re.compile(rb"(?:" + grammar.TCHAR + rb"+:" + grammar.FIELD_VALUE + rb"\r\n)*")
_PIECES = st.sampled_from([b"a", b"Host", b"X-1", b":", b" ", b"\t", b"\r\n", b"\r", b"\n", b"\x00", b"\x80", b"v",
                           b"\x7f", b"@", b"GET", b"/x", b"HTTP/1.1", b"HTTP/1.0", b"200", b"OK"])
_HEAD_LIKE = st.lists(_PIECES, max_size=40).map(b"".join)
_GOOD_LINES = st.sampled_from([b"Host: a\r\n", b"X-1:\tv v\r\n", b"a:\r\n", b"X-A: \x80\xff\r\n"])
_FIELDS_LIKE = st.lists(st.one_of(_GOOD_LINES, _GOOD_LINES, _GOOD_LINES, _HEAD_LIKE), max_size=6).map(b"".join)  # well-formed lines often enough that both outcomes are seen
_LINE_END = st.one_of(st.sampled_from([b" HTTP/1.1", b"a?b=c HTTP/1.0", b" OK", b""]), _HEAD_LIKE,
                      _HEAD_LIKE.map(lambda b: b + b" HTTP/1.1"))  # the rest of a request or status line


@given(_FIELDS_LIKE)
def test_possessive_field_lines_match_what_the_backtracking_pattern_matches(block: bytes) -> None:
    assert (grammar.HEADER_BLOCK.fullmatch(block) is None) == (_BACKTRACKING_BLOCK.fullmatch(block) is None)


@given(_LINE_END, _FIELDS_LIKE)
def test_one_fullmatch_accepts_exactly_the_heads_the_two_checks_accept(line: bytes, block: bytes) -> None:
    for whole, first_line, head in ((http1._REQUEST_HEAD, http1._REQUEST_LINE, b"GET /" + line),
                                    (http1._RESPONSE_HEAD, http1._STATUS_LINE_ONLY, b"HTTP/1.1 200" + line)):
        head = head + b"\r\n" + block + b"\r\n"
        m = first_line.match(head)
        apart = m is not None and _BACKTRACKING_BLOCK.fullmatch(head, m.start(4) + 2, len(head) - 2) is not None
        together = whole.fullmatch(head)
        assert (together is not None) == apart, head
        if together is not None:
            assert together.groups() == m.groups()  # the same line fields, the same start of the block


def test_a_parsed_head_has_every_slot_set() -> None:
    # The parsers build heads by slot stores (no __init__): a slot they forgot would raise AttributeError here.
    for h in (http1.parse_request_head(req(b"Host: a", b"Content-Length: 3")),
              http1.parse_response_head(resp(b"Content-Length: 3", b"Connection: close")),
              http1.parse_response_head(resp(b"Connection: x-a", b"X-A: 1"))):
        assert all(hasattr(h, name) for name in type(h).__slots__), [n for n in type(h).__slots__ if not hasattr(h, n)]
