"""The shared vocabulary of HTTP/1.1 (RFC 9110, RFC 9112): token characters, field lines, reason phrases.

Owns: the one definition of ``tchar`` (RFC 9110 §5.6.2) that every token in every parser is built from, the field
line shape (§5.1, §5.5; RFC 9112 §5), and the reason phrase the proxy writes for each status it produces itself
(§15; 499 is NGINX's "client closed request", which the access log uses).

Must not: parse messages (``http1``, ``chunked`` do) or do IO.
"""

from __future__ import annotations

import re

# RFC 9110 §5.6.2: tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "." / "^" / "_" / "`" / "|" / "~"
# / DIGIT / ALPHA.  A bytes character class, for building the parsers' patterns.
TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
TOKEN = re.compile(TCHAR + rb"+")
# field-value = visible ASCII, SP, HTAB and obs-text; each line ends in CRLF.  So a bare LF, a CR inside a value, a
# NUL, whitespace before the colon (tchar excludes it) and obs-fold (a line starting with SP/HTAB is not a token)
# all fail one match of HEADER_BLOCK.
FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"
# The same block with possessive quantifiers (Python 3.11+), which match exactly the same strings here: a name cannot
# give back a character to the ':' (tchar excludes it), a value none to the CR (the value class excludes it), and a
# line once matched none to the end of the block (every line ends in CRLF and a name cannot start with CR).  The
# engine then keeps no backtracking state per line and character: about a third of the cost of a block.
FIELD_LINES = rb"(?:" + TCHAR + rb"++:" + FIELD_VALUE + rb"+\r\n)*+"
HEADER_BLOCK = re.compile(FIELD_LINES)

REASON_PHRASES = {
    200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Content Too Large", 414: b"URI Too Long", 417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 499: b"Client Closed Request", 501: b"Not Implemented",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}


def reason_phrase(status: int) -> bytes:
    """The reason phrase for a status the proxy answers itself (clients must not rely on it: RFC 9112 §4)."""
    return REASON_PHRASES.get(status, b"Error")
