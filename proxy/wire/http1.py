"""HTTP/1.1 message framing, sans-IO (RFC 9110, RFC 9112).

Owns: finding and parsing request and response heads, deciding body framing, and the removal of hop-by-hop
headers.  The chunked coding itself is ``proxy.wire.chunked``'s.  Parsers take bytes and return values or raise a ``ProxyError`` subclass carrying
the status (400, 414, 431, 501, 505 for requests; ``UpstreamProtocolError`` for responses).

Why our own parser and not aiohttp's: the proxy must forward the request target and most header lines
byte-exact, must refuse every framing ambiguity a desync attack relies on (CL+TE, duplicate Content-Length,
obs-fold, bare LF, whitespace before the colon, odd chunk sizes), and must stream bodies without an intermediate
StreamReader.  A strict parser of raw lines does all three, and validating a whole header block with one compiled
regular expression keeps it cheaper than building a multidict and a URL object per request.

Must not: do IO, know about identity or policy, or allocate per header more than the line it keeps.
"""

from __future__ import annotations

import re
from typing import NoReturn

from ..errors import (
    BadRequest,
    ExpectationFailed,
    HeadersTooLarge,
    NotImplementedCoding,
    UpstreamProtocolError,
    UriTooLong,
    VersionNotSupported,
)
from .grammar import FIELD_LINES
from .grammar import HEADER_BLOCK as _HEADER_BLOCK
from .grammar import TCHAR
from .grammar import TOKEN as _TOKEN

MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 64 * 1024
MAX_HEADERS = 100

# RFC 9110 §5.1/§5.5: field-name = token; field-value = visible ASCII, SP, HTAB and obs-text.  Each line must
# end in CRLF, so a bare LF, a CR inside a value, a NUL, whitespace before the colon (token chars exclude it) and
# obs-fold (a line starting with SP/HTAB is not a token) all fail this one match.
_LEADING_CRLF = re.compile(rb"(?:\r\n)*")
# Group 4 is the line's CRLF: its start is where the header block's search begins, in both patterns below.
_STATUS_LINE = rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?(\r\n)"
# The usual head in one match: status line, well-formed field lines, the blank line.  When it fails, the status line
# and the block are checked apart (the same two checks this one implies), which also says what is wrong.
_RESPONSE_HEAD = re.compile(_STATUS_LINE + FIELD_LINES + rb"\r\n")
_STATUS_LINE_ONLY = re.compile(_STATUS_LINE)

# RFC 9110 §7.6.1 hop-by-hop fields, never forwarded in either direction.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate",
})

# Classification of header names the request parser acts on; any other name is forwarded as the raw line.
_H_DROP, _H_CL, _H_TE, _H_HOST, _H_CONN, _H_EXPECT = range(6)


class RequestHead:
    """A parsed request head.  ``fields`` are the raw header lines to forward, each ending in CRLF.

    Only ``parse_request_head`` makes one, by storing every slot on ``object.__new__(RequestHead)``: ten slot
    stores cost less than a Python ``__init__`` with ten arguments, once per distinct head.  So there is no
    ``__init__``; a new field is a new slot, a new annotation and a new store there.
    """

    __slots__ = ("method", "target", "path", "query", "http11", "keep_alive", "content_length", "chunked",
                 "expect_continue", "fields")
    method: str
    target: bytes
    path: str
    query: bytes
    http11: bool
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool
    fields: bytes

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


class ResponseHead:
    """A parsed upstream response head; ``fields`` are the end-to-end header lines (CRLF-terminated).

    Only ``parse_response_head`` makes one, by slot stores (see ``RequestHead``): no ``__init__``.
    """

    __slots__ = ("status", "reason", "http11", "keep_alive", "content_length", "chunked", "fields")
    status: int
    reason: bytes
    http11: bool
    keep_alive: bool
    content_length: int | None
    chunked: bool
    fields: bytes


def find_head_end(buf: bytes | bytearray, limit: int = MAX_HEAD) -> int:
    """Index just past the blank line ending the head, or -1 if more bytes are needed.

    Raises early for what can never become valid: an over-long request line (414), a head over ``limit``
    (431), and a bare LF (400) — so a slow client cannot make the proxy buffer garbage.
    """
    # RFC 9112 §2.2: empty lines before the request line are ignored (parse_request_head drops them); without
    # skipping them here, "\r\n\r\nGET ..." would end an empty head at once and be refused.
    start = _LEADING_CRLF.match(buf).end()  # type: ignore[union-attr]  # matches the empty string at least
    end = buf.find(b"\r\n\r\n", start, limit + 4)
    if end >= 0:
        return end + 4
    if len(buf) > limit:
        first = buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
        if first < 0:
            raise UriTooLong("request line too long")
        raise HeadersTooLarge(f"request head larger than {limit} bytes")
    if b"\n" in buf and b"\n" in buf.replace(b"\r\n", b""):
        raise BadRequest("bare LF in request head")
    if len(buf) > MAX_REQUEST_LINE and buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2) < 0:
        raise UriTooLong("request line too long")
    return -1


def _diagnose(block: bytes) -> str:
    """Say which rule a rejected header block broke (cold path, only on refusal)."""
    for line in block.split(b"\r\n")[:-1]:
        if _HEADER_BLOCK.fullmatch(line + b"\r\n"):
            continue
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding in header"
        name, sep, value = line.partition(b":")
        if not sep:
            return "header line without a colon"
        if name != name.rstrip(b" \t"):
            return "whitespace between header name and colon"
        if not _TOKEN.fullmatch(name):
            return "invalid character in header name"
        if b"\n" in value or b"\r" in value:
            return "bare CR or LF in header"
        return "invalid character in header value"
    return "malformed header block"


def _names_regex(names: frozenset[bytes] | set[bytes]) -> re.Pattern[bytes]:
    """Matches the start of a header line whose name is one of ``names``, also with ``_`` for ``-``.

    Used on a lowercased copy of the head (positions are the same): a case-sensitive pattern keeps the regex
    engine's literal-prefix search, which ``re.IGNORECASE`` would disable.  Group 1 is the (lowercase) name, group
    2 the value; the line, CRLF included, is ``m.start() + 2`` to ``m.end() + 2``.  The names are compiled as a
    trie (``con(?:nection|tent[-_]length)|...``): at each line start the engine tries one branch per distinct
    first byte instead of every name in turn.  (Python 3.11's bytes.find/index with a start argument cost hundreds
    of instructions in argument parsing alone; regex groups cost less.)
    """
    return re.compile(rb"\r\n(" + _trie(sorted(names)) + rb"):([^\r]*)")


def _trie(names: list[bytes]) -> bytes:
    """A regex alternation matching exactly ``names`` (``-`` also as ``_``), factored on common prefixes."""
    branches: dict[bytes, list[bytes]] = {}
    ends = False
    for name in names:
        if name:
            branches.setdefault(name[:1], []).append(name[1:])
        else:
            ends = True
    alts = [(b"[-_]" if c == b"-" else re.escape(c)) + _trie(rest) for c, rest in sorted(branches.items())]
    if not alts:
        return b""
    body = b"(?:" + b"|".join(alts) + b")" if len(alts) > 1 or ends else alts[0]
    return body + b"?" if ends else body


_REQUEST_NAMES: dict[bytes, int] = {name: _H_DROP for name in HOP_BY_HOP}
_REQUEST_NAMES.update({b"content-length": _H_CL, b"transfer-encoding": _H_TE, b"host": _H_HOST,
                       b"connection": _H_CONN, b"expect": _H_EXPECT})
_SPECIAL_CACHE: dict[frozenset[bytes], re.Pattern[bytes]] = {}


def _special_request_names(drop: frozenset[bytes]) -> re.Pattern[bytes]:
    pattern = _SPECIAL_CACHE.get(drop)
    if pattern is None:  # compiled once per distinct drop set (the proxy has exactly one)
        pattern = _SPECIAL_CACHE[drop] = _names_regex(set(_REQUEST_NAMES) | drop)
    return pattern


def _drop_named(fields: bytes, names: set[bytes]) -> bytes:
    """Remove the lines whose (lowercase) name is in ``names`` (cold path: Connection named extra fields)."""
    kept = [ln for ln in fields.split(b"\r\n")[:-1] if ln[:ln.index(b":")].lower() not in names]
    return b"".join(ln + b"\r\n" for ln in kept)


def parse_request_head(head: bytes, drop: frozenset[bytes] = frozenset()) -> RequestHead:
    """Parse a complete request head (through the blank line), strictly.

    ``drop`` holds lowercase names (with ``-``) removed before forwarding in addition to hop-by-hop ones; a name
    sent with ``_`` in place of ``-`` is dropped too (never interpreted), because some servers treat the two
    spellings as the same header.  Per request, Python only looks at the lines one regex finds interesting
    (framing, Host, Connection, Expect, hop-by-hop, dropped names); every other line is forwarded untouched as
    part of one ``fields`` block.
    """
    if head[0] == 13:  # CR (an int compare: a bytes slice and compare cost several times more)
        while head.startswith(b"\r\n"):  # RFC 9112 §2.2: ignore empty lines before the request line
            head = head[2:]
    m = _REQUEST_HEAD.fullmatch(head)
    if m is None:  # not the usual well-formed head: the two checks it implies, apart, to say what is wrong
        m = _REQUEST_LINE.match(head)
        if m is None:
            _refuse_request_line(head)
        if _HEADER_BLOCK.fullmatch(head, m.start(4) + 2, len(head) - 2) is None:
            raise BadRequest(_diagnose(head[m.start(4) + 2:-2]))
    first = m.start(4)
    if len(head) > 4 * MAX_HEADERS and head.count(b"\r\n") > MAX_HEADERS + 2:  # a line is at least 4 bytes
        raise HeadersTooLarge(f"more than {MAX_HEADERS} header fields")
    if first > MAX_REQUEST_LINE:
        raise UriTooLong("request line too long")
    method_b, target, version, _ = m.groups()
    http11 = version == b"1"
    path_b, sep, query = target.partition(b"?")
    if sep:
        query = sep + query

    content_length: int | None = None
    te_values: list[bytes] = []
    conn_tokens: list[bytes] = []
    hosts = 0
    expect_continue = False
    parts: list[bytes] = []  # the forwarded lines: the head without the lines cut below
    pos = first + 2
    classify = _REQUEST_NAMES
    names = _SPECIAL_CACHE.get(drop) or _special_request_names(drop)  # (a call only for a new drop set)
    for m in names.finditer(head.lower(), first):
        name, value = m.groups()
        # The table's names are spelled with "-": an underscore twin (and every dropped name) is _H_DROP, cut and
        # never interpreted.
        kind = classify.get(name, _H_DROP)
        if kind == _H_CL:
            value = value.strip()  # = strip(b" \t"): the block match allows no other whitespace in a value
            if content_length is not None:
                raise BadRequest("duplicate Content-Length")
            if not value.isdigit() or len(value) > 18:
                raise BadRequest("invalid Content-Length")
            content_length = int(value)
            continue  # forwarded as sent
        start = m.start() + 2
        if start > pos:
            parts.append(head[pos:start])
        pos = m.end() + 2
        if kind == _H_DROP:
            continue
        if kind == _H_HOST:
            hosts += 1
        elif kind == _H_CONN:
            conn_tokens += _tokens(value)
        elif kind == _H_TE:
            te_values.append(value.strip(b" \t"))
        elif kind == _H_EXPECT:
            if value.strip(b" \t") != b"100-continue":
                raise ExpectationFailed("only Expect: 100-continue is supported")
            expect_continue = True

    if http11 and hosts != 1:
        raise BadRequest("exactly one Host header is required" if hosts else "missing Host header")
    if hosts > 1:
        raise BadRequest("more than one Host header")
    chunked = False
    if te_values:
        if not http11:
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(b" \t") for v in te_values for c in v.split(b",")]
        if any(c != b"chunked" for c in codings):
            if codings[-1] != b"chunked" or any(c == b"" for c in codings):
                raise BadRequest("chunked must be the final transfer coding")
            raise NotImplementedCoding("unsupported transfer coding")
        if len(codings) != 1:
            raise BadRequest("chunked applied more than once")
        if content_length is not None:
            # RFC 9112 §6.3: a request with both is a smuggling attempt; refuse rather than pick one.
            raise BadRequest("both Content-Length and Transfer-Encoding")
        chunked = True
    if http11:
        keep_alive = b"close" not in conn_tokens
    else:
        keep_alive = b"keep-alive" in conn_tokens and b"close" not in conn_tokens
    if parts:
        parts.append(head[pos:-2])
        fields = b"".join(parts)
    else:
        fields = head[pos:-2]
    if conn_tokens:
        extra = _named_fields(conn_tokens)
        if extra:  # RFC 9110 §7.6.1: fields named in Connection are hop-by-hop too
            fields = _drop_named(fields, extra)
    if expect_continue and not (chunked or content_length):
        expect_continue = False  # nothing to wait for
    req = _new_object(RequestHead)  # every slot stored below (see RequestHead)
    req.method = _METHODS.get(method_b) or method_b.decode("ascii")
    req.target = target
    req.path = path_b.decode("ascii")
    req.query = query
    req.http11 = http11
    req.keep_alive = keep_alive
    req.content_length = content_length
    req.chunked = chunked
    req.expect_continue = expect_continue
    req.fields = fields
    return req


# request-line = method SP request-target SP HTTP-version CRLF (RFC 9112 §3), origin-form targets only.
# Group 4 is the line's CRLF (see _STATUS_LINE); _REQUEST_HEAD is the whole usual head in one match.
_REQUEST_LINE_RE = rb"(" + TCHAR + rb"+) (/[!\"$-~]*) HTTP/1\.([01])(\r\n)"
_REQUEST_LINE = re.compile(_REQUEST_LINE_RE)
_REQUEST_HEAD = re.compile(_REQUEST_LINE_RE + FIELD_LINES + rb"\r\n")
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


def _refuse_request_line(head: bytes) -> NoReturn:
    """Say precisely why the request line did not match (cold path)."""
    first = head.find(b"\r\n")
    line = head[:first]
    if len(line) > MAX_REQUEST_LINE:
        raise UriTooLong("request line too long")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method_b, target, version = parts
    if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version) and version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise VersionNotSupported(f"HTTP version {version.decode()} not supported")
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise BadRequest("malformed request line")
    if _TOKEN.fullmatch(method_b) is None:
        raise BadRequest("invalid method")
    raise BadRequest("request target must be an absolute path (origin-form)")


_RESPONSE_SPECIAL = _names_regex(HOP_BY_HOP | {b"content-length"})


def parse_response_head(head: bytes) -> ResponseHead:
    """Parse an upstream response head; anything ambiguous is an ``UpstreamProtocolError`` (502)."""
    m = _RESPONSE_HEAD.fullmatch(head)
    if m is None:  # not the usual well-formed head: the two checks it implies, apart, to say what is wrong
        m = _STATUS_LINE_ONLY.match(head)
        if m is None:
            raise UpstreamProtocolError("bad status line")
        if _HEADER_BLOCK.fullmatch(head, m.start(4) + 2, len(head) - 2) is None:
            raise UpstreamProtocolError(f"bad response head: {_diagnose(head[m.start(4) + 2:-2])}")
    first = m.start(4)
    if len(head) > 4 * MAX_HEADERS and head.count(b"\r\n") > MAX_HEADERS + 2:
        raise UpstreamProtocolError(f"bad response head: more than {MAX_HEADERS} header fields")
    version, status_b, reason, _ = m.groups(b"")
    http11 = version == b"1"
    status = _STATUS_CODES[status_b]  # the status line pattern admits exactly 100..999
    content_length: int | None = None
    chunked = False  # a Transfer-Encoding: chunked line was seen
    conn_tokens: list[bytes] = []
    parts: list[bytes] = []  # the forwarded lines: the head without the lines cut below
    pos = first + 2
    for m in _RESPONSE_SPECIAL.finditer(head.lower(), first):
        name, value = m.groups()
        if name == b"content-length":
            value = value.strip()  # = strip(b" \t"): the block match allows no other whitespace in a value
            if not value.isdigit() or len(value) > 18:
                raise UpstreamProtocolError("invalid Content-Length in response")
            n = int(value)
            if content_length is not None:
                if n != content_length:
                    raise UpstreamProtocolError("conflicting Content-Length in response")
                # an identical repeat (RFC 9110 §8.6): send it once
                parts.append(head[pos:m.start() + 2])
                pos = m.end() + 2
            content_length = n
            continue
        start = m.start() + 2
        if start > pos:
            parts.append(head[pos:start])
        pos = m.end() + 2
        if name == b"connection":
            if 44 in value:  # b",": several tokens (see _tokens; one token, the usual case, is inlined)
                conn_tokens += _tokens(value)
            else:
                conn_tokens.append(value.strip())
        elif name == b"transfer-encoding":
            if _tokens(value) != [b"chunked"] or chunked:
                raise UpstreamProtocolError("unsupported transfer coding in response")
            chunked = True
    if chunked and content_length is not None:
        raise UpstreamProtocolError("both Content-Length and Transfer-Encoding in response")
    keep_alive = (b"close" not in conn_tokens) if http11 else (b"keep-alive" in conn_tokens)
    if parts:
        if pos < len(head) - 2:  # (a cut line is usually the last: then the first part is all there is)
            parts.append(head[pos:-2])
        fields = parts[0] if len(parts) == 1 else b"".join(parts)
    else:
        fields = head[pos:-2]
    if conn_tokens and not _CONNECTION_OPTIONS.issuperset(conn_tokens):
        # RFC 9110 §7.6.1: fields named in Connection are hop-by-hop too (_named_fields, skipped in the usual case)
        fields = _drop_named(fields, _named_fields(conn_tokens))  # type: ignore[arg-type]  # not None: checked
    resp = _new_object(ResponseHead)  # every slot stored below (see RequestHead)
    resp.status = status
    resp.reason = reason
    resp.http11 = http11
    resp.keep_alive = keep_alive
    resp.content_length = content_length
    resp.chunked = chunked
    resp.fields = fields
    return resp


_STATUS_CODES = {b"%d" % code: code for code in range(100, 1000)}
_new_object = object.__new__
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b""})


def _tokens(value: bytes) -> list[bytes]:
    """Comma-separated tokens of an (already lowercase) field value; one token needs no split."""
    if 44 not in value:  # b",": an int needle is a memchr; a bytes needle first fails as an int (an exception)
        return [value.strip()]  # = strip(b" \t"): the block match allows no other whitespace in a value
    return [t.strip(b" \t") for t in value.split(b",")]


def _named_fields(tokens: list[bytes]) -> set[bytes] | None:
    """Field names listed in Connection besides its options (RFC 9110 §7.6.1); None in the usual case."""
    for t in tokens:
        if t not in _CONNECTION_OPTIONS:
            return {t for t in tokens if t not in _CONNECTION_OPTIONS}
    return None
