"""``[metrics] emf = true`` on the real process: EMF lines on stdout, valid, and agreeing with ``/metrics``.

Owns: every ``_aws`` line the process writes passing the independent checker (``tests/emf_spec.py``), and the
per-interval ``Requests`` increases in the totals documents adding up to ``mtls_proxy_requests_total`` over the
same requests, for one worker (the server emits) and for two (the supervisor alone emits: no double counting).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.e2e.kit import Ops, admin_addr, eventually, scrape
from tests.emf_spec import check_line, metric_values
from tests.harness import ProxyProcess, get

CLOSE = b"Connection: close\r\n"
EMF_ENV = {"MTLS_PROXY_METRICS_EMF": "true", "MTLS_PROXY_METRICS_INTERVAL": "0.5",
           "MTLS_PROXY_METRICS_NAMESPACE": "mtls-proxy-test"}


def emf_documents(proc: ProxyProcess) -> list[dict]:
    docs = []
    text = proc.stdout()
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            continue  # a line still being written
        if "_aws" in json.loads(line):
            docs.append(check_line(line))
    return docs


def emitted_requests(docs: list[dict]) -> float:
    # The totals document is the one carrying the ConnectionsActive gauge; Requests there is the interval's increase.
    return sum(metric_values(d).get("Requests", 0) for d in docs if "ConnectionsActive" in metric_values(d))


@pytest.mark.parametrize("workers", [1, 2])
async def test_emf_lines_are_valid_and_agree_with_metrics(ops: Ops, workers: int) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream(), server={"workers": workers}), env=EMF_ENV)
    n = 12
    for i in range(n):
        c = await ops.client(proc.port)
        assert (await c.request(get(f"/emf/{i}", extra=CLOSE))).status == 200
        await c.close()

    async def scraped() -> float | None:
        s = await scrape(admin_addr(proc))
        total = sum(s.series("mtls_proxy_requests_total").values())
        return total if total == n else None

    assert await eventually(scraped, timeout=15) == n

    async def emitted() -> list[dict] | None:
        docs = emf_documents(proc)
        return docs if emitted_requests(docs) >= n else None

    docs = await eventually(emitted, timeout=15)
    assert docs and all(d["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "mtls-proxy-test" for d in docs)
    # Wait a few more intervals: the sum must stay at n (a second emitter, or a counter reported twice, would grow it).
    await asyncio.sleep(1.6)
    assert emitted_requests(emf_documents(proc)) == n
    assert sum((await scrape(admin_addr(proc))).series("mtls_proxy_requests_total").values()) == n
