"""accesslog: the JSON line (every field, escaping, UTC time), batching on a real event loop (nothing written
until FLUSH_BYTES or FLUSH_INTERVAL, everything written at close), writes that never split a line and never exceed
PIPE_BUF, and a closed stdout that does not stop the proxy."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from proxy import accesslog
from proxy.accesslog import AccessLog, connection_prefix

TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
FIELDS = ["time", "client", "vpce", "subject", "fingerprint", "rule", "method", "path", "status", "bytes_in",
          "bytes_out", "duration_ms", "upstream_ms", "error"]
PREFIX = connection_prefix("10.0.0.1", "vpce-0abc", "CN=client-a,O=Partner", "ab" * 32)


class Pipe:
    """A real pipe: the log writes to ``w``; the test reads ``r`` without blocking."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for a whole FLUSH_BYTES batch: no reader thread

    def read(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = os.read(self.r, 1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


def write(log: AccessLog, path: bytes = b"/prod/items?x=1", **kw: Any) -> None:
    args: dict[str, Any] = {"prefix": PREFIX, "rule": "partner-a", "method": "GET", "target": path,
                            "status": 200, "bytes_in": 0, "bytes_out": 17, "duration": 0.0123456,
                            "upstream": 0.0045, "error": None}
    args.update(kw)
    log.write(**args)


def lines(data: bytes) -> list[dict[str, Any]]:
    text = data.decode("ascii")  # the whole line is ASCII: JSON escapes everything else
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


async def eventually_read(pipe: Pipe, n_lines: int, timeout: float = 10.0) -> bytes:
    got = b""
    async with asyncio.timeout(timeout):
        while got.count(b"\n") < n_lines:
            got += pipe.read()
            await asyncio.sleep(0.01)
    return got


@pytest.fixture
def non_utc_local_time() -> Iterator[None]:
    """Local time 5 h off UTC, so a line stamped in local time would be caught."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "XYZ+05"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


# ---- the line -------------------------------------------------------------------------------------------------


async def test_one_json_line_with_every_field(pipe: Pipe, non_utc_local_time: None) -> None:
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    before = dt.datetime.now(dt.timezone.utc)
    write(log, b"/prod/items?x=1", rule="partner-a", method="POST", status=201, bytes_in=5, bytes_out=17,
          duration=0.0123456, upstream=0.0045, error=None)
    log.close()
    after = dt.datetime.now(dt.timezone.utc)
    raw = pipe.read()
    assert raw.count(b"\n") == 1
    (line,) = lines(raw)
    assert list(line) == FIELDS
    assert TIME.match(line["time"]), line["time"]
    stamp = dt.datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc)
    # UTC, to the millisecond: within the interval the write happened in (truncated to ms).
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= stamp <= after
    assert {k: v for k, v in line.items() if k != "time"} == {
        "client": "10.0.0.1", "vpce": "vpce-0abc", "subject": "CN=client-a,O=Partner", "fingerprint": "ab" * 32,
        "rule": "partner-a", "method": "POST", "path": "/prod/items?x=1", "status": 201, "bytes_in": 5,
        "bytes_out": 17, "duration_ms": 12.346, "upstream_ms": 4.5, "error": None}


async def test_missing_values_are_json_null(pipe: Pipe) -> None:
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    write(log, prefix=connection_prefix("192.0.2.1", None, "CN=x", "00"), rule=None, upstream=None,
          error="upstream_timeout", status=504)
    log.close()
    (line,) = lines(pipe.read())
    assert (line["vpce"], line["rule"], line["upstream_ms"], line["error"]) == (None, None, None, "upstream_timeout")


@pytest.mark.parametrize("target", [
    b'/a"b', b"/a\\b", b'/"\\"/\\\\', b'/x?q="}{,\\u0000', b"/" + b'\\"' * 200,
])
async def test_path_with_quotes_and_backslashes_is_escaped(pipe: Pipe, target: bytes) -> None:
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    write(log, target)
    write(log, b"/plain")
    log.close()
    first, second = lines(pipe.read())
    assert first["path"] == target.decode() and second["path"] == "/plain"
    assert first["status"] == 200  # nothing after the path was swallowed into it


def test_connection_prefix_escapes_subject_and_keeps_ascii() -> None:
    subject = 'CN="quoted"\\, comma\r\n\u00fc\u6f22'
    prefix = connection_prefix("2001:db8::1", "vpce-1", subject, "ff")
    assert prefix.isascii() and "\n" not in prefix and "\r" not in prefix
    assert json.loads("{" + prefix + "}") == {"client": "2001:db8::1", "vpce": "vpce-1", "subject": subject,
                                              "fingerprint": "ff"}


@pytest.mark.parametrize("rule, error", [('r"1', 'e\\1'), ("ok", None), (None, "x")])
async def test_rule_and_error_are_escaped_also_when_cached(pipe: Pipe, rule: str | None, error: str | None) -> None:
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    for _ in range(3):  # the encoding is cached after the first line
        write(log, rule=rule, error=error)
    log.close()
    assert [(x["rule"], x["error"]) for x in lines(pipe.read())] == [(rule, error)] * 3


async def test_disabled_log_costs_nothing_per_request() -> None:
    log = AccessLog(asyncio.get_running_loop(), None)
    write(log)
    assert log._lines == [] and log._timer is None  # nothing formatted or buffered, no flush timer armed
    log.flush()
    log.close()


# ---- batching -------------------------------------------------------------------------------------------------


async def test_lines_wait_for_the_flush_interval(pipe: Pipe) -> None:
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    write(log, b"/1")
    write(log, b"/2")
    assert pipe.read() == b""  # buffered: no write per request
    got = await eventually_read(pipe, 2)  # the FLUSH_INTERVAL timer writes them without another request
    assert [x["path"] for x in lines(got)] == ["/1", "/2"]
    write(log, b"/3")  # a new batch arms a new timer
    assert [x["path"] for x in lines(await eventually_read(pipe, 1))] == ["/3"]
    log.close()


async def test_nothing_is_written_before_flush_bytes_or_the_interval(pipe: Pipe,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog, "FLUSH_INTERVAL", 3600.0)  # only the size can trigger a write here
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    n = 0
    while not (got := pipe.read()):
        write(log, b"/x" * 50)
        n += 1
        assert n < 10_000
        if n % 20 == 0:
            await asyncio.sleep(0)  # event loop turns pass: still nothing written
    last = len(got) - got.rstrip(b"\n").rfind(b"\n") - 1
    # Written in one go by the line that made FLUSH_BYTES accumulate, not earlier and not later.
    assert len(got) - last < accesslog.FLUSH_BYTES <= len(got)
    assert len(lines(got)) == n
    write(log, b"/after")
    assert pipe.read() == b""
    log.close()  # close flushes the rest
    assert [x["path"] for x in lines(pipe.read())] == ["/after"]


async def test_close_flushes_everything_and_cancels_the_timer(pipe: Pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog, "FLUSH_INTERVAL", 3600.0)
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    for i in range(50):
        write(log, f"/{i}".encode())
    assert pipe.read() == b""
    log.close()
    assert [x["path"] for x in lines(pipe.read())] == [f"/{i}" for i in range(50)]
    assert log._timer is None  # nothing left to fire after the loop closes
    log.close()  # idempotent
    assert pipe.read() == b""


# ---- write boundaries: several workers share one stdout pipe ---------------------------------------------------


async def test_writes_end_at_line_ends_and_never_exceed_pipe_buf() -> None:
    """A SOCK_SEQPACKET pair keeps every write() a separate message, so the test sees each write's bytes."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    messages: list[bytes] = []

    def drain() -> None:  # a datagram-like queue holds only a few messages: read while the log writes
        while msg := reader.recv(1 << 16):
            messages.append(msg)

    thread = threading.Thread(target=drain)
    thread.start()
    try:
        log = AccessLog(asyncio.get_running_loop(), writer.fileno())
        paths = [b"/p" + b"x" * ((i * 397) % 1500) for i in range(300)]  # lines of 300 .. 1800 bytes
        paths.insert(150, b"/" + b"L" * 6000)  # one line longer than PIPE_BUF: written alone, never split
        for p in paths:
            write(log, p)
        log.close()
    finally:
        writer.shutdown(socket.SHUT_WR)
        thread.join(30)
        reader.close()
        writer.close()
    assert len(messages) > 10
    for msg in messages:
        assert msg.endswith(b"\n")
        if len(msg) > accesslog.PIPE_BUF:
            assert msg.count(b"\n") == 1 and b"L" * 6000 in msg  # only the one over-long line
    assert [x["path"] for m in messages for x in lines(m)] == [p.decode() for p in paths]
    # Batched: most writes carry several lines.
    assert sum(m.count(b"\n") for m in messages) / len(messages) > 2


# ---- a closed stdout ----------------------------------------------------------------------------------------


async def test_closed_reader_does_not_raise(pipe: Pipe) -> None:
    os.close(pipe.r)  # nobody reads stdout any more: write() fails with EPIPE (SIGPIPE is ignored by Python)
    log = AccessLog(asyncio.get_running_loop(), pipe.w)
    write(log)
    log.flush()
    for _ in range(2000):  # also through the FLUSH_BYTES path
        write(log)
    log.close()
