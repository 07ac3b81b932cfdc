"""Fixtures for the end-to-end tests in tests/e2e/ (the ``pki`` fixture comes from tests/conftest.py).

Owns: one event-loop error recorder (``loop_errors``) and one kit per test (``ops``: tests/e2e/kit.py starts and
stops every upstream, proxy, process and client); the other fixtures are thin names over that kit for the
groups of modules that use them.
Must not: hold module-level mutable state; every fixture stops and closes what it started.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.e2e.kit import CountingUpstream, CurlResult, Ops, SniUpstream
from tests.harness import RawClient, RunningProxy, get
from tests.pki import Pki

# Tests marked ``@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])`` run on both loops (production
# uses uvloop; the TLS transport is driven by readiness callbacks whose timing differs between the two).
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
CURL = "/usr/bin/curl"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Both loops for tests that ask for them by name; the default asyncio loop for every other test."""
    marker = item.get_closest_marker("asyncio")
    if marker is not None and marker.kwargs.get("loop_factories"):
        return dict(LOOP_FACTORIES)
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Every exception the event loop could not deliver (a proxy callback that raised); any fails the test.
    Torn down after the kit, so errors raised while proxies stop are caught too."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []

    def record(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.append(context)
        lp.default_exception_handler(context)

    loop.set_exception_handler(record)
    yield seen
    loop.set_exception_handler(None)
    assert not seen, f"unhandled exceptions on the event loop: {seen}"


@pytest.fixture
async def ops(pki: Pki, tmp_path: Path, loop_errors: list[dict[str, Any]]) -> AsyncIterator[Ops]:
    """The kit for one test; everything it started is stopped at teardown."""
    kit = Ops(pki, tmp_path)
    try:
        yield kit
    finally:
        await kit.close()


# -- forwarding and errors (test_forwarding.py, test_errors.py) ---------------------------------------------

@pytest.fixture
async def fwd_demo(ops: Ops) -> int:
    """Port of a running demo upstream (upstream CA, names api.test/localhost)."""
    return await ops.upstream()


@pytest.fixture
def fwd_scripted(ops: Ops) -> Callable[..., Awaitable[SniUpstream]]:
    """async (handler, which="good") -> a scripted upstream that records the SNI it saw."""
    return ops.scripted


@pytest.fixture
def fwd_proxy(ops: Ops) -> Callable[..., Awaitable[RunningProxy]]:
    """async (upstream_port, **write_config sections) -> RunningProxy."""
    return ops.proxy


@pytest.fixture
def fwd_client(ops: Ops) -> Callable[..., Awaitable[RawClient]]:
    """async (proxy, name="good") -> RawClient."""
    async def connect(rp: RunningProxy, name: str = "good") -> RawClient:
        return await ops.client(rp.port, name)

    return connect


@pytest.fixture
def fwd_assert_alive(fwd_client: Callable[..., Awaitable[RawClient]]) -> Callable[[RunningProxy], Awaitable[None]]:
    """async (proxy) -> None: a fresh connection still gets 200 (the proxy survived)."""
    async def check(rp: RunningProxy) -> None:
        c = await fwd_client(rp)
        resp = await c.request(get("/alive", extra=b"Connection: close\r\n"))
        assert resp.status == 200, resp.body

    return check


# -- auth: TLS client authentication, policy rules, identity headers, access log ------------------------------

@pytest.fixture
async def auth_upstream(ops: Ops) -> CountingUpstream:
    """The demo upstream (it echoes method, raw path and headers) recording each request it received."""
    return await ops.recording_upstream()


@pytest.fixture
def auth_proxy(ops: Ops, auth_upstream: CountingUpstream) -> Callable[..., Awaitable[RunningProxy]]:
    """async (upstream_port=auth_upstream, **write_config sections) -> RunningProxy."""
    async def start(upstream_port: int | None = None, **sections: Any) -> RunningProxy:
        return await ops.proxy(auth_upstream.port if upstream_port is None else upstream_port, **sections)

    return start


@pytest.fixture
def auth_curl() -> Callable[..., Awaitable[CurlResult]]:
    """async (*args) -> CurlResult: the real /usr/bin/curl, without ~/.curlrc or proxy variables."""
    if not os.access(CURL, os.X_OK):
        pytest.skip(f"{CURL} is not installed")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "CURL_HOME"}

    async def run(*args: str) -> CurlResult:
        # -q first: ignore ~/.curlrc; --noproxy: a CI proxy variable must not reroute localhost.
        proc = await asyncio.create_subprocess_exec(
            CURL, "-q", "--silent", "--show-error", "--noproxy", "*", "--max-time", "30", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return CurlResult(proc.returncode, out, err.decode(errors="replace"))

    return run
