"""The chunked transfer coding (RFC 9112 §7.1), sans-IO: a strict incremental decoder and the framing of chunks.

Owns: decoding a chunked body fed in arbitrary pieces (sizes, extensions, the CRLF after each chunk, trailers,
each with its length limit) and framing data as chunks for the other side.  Requests and responses share it; the
exception it raises on bad framing is the caller's (``BadRequest`` toward a client, ``UpstreamProtocolError`` from
the upstream).

Must not: do IO, buffer body data (pieces are returned as they arrive), or accept anything lenient: a bare LF or
CR, a size with more than 15 hex digits, an empty or malformed extension and an oversized line are refused, as the
desync attacks that rely on a lenient peer need.
"""

from __future__ import annotations

import re

from ..errors import BadRequest
from .grammar import HEADER_BLOCK as _HEADER_BLOCK
from .grammar import TCHAR

MAX_CHUNK_LINE = 4 * 1024  # chunk-size line with extensions
MAX_TRAILERS = 16 * 1024
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_CHUNK_EXT = re.compile(rb"(?:[ \t]*;[ \t]*" + TCHAR + rb"+"
                        rb"(?:[ \t]*=[ \t]*(?:" + TCHAR + rb"+|\"(?:[\t\x20!\x23-\x5b\x5d-\x7e\x80-\xff]"
                        rb"|\\[\t\x20-\x7e\x80-\xff])*\"))?)*")


class ChunkedDecoder:
    """Incremental, strict chunked transfer-coding decoder (RFC 9112 §7.1).

    ``feed(data)`` returns the body pieces found and, once the last chunk and trailer section are complete,
    the bytes after them (else None).  Trailer fields are validated and discarded.  ``error`` is the exception
    class raised for malformed input (BadRequest for requests, UpstreamProtocolError for responses).
    """

    __slots__ = ("_state", "_remaining", "_line", "_trailers", "_error", "total")

    _SIZE, _DATA, _DATA_CRLF, _TRAILER, _DONE = range(5)

    def __init__(self, error: type[Exception] = BadRequest) -> None:
        self._state = self._SIZE
        self._remaining = 0
        self._line = b""
        self._trailers = 0
        self._error = error
        self.total = 0

    def feed(self, data: bytes) -> tuple[list[bytes], bytes | None]:
        pieces: list[bytes] = []
        pos = 0
        n = len(data)
        while pos < n:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - pos)
                pieces.append(data[pos:pos + take] if (pos or take != n) else data)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_CRLF
            elif state == self._DATA_CRLF:
                need = 2 - len(self._line)
                self._line += data[pos:pos + need]
                pos += need
                if len(self._line) == 2:
                    if self._line != b"\r\n":
                        raise self._error("chunk data not followed by CRLF")
                    self._line = b""
                    self._state = self._SIZE
            elif state in (self._SIZE, self._TRAILER):
                end = data.find(b"\n", pos)
                if end < 0:
                    self._line += data[pos:]
                    pos = n
                    limit = MAX_CHUNK_LINE if state == self._SIZE else MAX_TRAILERS
                    if len(self._line) > limit:
                        raise self._error("chunk line too long")
                    break
                line = self._line + data[pos:end + 1]
                pos = end + 1
                self._line = b""
                if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                    raise self._error("bare LF or CR in chunked framing")
                line = line[:-2]
                if state == self._SIZE:
                    self._size_line(line)
                else:
                    self._trailer_line(line)
                    if self._state == self._DONE:
                        return pieces, data[pos:]
            else:  # _DONE: never fed again by callers
                return pieces, data[pos:]
        return pieces, (b"" if self._state == self._DONE else None)

    def _size_line(self, line: bytes) -> None:
        if len(line) > MAX_CHUNK_LINE:  # also when the whole line came in one read, not only when buffered
            raise self._error("chunk line too long")
        semi = line.find(b";")
        size_b, ext = (line, b"") if semi < 0 else (line[:semi].rstrip(b" \t"), line[semi:])
        if _CHUNK_SIZE.fullmatch(size_b) is None:
            raise self._error("invalid chunk size")
        if ext and _CHUNK_EXT.fullmatch(ext) is None:
            raise self._error("invalid chunk extension")
        size = int(size_b, 16)
        self.total += size
        if size == 0:
            self._state = self._TRAILER
        else:
            self._remaining = size
            self._state = self._DATA

    def _trailer_line(self, line: bytes) -> None:
        if not line:
            self._state = self._DONE
            return
        self._trailers += len(line) + 2
        if self._trailers > MAX_TRAILERS:
            raise self._error("trailer section too large")
        if _HEADER_BLOCK.fullmatch(line + b"\r\n") is None:
            raise self._error("malformed trailer field")


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """The three pieces that frame ``data`` as one chunk; callers join them with the rest of a write."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


LAST_CHUNK = b"0\r\n\r\n"
