"""The answers the proxy writes itself: **the one place where a ``ProxyError`` becomes an HTTP response**.

Owns: turning a refusal or a failure (``proxy.errors``: policy 403, size 413/414/431, rate 429, timeouts 408,
framing 400/501/505, upstream 502/504) into bytes: the status line with its reason phrase, a JSON body
``{"error", "message"}`` (plus ``reason``, ``subject`` and ``fingerprint`` for a policy or rate refusal, so a
partner can tell which certificate was refused and why), ``Retry-After`` for 429 (RFC 9110 §10.2.3), and
``Connection: close`` when the connection ends after it.  A response to HEAD carries no content (RFC 9110 §9.3.2)
but the same Content-Length.

Must not: decide whether to close (the connection does) or do IO.
"""

from __future__ import annotations

import json

from ..errors import Forbidden, ProxyError, TooManyRequests
from .grammar import reason_phrase
from .headers import CLOSE_LINE


def error_response(exc: ProxyError, close: bool, head: bool, subject: str, fingerprint: str) -> tuple[bytes, int]:
    """The response for ``exc`` and the length of its body as sent (0 for a HEAD request)."""
    body: dict[str, object] = {"error": exc.code, "message": exc.detail}
    if isinstance(exc, (Forbidden, TooManyRequests)):
        body["reason"] = exc.reason
        body["subject"] = subject
        body["fingerprint"] = fingerprint
    payload = json.dumps(body).encode()
    out = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
           % (exc.status, reason_phrase(exc.status), len(payload)))
    if isinstance(exc, TooManyRequests):
        out += b"Retry-After: %d\r\n" % exc.retry_after
    if close:
        out += CLOSE_LINE
    if head:
        # On a keep-alive connection the client would read the JSON as the start of the next response.
        return out + b"\r\n", 0
    return out + b"\r\n" + payload, len(payload)
