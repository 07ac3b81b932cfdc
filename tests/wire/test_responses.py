"""proxy.wire.responses: every ``ProxyError`` becomes one well-formed HTTP/1.1 response.  The status line carries
the grammar's reason phrase, the JSON body the error's code and detail (and, for a policy or rate refusal, the
reason and the refused certificate), Content-Length is the body's length, Retry-After comes with 429, Connection:
close when asked, and a HEAD request gets the same head without the body."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from proxy import errors
from proxy.wire.grammar import HEADER_BLOCK, reason_phrase
from proxy.wire.responses import error_response

SUBJECT = "CN=client-a,O=Partner A"
FINGERPRINT = "ab" * 32


def proxy_error_classes() -> list[type[errors.ProxyError]]:
    out, todo = [], [errors.ProxyError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return sorted(out, key=lambda c: c.__name__)


def make(cls: type[errors.ProxyError], detail: str = "what went wrong") -> errors.ProxyError:
    if cls is errors.Forbidden:
        return errors.Forbidden(detail, "no_rule_for_client")
    if cls is errors.TooManyRequests:
        return errors.TooManyRequests(detail, 7)
    return cls(detail)


CLASSES = proxy_error_classes()
IDENTIFIED = (errors.Forbidden, errors.TooManyRequests)


class Response:
    """One response split the way a client reads it."""

    def __init__(self, data: bytes) -> None:
        head, sep, self.body = data.partition(b"\r\n\r\n")
        assert sep, data
        status_line, _, fields = head.partition(b"\r\n")
        m = re.fullmatch(rb"HTTP/1\.1 ([0-9]{3}) ([\t\x20-\x7e\x80-\xff]+)", status_line)
        assert m, status_line
        self.status, self.reason = int(m.group(1)), m.group(2)
        block = fields + b"\r\n" if fields else b""
        assert HEADER_BLOCK.fullmatch(block), block  # every field line well formed, CRLF-terminated
        self.headers = [(k.lower(), v.strip()) for k, _, v in (line.partition(b":") for line in block.split(b"\r\n")
                                                                if line)]

    def get(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def json(self) -> Any:
        return json.loads(self.body)


def respond(exc: errors.ProxyError, close: bool = False, head: bool = False) -> tuple[Response, int, bytes]:
    data, sent = error_response(exc, close, head, SUBJECT, FINGERPRINT)
    return Response(data), sent, data


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_status_line_has_the_errors_status_and_reason_phrase(cls: type[errors.ProxyError]) -> None:
    r, _, data = respond(make(cls))
    assert (r.status, r.reason) == (cls.status, reason_phrase(cls.status))
    assert data.startswith(b"HTTP/1.1 %d %s\r\n" % (cls.status, reason_phrase(cls.status)))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_the_body_is_json_with_the_code_and_the_detail(cls: type[errors.ProxyError]) -> None:
    r, sent, _ = respond(make(cls))
    assert r.get(b"content-type") == [b"application/json"]
    assert r.get(b"content-length") == [str(len(r.body)).encode()] and sent == len(r.body) > 0
    body = r.json()
    assert (body["error"], body["message"]) == (cls.code, "what went wrong")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_without_a_detail_the_message_is_the_code(cls: type[errors.ProxyError]) -> None:
    exc = make(cls, "")
    assert respond(exc)[0].json()["message"] == cls.code


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_only_a_policy_or_rate_refusal_names_the_certificate(cls: type[errors.ProxyError]) -> None:
    exc = make(cls)
    body = respond(exc)[0].json()
    if cls in IDENTIFIED:
        assert body == {"error": cls.code, "message": "what went wrong", "reason": getattr(exc, "reason"),
                        "subject": SUBJECT, "fingerprint": FINGERPRINT}
    else:
        assert body == {"error": cls.code, "message": "what went wrong"}


def test_the_refusal_reasons() -> None:
    assert respond(make(errors.Forbidden))[0].json()["reason"] == "no_rule_for_client"
    assert respond(make(errors.TooManyRequests))[0].json()["reason"] == "rate_limited"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_retry_after_only_with_429(cls: type[errors.ProxyError]) -> None:
    r = respond(make(cls))[0]
    assert r.get(b"retry-after") == ([b"7"] if cls is errors.TooManyRequests else [])


@pytest.mark.parametrize("seconds", [0, 1, 3600])
def test_retry_after_is_the_whole_seconds_given(seconds: int) -> None:
    r = respond(errors.TooManyRequests("slow down", seconds))[0]
    assert (r.status, r.get(b"retry-after")) == (429, [str(seconds).encode()])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("close", [True, False])
def test_connection_close_only_when_the_connection_ends(cls: type[errors.ProxyError], close: bool) -> None:
    r = respond(make(cls), close=close)[0]
    assert r.get(b"connection") == ([b"close"] if close else [])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("close", [True, False])
def test_head_gets_the_same_head_and_no_body(cls: type[errors.ProxyError], close: bool) -> None:
    get_data, get_sent = error_response(make(cls), close, False, SUBJECT, FINGERPRINT)
    head_data, head_sent = error_response(make(cls), close, True, SUBJECT, FINGERPRINT)
    head_r = Response(head_data)
    assert head_r.body == b"" and head_sent == 0 and head_data.endswith(b"\r\n\r\n")
    assert head_data == get_data[:len(head_data)]  # the same status line and fields, Content-Length included
    assert head_r.get(b"content-length") == [str(get_sent).encode()] and get_sent > 0


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_nothing_follows_the_body(cls: type[errors.ProxyError]) -> None:
    # On a keep-alive connection the next response starts right after Content-Length bytes.
    data, sent = error_response(make(cls), False, False, SUBJECT, FINGERPRINT)
    head_len = data.index(b"\r\n\r\n") + 4
    assert len(data) == head_len + sent


@pytest.mark.parametrize("text", ['CN="a\r\nSet-Cookie: x"', "CN=caf\u00e9 \u2603", "O=a\\b, CN=\x00\x7f",
                                  '"}, "error": "ok'])
def test_hostile_identity_and_detail_stay_inside_the_json(text: str) -> None:
    for exc in (errors.Forbidden(text, "no_rule_for_client"), errors.TooManyRequests(text, 1)):
        data, sent = error_response(exc, True, False, text, text)
        r = Response(data)
        assert [k for k, _ in r.headers] == [b"content-type", b"content-length", *([b"retry-after"] * (
            exc.status == 429)), b"connection"]
        assert r.body.isascii() and b"\r" not in r.body and b"\n" not in r.body
        assert r.json() == {"error": exc.code, "message": text, "reason": exc.reason, "subject": text,
                            "fingerprint": text}
        assert sent == len(r.body)


def test_the_exact_bytes_of_a_forbidden_answer() -> None:
    data, sent = error_response(errors.Forbidden("no rule admits this client", "no_rule_for_client"), True, False,
                                SUBJECT, FINGERPRINT)
    body = (b'{"error": "forbidden", "message": "no rule admits this client", "reason": "no_rule_for_client", '
            b'"subject": "CN=client-a,O=Partner A", "fingerprint": "' + FINGERPRINT.encode() + b'"}')
    assert data == (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n" % len(body)) + body
    assert sent == len(body)


def test_the_exact_bytes_of_a_429_on_a_kept_connection() -> None:
    data, sent = error_response(errors.TooManyRequests("rate limit", 2), False, True, SUBJECT, FINGERPRINT)
    body_len = len(json.dumps({"error": "too_many_requests", "message": "rate limit", "reason": "rate_limited",
                               "subject": SUBJECT, "fingerprint": FINGERPRINT}))
    assert data == (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                    b"Retry-After: 2\r\n\r\n" % body_len)
    assert sent == 0
