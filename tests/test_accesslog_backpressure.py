"""accesslog: a full output pipe never blocks or spins the loop; lines beyond the bound are dropped and counted.

A real pipe whose reader does not read (the test drains it only when it says so), on both event loops: the log
makes the write end non-blocking, keeps at most ``MAX_BUFFER`` bytes of lines, counts the rest in
``log_lines_dropped``, says so once in the event log, resumes by itself when the pipe drains (the loop's writer
callback, no request needed) and says so again; lines are never torn.  ``close()`` waits at most its grace for a
blocked pipe.  tests/adversarial/test_log_backpressure.py does the same against the real process and a stopped
``cat``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Iterator

import pytest
import uvloop

from proxy import accesslog
from proxy.accesslog import AccessLog, connection_prefix
from proxy.metrics import Metrics

PREFIX = connection_prefix("10.0.0.1", None, "CN=client-a", "ab" * 32)
LOOPS = pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                                ids=["asyncio", "uvloop"])


class Pipe:
    def __init__(self) -> None:
        self.r, self.w = os.pipe()  # both ends blocking, as a log driver's pipe usually is
        self.got = b""

    def drain(self) -> bytes:
        os.set_blocking(self.r, False)
        try:
            while True:
                try:
                    chunk = os.read(self.r, 1 << 20)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                self.got += chunk
        finally:
            os.set_blocking(self.r, True)
        return self.got

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


def line(log: AccessLog, i: int) -> None:
    log.write(PREFIX, None, "GET", b"/%d/" % i + b"p" * 1000, 200, 0, 2, 0.001, None, None)


def run(loop_factory: object, main: object) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[arg-type]
        runner.run(main())  # type: ignore[operator]


@LOOPS
def test_a_full_pipe_neither_blocks_nor_spins_and_drops_beyond_the_bound(
        loop_factory: object, pipe: Pipe, caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    n = 3000  # ~3.2 MB of lines: far beyond the pipe (64 KiB) and MAX_BUFFER (1 MiB)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        log = AccessLog(loop, pipe.w, m)
        assert not os.get_blocking(pipe.w)  # a pipe is switched to non-blocking
        t0 = time.process_time()
        for i in range(n):
            line(log, i)
            if i % 100 == 0:
                await asyncio.sleep(0)  # loop turns (and flush timers) in between, as under real traffic
        log.flush()
        assert time.process_time() - t0 < 5  # no busy-wait on EAGAIN (main spun here for ever)
        assert m.log_lines_dropped > 0
        held = log._size + log._backlog_size
        assert held <= accesslog.MAX_BUFFER + 2000, held  # bounded: at most the bound plus one line
        cpu = time.process_time()
        await asyncio.sleep(0.5)  # blocked and idle: the loop sleeps (a writer callback, not a poll)
        assert time.process_time() - cpu < 0.2
        warned = [r for r in caplog.records if r.getMessage().startswith("access log output blocked")]
        assert len(warned) == 1  # said once, not once per line

        # the reader wakes up: the backlog goes out by itself, no new request needed
        deadline = time.monotonic() + 10
        while (log._backlog or log._lines) and time.monotonic() < deadline:
            pipe.drain()
            await asyncio.sleep(0.01)
        assert not log._backlog
        flowing = [r for r in caplog.records if r.getMessage() == "access log output flowing again"]
        assert len(flowing) == 1 and flowing[0].fields["dropped_lines"] == m.log_lines_dropped  # type: ignore[attr-defined]
        line(log, n)  # and new lines are written again
        log.close()

    caplog.set_level(logging.WARNING, logger="mtls_proxy")
    run(loop_factory, main)
    lines = [json.loads(x) for x in pipe.drain().decode().splitlines()]  # every line whole: none torn
    paths = [int(x["path"].split("/")[1]) for x in lines]
    assert paths == sorted(paths) and paths[-1] == n  # in order, the one after the stall included
    assert len(lines) + m.log_lines_dropped == n + 1  # each line written or counted, none lost silently


@LOOPS
def test_close_waits_at_most_its_grace_for_a_blocked_pipe_and_counts_the_rest(loop_factory: object,
                                                                              pipe: Pipe) -> None:
    m = Metrics()

    async def main() -> None:
        log = AccessLog(asyncio.get_running_loop(), pipe.w, m)
        for i in range(400):  # ~400 KB: the pipe takes 64 KiB, the rest waits in the backlog
            line(log, i)
        log.flush()
        assert log._backlog
        t0 = time.monotonic()
        log.close(grace=0.3)
        assert 0.25 <= time.monotonic() - t0 < 3  # waited for the pipe, but not for ever
        assert not log._backlog

    run(loop_factory, main)
    written = len(pipe.drain().decode().splitlines())
    assert written + m.log_lines_dropped == 400 and m.log_lines_dropped > 0


@LOOPS
def test_close_writes_everything_a_draining_reader_takes(loop_factory: object, pipe: Pipe) -> None:
    m = Metrics()

    async def main() -> None:
        log = AccessLog(asyncio.get_running_loop(), pipe.w, m)
        for i in range(400):
            line(log, i)
        log.flush()
        reader = asyncio.get_running_loop().run_in_executor(None, read_all, pipe.r)
        log.close(grace=10)
        os.close(pipe.w)
        pipe.got = await reader

    run(loop_factory, main)
    assert m.log_lines_dropped == 0 and len(pipe.got.decode().splitlines()) == 400


def read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 1 << 16):
        out += chunk
    return out


def test_a_regular_file_is_left_blocking(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "access.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        async def main() -> None:
            log = AccessLog(asyncio.get_running_loop(), fd)
            assert os.get_blocking(fd)
            line(log, 1)
            log.close()

        asyncio.run(main())
    finally:
        os.close(fd)
    with open(path, encoding="ascii") as fh:
        assert json.loads(fh.read())["status"] == 200


def test_the_dropped_lines_counter_is_exported_from_the_start_and_summed_over_workers() -> None:
    from proxy.metrics import families, merge

    def value(snap: dict) -> float:  # type: ignore[type-arg]
        (fam,) = [f for f in families(snap) if f.name == "mtls_proxy_log_lines_dropped"]
        assert fam.type == "counter"
        (sample,) = fam.samples
        return sample.value  # type: ignore[no-any-return]

    assert value(Metrics().snapshot()) == 0  # present before the first drop: rate() sees the first one
    a, b = Metrics(), Metrics()
    a.log_lines_dropped, b.log_lines_dropped = 7, 5
    assert value(merge([a.snapshot(), b.snapshot()])) == 12
