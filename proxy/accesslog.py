"""The access log: one JSON object per request on stdout, written in batches.

Owns: the line format, the per-connection prefix (client address, endpoint id, subject, fingerprint: escaped
once per connection), batching (lines are collected and written at most every ``FLUSH_INTERVAL`` seconds or
when ``FLUSH_BYTES`` accumulate, so a busy proxy does not pay one write syscall per request), and backpressure
from a slow reader.  ``close()`` flushes what is left, so a drain loses no lines the output can take.

Backpressure: stdout is usually a pipe to a log driver, and a slow or stalled one fills it.  A pipe or socket is
switched to non-blocking mode (a terminal or a file is left alone: they do not fill up like that), so a write
never stops the event loop.  Whatever the output does not take waits in a backlog and is written as soon as the
loop reports the descriptor writable again (``add_writer``; a retry timer where the loop cannot watch it).  The
lines held are bounded by ``MAX_BUFFER`` bytes; beyond that new lines are dropped and counted
(``mtls_proxy_log_lines_dropped_total``), and the event log says so once when dropping starts and once when
lines flow again (with the number lost).  Lines are never torn: a write that the pipe takes is a whole batch of
lines, and one it refuses is retried from where it stopped.

Fields: time (UTC, ms), client, vpce, subject, fingerprint, rule, method, path (as received), status, bytes_in
(request body), bytes_out (response body), duration_ms, upstream_ms, error (machine code or null), and only on
a request whose start had already been sent upstream when the proxy cut it (a malformed chunk or too much body
later in the stream, a client that stalled or left mid-body): ``"upstream_aborted":true``.  No header values, no
bodies, no keys: nothing secret.

The same writer carries the Embedded Metric Format lines (``write_line``, once per metrics interval), so they
share the backlog and its bound, are counted when dropped, and never interleave with access-log lines.

Must not: block or spin the event loop (a line is appended to a list; a full output is waited for by the loop;
only ``close()`` at exit waits, at most ``CLOSE_GRACE`` seconds), or log anything a client sent other than method
and request target (both restricted to visible ASCII by the parser, JSON-escaped here).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import stat
import time
from collections import deque
from typing import Protocol

log = logging.getLogger("mtls_proxy")

FLUSH_INTERVAL = 0.25
FLUSH_BYTES = 64 * 1024
PIPE_BUF = 4096
MAX_BUFFER = 1024 * 1024  # bytes of lines held while the output takes nothing; beyond it lines are dropped
RETRY_INTERVAL = 0.1  # seconds between write attempts when the loop cannot watch the descriptor
CLOSE_GRACE = 1.0  # seconds close() waits at most for a blocked output before counting the rest as dropped
_MILLIS = tuple(f"{i:03d}Z" for i in range(1000))  # the end of every timestamp, formatted once
_ABORTED = ',"upstream_aborted":true'
# The decimal form of 0..999, made once: a status is always in it, and so are the body sizes of most API exchanges
# (0 for a GET).  Formatting an int costs ~800 instructions, a tuple index a tenth of that (the table: ~60 KB).
_DECIMAL = tuple(str(i) for i in range(1000))


def connection_prefix(client: str, vpce_id: str | None, subject: str, fingerprint: str) -> str:
    """The JSON fragment shared by every line of one connection (built once)."""
    d = json.dumps
    return (f'"client":{d(client)},"vpce":{d(vpce_id)},"subject":{d(subject)},'
            f'"fingerprint":{d(fingerprint)}')


class _DropCounter(Protocol):
    log_lines_dropped: int


class _Counter:
    log_lines_dropped = 0


class AccessLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None = 1, metrics: _DropCounter | None = None
                 ) -> None:
        self._loop = loop
        self._fd = fd
        self._metrics: _DropCounter = metrics if metrics is not None else _Counter()
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._json: dict[str | None, str] = {None: "null"}
        self._backlog: deque[bytes] = deque()  # written pieces the output has not taken yet, in order
        self._backlog_size = 0
        self._blocked = False  # the output refused a write; the loop tells us when it takes more
        self._watching = False  # add_writer is registered (else: _retry)
        self._retry: asyncio.TimerHandle | None = None
        self._dropped = 0  # lines dropped since the output blocked (reported when it flows again)
        self._gone_reported = False
        if fd is not None:
            _make_nonblocking(fd)

    def _encode(self, value: str | None) -> str:
        encoded = json.dumps(value)
        if len(self._json) < 1024:  # bounded: rule names and error codes, never client input
            self._json[value] = encoded
        return encoded

    def write(self, prefix: str, rule: str | None, method: str, target: bytes, status: int, bytes_in: int,
              bytes_out: int, duration: float, upstream: float | None, error: str | None,
              upstream_aborted: bool = False) -> None:
        if self._fd is None:
            return
        if self._blocked and self._size + self._backlog_size >= MAX_BUFFER:
            self._drop(1)  # before formatting: a stalled log driver costs no CPU per request
            return
        # Rule names and error codes come from small fixed sets: JSON-encode each once.  The method is an HTTP
        # token and the target visible ASCII (both enforced by the parser), so only '"' and '\\' need escaping.
        js = self._json
        rule_j = js.get(rule) or self._encode(rule)
        error_j = js.get(error) or self._encode(error)
        path = target.decode("ascii", "replace")
        path_j = json.dumps(path) if ('"' in path or "\\" in path) else f'"{path}"'
        # The timestamp (UTC, ms): the date part is formatted once per second (inline: once per request).
        ms = int(time.time() * 1000)
        sec = ms // 1000
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        dec = _DECIMAL
        line = (f'{{"time":"{self._stamp}{_MILLIS[ms - sec * 1000]}",{prefix},"rule":{rule_j},"method":"{method}",'
                f'"path":{path_j},'
                f'"status":{dec[status] if 0 <= status < 1000 else status},'
                f'"bytes_in":{dec[bytes_in] if 0 <= bytes_in < 1000 else bytes_in},'
                f'"bytes_out":{dec[bytes_out] if 0 <= bytes_out < 1000 else bytes_out},'
                f'"duration_ms":{duration * 1000:.3f},'
                f'"upstream_ms":{"null" if upstream is None else f"{upstream * 1000:.3f}"},"error":{error_j}}}\n')
        if upstream_aborted:  # rare: kept out of the common line's formatting
            line = line[:-2] + _ABORTED + "}\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def write_line(self, line: str) -> None:
        """Queue one preformatted line (an Embedded Metric Format document, ``proxy.emf``) with the access-log
        lines: the same batching, the same bounded backlog, drops counted the same way.  Called once per metrics
        interval, never per request.  ``line`` ends with a newline and is shorter than PIPE_BUF, so it is written
        whole and never interleaves with another process's lines."""
        if self._fd is None:
            return
        if self._blocked and self._size + self._backlog_size >= MAX_BUFFER:
            self._drop(1)
            return
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines or self._fd is None:
            return
        lines = self._lines
        self._lines = []
        self._size = 0
        # Writes of at most PIPE_BUF bytes, each ending at a line end: several workers share one stdout pipe,
        # and only writes that small are atomic there, so lines never interleave.  Each piece holds as many whole
        # lines as fit (a line longer than PIPE_BUF goes alone); cut from one encoded block at the last newline
        # that fits, so the cost is per piece, not per line.  (Every line ends in a newline and is ASCII: the
        # parser admits only visible ASCII in a target, everything else is JSON-escaped; so bytes = characters.)
        data = "".join(lines).encode()
        self._backlog_size += len(data)
        backlog = self._backlog
        start = 0
        end = len(data)
        while end - start > PIPE_BUF:
            # just past the last line that fits; else the first line, which alone is longer than PIPE_BUF
            cut = data.rfind(b"\n", start, start + PIPE_BUF) + 1 or data.find(b"\n", start) + 1 or end
            backlog.append(data[start:cut])
            start = cut
        if start < end:
            backlog.append(data[start:] if start else data)
        if not self._blocked:
            self._write_backlog()

    def _write_backlog(self) -> None:
        """Write what the output takes now; wait for the loop's word if it takes less.  Never waits itself."""
        if self._write_some():
            if self._blocked:
                self._unblock()
        else:
            self._block()

    def _write_some(self) -> bool:
        """Write backlog pieces until the output refuses one (False) or none is left (True)."""
        backlog = self._backlog
        while backlog:
            piece = backlog[0]
            try:
                n = os.write(self._fd, piece)  # type: ignore[arg-type]
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._output_gone(exc)  # stdout closed (EPIPE): the proxy keeps serving
                return True
            self._backlog_size -= n
            if n < len(piece):
                if n:
                    backlog[0] = piece[n:]  # the rest of a line is written next, before anything else
                return False
            backlog.popleft()
        return True

    def _block(self) -> None:
        if self._blocked:
            if not self._watching:
                self._retry = self._loop.call_later(RETRY_INTERVAL, self._writable)
            return
        self._blocked = True
        try:
            self._loop.add_writer(self._fd, self._writable)  # type: ignore[arg-type]
            self._watching = True
        except (OSError, ValueError, NotImplementedError):  # e.g. a descriptor epoll cannot watch
            self._retry = self._loop.call_later(RETRY_INTERVAL, self._writable)

    def _unblock(self) -> None:
        self._blocked = False
        self._stop_waiting()
        if self._dropped:
            log.warning("access log output flowing again", extra={"fields": {"dropped_lines": self._dropped}})
            self._dropped = 0

    def _stop_waiting(self) -> None:
        if self._watching:
            self._watching = False
            try:
                self._loop.remove_writer(self._fd)  # type: ignore[arg-type]
            except (OSError, ValueError):
                pass
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _writable(self) -> None:
        self._retry = None
        self._write_backlog()

    def _drop(self, lines: int) -> None:
        if not lines:
            return
        if self._dropped == 0 and self._blocked:
            log.warning("access log output blocked: dropping lines until it takes writes again",
                        extra={"fields": {"buffered_bytes": self._size + self._backlog_size}})
        self._dropped += lines
        self._metrics.log_lines_dropped += lines

    def _output_gone(self, exc: OSError) -> None:
        lost = sum(p.count(b"\n") for p in self._backlog)
        self._backlog.clear()
        self._backlog_size = 0
        self._metrics.log_lines_dropped += lost
        if self._blocked:
            self._blocked = False
            self._stop_waiting()
        if not self._gone_reported:
            self._gone_reported = True
            log.warning("access log output cannot be written: lines are dropped",
                        extra={"fields": {"error": exc.strerror or str(exc)}})

    def close(self, grace: float = CLOSE_GRACE) -> None:
        """Flush everything; a blocked output gets up to ``grace`` seconds, then the rest is counted as dropped."""
        self.flush()
        if self._fd is None or not self._backlog:
            self._stop_waiting()
            return
        self._stop_waiting()  # from here on written directly, with a bounded wait
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        deadline = time.monotonic() + grace
        while not self._write_some():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            poller.poll(left * 1000)
        self._blocked = False
        if self._backlog:
            lost = sum(p.count(b"\n") for p in self._backlog)
            self._backlog.clear()
            self._backlog_size = 0
            self._metrics.log_lines_dropped += lost
            self._dropped += lost
            log.warning("access log output blocked at exit: lines dropped",
                        extra={"fields": {"dropped_lines": self._dropped}})
            self._dropped = 0


def _make_nonblocking(fd: int) -> None:
    """A pipe or socket may fill up (a slow log driver): make writes to it fail fast instead of waiting."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            os.set_blocking(fd, False)
    except OSError:
        pass
