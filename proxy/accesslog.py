"""The access log: one JSON object per request on stdout, written in batches.

Owns: the line format, the per-connection prefix (client address, endpoint id, subject, fingerprint: escaped
once per connection), and batching (lines are collected and written at most every ``FLUSH_INTERVAL`` seconds or
when ``FLUSH_BYTES`` accumulate, so a busy proxy does not pay one write syscall per request).  ``close()`` flushes
what is left, so a drain loses no lines.

Fields: time (UTC, ms), client, vpce, subject, fingerprint, rule, method, path (as received), status, bytes_in
(request body), bytes_out (response body), duration_ms, upstream_ms, error (machine code or null), and only on
a request whose start had already been sent upstream when the proxy cut it (a malformed chunk or too much body
later in the stream, a client that stalled or left mid-body): ``"upstream_aborted":true``.  No header values, no
bodies, no keys: nothing secret.

Must not: block the event loop for long (a line is appended to a list), or log anything a client sent other than
method and request target (both restricted to visible ASCII by the parser, JSON-escaped here).
"""

from __future__ import annotations

import asyncio
import json
import os
import time

FLUSH_INTERVAL = 0.25
FLUSH_BYTES = 64 * 1024
PIPE_BUF = 4096
_MILLIS = tuple(f"{i:03d}Z" for i in range(1000))  # the end of every timestamp, formatted once
_ABORTED = ',"upstream_aborted":true'


def connection_prefix(client: str, vpce_id: str | None, subject: str, fingerprint: str) -> str:
    """The JSON fragment shared by every line of one connection (built once)."""
    d = json.dumps
    return (f'"client":{d(client)},"vpce":{d(vpce_id)},"subject":{d(subject)},'
            f'"fingerprint":{d(fingerprint)}')


class AccessLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None = 1) -> None:
        self._loop = loop
        self._fd = fd
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._second = -1
        self._stamp = ""
        self._json: dict[str | None, str] = {None: "null"}

    def _encode(self, value: str | None) -> str:
        encoded = json.dumps(value)
        if len(self._json) < 1024:  # bounded: rule names and error codes, never client input
            self._json[value] = encoded
        return encoded

    def _time(self) -> str:
        ms = int(time.time() * 1000)
        sec = ms // 1000
        if sec != self._second:  # format the date part once per second
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        return self._stamp + _MILLIS[ms - sec * 1000]

    def write(self, prefix: str, rule: str | None, method: str, target: bytes, status: int, bytes_in: int,
              bytes_out: int, duration: float, upstream: float | None, error: str | None,
              upstream_aborted: bool = False) -> None:
        if self._fd is None:
            return
        # Rule names and error codes come from small fixed sets: JSON-encode each once.  The method is an HTTP
        # token and the target visible ASCII (both enforced by the parser), so only '"' and '\\' need escaping.
        js = self._json
        rule_j = js.get(rule) or self._encode(rule)
        error_j = js.get(error) or self._encode(error)
        path = target.decode("ascii", "replace")
        path_j = json.dumps(path) if ('"' in path or "\\" in path) else f'"{path}"'
        line = (f'{{"time":"{self._time()}",{prefix},"rule":{rule_j},"method":"{method}","path":{path_j},'
                f'"status":{status},"bytes_in":{bytes_in},"bytes_out":{bytes_out},'
                f'"duration_ms":{duration * 1000:.3f},'
                f'"upstream_ms":{"null" if upstream is None else f"{upstream * 1000:.3f}"},"error":{error_j}'
                f'{_ABORTED if upstream_aborted else ""}}}\n')
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
        # and only writes that small are atomic there, so lines never interleave.
        piece: list[str] = []
        size = 0
        for line in lines:
            if size + len(line) > PIPE_BUF and piece:
                self._write("".join(piece).encode())
                piece, size = [], 0
            piece.append(line)
            size += len(line)
        if piece:
            self._write("".join(piece).encode())

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._fd, view)  # type: ignore[arg-type]
            except BlockingIOError:
                continue
            except OSError:
                return  # stdout gone (closed pipe): the proxy keeps serving
            view = view[n:]

    def close(self) -> None:
        self.flush()
