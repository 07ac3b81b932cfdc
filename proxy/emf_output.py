"""Writing the Embedded Metric Format lines to stdout: every ``metrics.interval`` seconds, and once more at exit.

Owns: the timer (emissions fall on multiples of the interval in wall-clock time, so every task writes one set of
lines per CloudWatch period), the clock reading that stamps the documents, and handing the lines ``proxy.emf`` builds
to an ``AccessLog`` writer: its non-blocking, bounded output means a stalled stdout never blocks the event loop, and
a line that cannot be held is dropped and counted in ``log_lines_dropped`` like an access-log line.

Which process writes: exactly one per task, because CloudWatch adds up whatever the lines say.  A single-process
proxy writes its own counts.  With ``server.workers`` > 1 the supervisor writes the sum over its workers (from the
snapshots it already polls for ``/metrics``, twice a second) and the workers write none; a worker that drains waits
for one more poll before it exits, so its last requests are in the supervisor's final lines.

Must not: run per request (the per-request path only bumps the counters ``proxy.metrics`` keeps), or block the loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Mapping

from .accesslog import AccessLog
from .config import MetricsConfig
from .emf import EmfEmitter
from .metrics import Snapshot

log = logging.getLogger("mtls_proxy")

Sources = Callable[[], Mapping[Hashable, Snapshot]]


class EmfOutput:
    def __init__(self, loop: asyncio.AbstractEventLoop, cfg: MetricsConfig, out: AccessLog, sources: Sources,
                 *, owns_out: bool = False) -> None:
        """``sources`` returns the latest snapshot of every counting process, keyed by a stable id of the process;
        it is called once per emission.  ``owns_out``: ``out`` is this object's own writer (closed with it), not the
        access log's."""
        self._loop = loop
        self._interval = cfg.interval
        self._emitter = EmfEmitter(cfg.namespace)
        self._out = out
        self._owns_out = owns_out
        self._sources = sources
        self._task: asyncio.Task[None] | None = None
        self.emissions = 0

    def start(self) -> None:
        self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval - time.time() % self._interval)
            self.emit()

    def emit(self) -> None:
        """Write the lines for the interval that ends now."""
        try:
            lines = self._emitter.lines(self._sources(), time.time())
        except Exception:  # a bug here must not stop the timer (or the drain): say so and try next interval
            log.exception("cannot build the metric lines")
            return
        for line in lines:
            self._out.write_line(line)
        self.emissions += 1

    def close(self) -> None:
        """Stop the timer and write the last interval's lines (called at the end of a drain)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.emit()
        if self._owns_out:
            self._out.close()
        else:
            self._out.flush()
