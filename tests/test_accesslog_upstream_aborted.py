"""accesslog: the ``upstream_aborted`` field -- present (true) only on a line whose upstream request was cut."""

from __future__ import annotations

import asyncio
import json
import os

from proxy.accesslog import AccessLog, connection_prefix

PREFIX = connection_prefix("10.0.0.1", None, "CN=client-a", "ab" * 32)


async def test_upstream_aborted_is_added_only_when_true_and_the_line_stays_json() -> None:
    r, w = os.pipe()
    try:
        log = AccessLog(asyncio.get_running_loop(), w)
        for aborted in (False, True, False):
            log.write(PREFIX, None, "POST", b"/up", 400, 5, 60, 0.001, 0.0005, "bad_request", aborted)
        log.write(PREFIX, None, "GET", b"/plain", 200, 0, 2, 0.001, None, None)  # the default: not aborted
        log.close()
        lines = [json.loads(x) for x in os.read(r, 1 << 16).decode().splitlines()]
    finally:
        os.close(r)
        os.close(w)
    assert [x.get("upstream_aborted") for x in lines] == [None, True, None, None]
    assert list(lines[1])[-2:] == ["error", "upstream_aborted"] and lines[1]["error"] == "bad_request"
    assert "upstream_aborted" not in lines[0] and "upstream_aborted" not in lines[3]
