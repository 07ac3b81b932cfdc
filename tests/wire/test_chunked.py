"""proxy.wire.chunked: the strict incremental chunked decoder and chunk framing, as byte tables and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BadRequest, UpstreamProtocolError
from proxy.wire import chunked

def feed_all(data: bytes, step: int) -> tuple[bytes, bytes | None]:
    dec = chunked.ChunkedDecoder()
    body = b""
    rest = None
    for i in range(0, len(data), step):
        pieces, rest = dec.feed(data[i:i + step])
        body += b"".join(pieces)
        if rest is not None:
            rest += data[i + step:]
            break
    return body, rest


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_chunked_decoding_any_split(step: int) -> None:
    data = b"5\r\nhello\r\n6;ext=1;q=\"a b\"\r\n world\r\n0\r\nX-Trailer: t\r\n\r\nNEXT"
    body, rest = feed_all(data, step)
    assert body == b"hello world"
    assert rest == b"NEXT"


@pytest.mark.parametrize("data", [
    b"-5\r\nhello\r\n0\r\n\r\n",  # negative
    b"0x5\r\nhello\r\n0\r\n\r\n",  # 0x prefix
    b"g\r\n",  # non-hex
    b" 5\r\nhello\r\n",  # leading space
    b"5 \r\nhello\r\n",  # trailing space without extension
    b"1000000000000000\r\n",  # 16 hex digits: overflow guard
    b"5\r\nhelloXX0\r\n\r\n",  # missing CRLF after data
    b"5\nhello\r\n0\r\n\r\n",  # bare LF after size
    b"5\r\nhello\r\n0\r\nX-T: a\nb\r\n\r\n",  # bare LF in trailer
    b"5;\r\nhello\r\n",  # empty extension
    b"5;a=\"unterminated\r\nhello\r\n",
    b"\r\n",  # empty size line
    b"0\r\nBad Trailer\r\n\r\n",
])
def test_chunked_decoding_refuses_oddities(data: bytes) -> None:
    with pytest.raises(BadRequest):
        feed_all(data, 1)
    with pytest.raises(BadRequest):
        feed_all(data, len(data))


def test_chunk_lines_arriving_in_pieces_are_bounded_while_buffered() -> None:
    """A size line (4 KiB) or trailer line (16 KiB) that never ends is refused as it grows, not buffered forever."""
    dec = chunked.ChunkedDecoder()
    with pytest.raises(BadRequest, match="too long"):
        for _ in range(100):
            dec.feed(b"1;" + b"e" * 98)
    dec = chunked.ChunkedDecoder()
    dec.feed(b"0\r\n")
    for _ in range(80):  # an 8 KiB trailer line is fine: the trailer budget applies, not the size-line one
        dec.feed(b"t" * 100 if _ else b"X-T: ")
    pieces, rest = dec.feed(b"\r\n\r\n")
    assert (pieces, rest) == ([], b"")


def test_bare_lf_in_chunked_framing_is_named() -> None:
    for data in (b"5\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\nX-T: a\n\r\n", b"5\r\r\nhello"):
        with pytest.raises(BadRequest, match="bare LF or CR"):
            feed_all(data, len(data))


def test_chunked_decoder_counts_the_decoded_body_exactly() -> None:
    """``total`` is what server.max_body_bytes is checked against for chunked uploads."""
    dec = chunked.ChunkedDecoder()
    dec.feed(b"5\r\nhello\r\n1a\r\n" + b"z" * 26 + b"\r\n")
    assert dec.total == 31
    dec.feed(b"0\r\n\r\n")
    assert dec.total == 31


def test_chunk_line_limit_is_inclusive() -> None:
    ext = b";" + b"e" * (chunked.MAX_CHUNK_LINE - 2)  # "1" + ext is exactly MAX_CHUNK_LINE bytes
    body, rest = feed_all(b"1" + ext + b"\r\nx\r\n0\r\n\r\n", 10_000)
    assert body == b"x" and rest == b""
    with pytest.raises(BadRequest, match="too long"):
        feed_all(b"1" + ext + b"e\r\nx\r\n0\r\n\r\n", 10_000)


def test_trailer_section_size_is_bounded_across_lines() -> None:
    line = b"X-T: " + b"t" * 1017 + b"\r\n"  # 1,024 bytes a line, counted with its CRLF
    fits = chunked.MAX_TRAILERS // len(line)
    assert fits * len(line) == chunked.MAX_TRAILERS  # the limit itself is allowed
    body, rest = feed_all(b"0\r\n" + line * fits + b"\r\n", 100_000)
    assert (body, rest) == (b"", b"")
    with pytest.raises(BadRequest, match="trailer section too large"):
        feed_all(b"0\r\n" + line * (fits + 1) + b"\r\n", 100_000)


def test_chunked_decoder_uses_given_error_class() -> None:
    dec = chunked.ChunkedDecoder(UpstreamProtocolError)
    with pytest.raises(UpstreamProtocolError):
        dec.feed(b"zz\r\n")


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=10), st.integers(min_value=1, max_value=40))
def test_chunked_round_trip(pieces: list[bytes], step: int) -> None:
    data = b"".join(b"".join(chunked.chunk(p)) for p in pieces) + chunked.LAST_CHUNK
    body, rest = feed_all(data, step)
    assert body == b"".join(pieces)
    assert rest == b""
