"""proxy.wire.grammar: ``tchar`` is exactly RFC 9110 §5.6.2 over all 256 byte values, the field-line shape
(RFC 9110 §5.5, RFC 9112 §5), and a reason phrase for every status the proxy answers with itself."""

from __future__ import annotations

import re
import string

import pytest

from proxy import errors
from proxy.wire.grammar import FIELD_VALUE, HEADER_BLOCK, REASON_PHRASES, TCHAR, TOKEN, reason_phrase

# RFC 9110 §5.6.2, spelled out independently of the module: the 15 symbols, DIGIT and ALPHA.
RFC_TCHAR = frozenset(b"!#$%&'*+-.^_`|~" + string.digits.encode() + string.ascii_letters.encode())
ALL_BYTES = [bytes([b]) for b in range(256)]


def test_the_rfc_set_is_what_the_rfc_lists() -> None:
    assert len(RFC_TCHAR) == 15 + 10 + 52


@pytest.mark.parametrize("byte", ALL_BYTES, ids=lambda b: f"0x{b[0]:02x}")
def test_tchar_is_exactly_rfc_9110(byte: bytes) -> None:
    assert bool(re.fullmatch(TCHAR, byte)) is (byte[0] in RFC_TCHAR)


def test_token_accepts_every_tchar_and_nothing_else() -> None:
    accepted = {b[0] for b in ALL_BYTES if TOKEN.fullmatch(b)}
    assert accepted == RFC_TCHAR
    assert TOKEN.fullmatch(bytes(sorted(RFC_TCHAR)))  # all of them in one token


@pytest.mark.parametrize("text", [b"", b"GET ", b" GET", b"Content-Type:", b"a\x00b", b"caf\xc3\xa9", b"a\tb",
                                  b"(comment)", b'"quoted"', b"a/b", b"a,b", b"a;b", b"a=b", b"a@b", b"[a]", b"{a}"])
def test_token_refuses_a_separator_or_an_empty_string(text: bytes) -> None:
    assert TOKEN.fullmatch(text) is None


@pytest.mark.parametrize("text", [b"GET", b"M-SEARCH", b"Content-Length", b"x-amzn-trace-id", b"!#$%&'*+-.^_`|~",
                                  b"0", b"gzip"])
def test_token_accepts_methods_and_field_names(text: bytes) -> None:
    assert TOKEN.fullmatch(text)


# ---- field lines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("byte", ALL_BYTES, ids=lambda b: f"0x{b[0]:02x}")
def test_a_field_value_byte(byte: bytes) -> None:
    # field-vchar = VCHAR / obs-text, plus SP and HTAB between them (RFC 9110 §5.5).
    b = byte[0]
    assert bool(re.fullmatch(FIELD_VALUE, byte)) is (b == 0x09 or 0x20 <= b <= 0x7E or b >= 0x80)


@pytest.mark.parametrize("block", [
    b"", b"Host: api.test\r\n", b"Host:api.test\r\n", b"X-Empty:\r\n", b"X-Tab:\ta\tb \r\n",
    b"A: 1\r\nB: 2\r\nC: 3\r\n", b"X-Latin: caf\xe9\r\n", b"X-Utf8: caf\xc3\xa9\r\n",
])
def test_a_well_formed_header_block(block: bytes) -> None:
    assert HEADER_BLOCK.fullmatch(block)


@pytest.mark.parametrize("block", [
    b"Host: api.test\n",  # bare LF
    b"Host: api.test",  # no line end
    b"Host: a\rb\r\n",  # CR inside a value
    b"Host: a\x00\r\n",  # NUL
    b"Host: a\x7f\r\n",  # DEL
    b"Host : api.test\r\n",  # whitespace before the colon
    b"Host: a\r\n b\r\n",  # obs-fold
    b": value\r\n",  # no name
    b"Ho(st): a\r\n",  # a separator in the name
    b"Host api.test\r\n",  # no colon
], ids=["bare-lf", "no-crlf", "cr-in-value", "nul", "del", "space-before-colon", "obs-fold", "empty-name",
        "separator-in-name", "no-colon"])
def test_a_malformed_header_block(block: bytes) -> None:
    assert HEADER_BLOCK.fullmatch(block) is None


# ---- reason phrases ------------------------------------------------------------------------------------------


def proxy_error_classes() -> list[type[errors.ProxyError]]:
    out, todo = [], list(errors.ProxyError.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


# RFC 9110 §15 (413 is "Content Too Large" since RFC 9110), and NGINX's 499 that the access log uses.
RFC_PHRASES = {
    200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long", 417: b"Expectation Failed",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large", 499: b"Client Closed Request",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
# What the admin listener answers with (proxy.admin): health, readiness, metrics, 404, 405, a bad request.
ADMIN_STATUSES = (200, 400, 404, 405, 503)


@pytest.mark.parametrize(("status", "phrase"), sorted(RFC_PHRASES.items()))
def test_reason_phrase(status: int, phrase: bytes) -> None:
    assert reason_phrase(status) == phrase


def test_the_table_is_exactly_the_statuses_the_proxy_produces() -> None:
    produced = {cls.status for cls in proxy_error_classes()} | set(ADMIN_STATUSES) | {499}
    assert produced == set(RFC_PHRASES) and produced <= set(REASON_PHRASES)


@pytest.mark.parametrize("cls", proxy_error_classes(), ids=lambda c: c.__name__)
def test_every_error_the_proxy_answers_with_has_its_own_phrase(cls: type[errors.ProxyError]) -> None:
    assert reason_phrase(cls.status) == RFC_PHRASES[cls.status]


@pytest.mark.parametrize("status", [418, 201, 302, 599, 0, 999])
def test_any_other_status_falls_back(status: int) -> None:
    assert reason_phrase(status) == b"Error"


@pytest.mark.parametrize("phrase", [*REASON_PHRASES.values(), reason_phrase(999)])
def test_every_phrase_is_a_valid_reason_phrase(phrase: bytes) -> None:
    # RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ); nothing that could end the status line.
    assert phrase and re.fullmatch(rb"[\t\x20-\x7e\x80-\xff]+", phrase)
    assert phrase == phrase.strip()

