"""A load generator for the adversarial suite: many concurrent TLS clients, mixed sizes, every response checked.

Owns: ``run_clients`` -- N clients, each on its own TLS connection (client certificate, fresh handshake every
``reconnect_every`` requests), looping until a deadline over a weighted mix of requests to the demo upstream
(``proxy.dev.demo_upstream``): small echoes, downloads of 100 B .. 256 KiB, and uploads of 1 KiB .. 128 KiB framed by
Content-Length or chunked.  Every response is checked byte for byte (echoed target, downloaded pattern, uploaded
sha256), so "zero errors" means every exchange was complete and correct, not merely answered.

Must not: sleep between requests (the point is load), or keep going past its deadline (loops are bounded in time).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.dev.demo_upstream import pattern_bytes
from tests.harness import RawClient, Response

H = b"Host: api.test\r\n"
DOWNLOADS = (100, 4096, 65536, 262144)
UPLOADS = (1024, 32768, 131072)


@dataclass
class LoadStats:
    requests: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    kinds: Counter[str] = field(default_factory=Counter)


Check = Callable[[Response], None]


def _echo(client: int, n: int, rng: random.Random) -> tuple[bytes, Check]:
    target = f"/load/{client}/{n}?q={rng.randrange(10**6)}"

    def check(resp: Response) -> None:
        assert resp.status == 200, (resp.status, resp.body[:200])
        assert resp.json()["path"] == "/prod" + target, resp.body[:200]

    return b"GET " + target.encode() + b" HTTP/1.1\r\n" + H + b"\r\n", check


def _download(client: int, n: int, rng: random.Random) -> tuple[bytes, Check]:
    size = rng.choice(DOWNLOADS)

    def check(resp: Response) -> None:
        assert resp.status == 200, (resp.status, resp.body[:200])
        assert resp.body == pattern_bytes(size), f"download of {size} bytes came back as {len(resp.body)}"

    return b"GET /bytes/%d HTTP/1.1\r\n" % size + H + b"\r\n", check


def _upload(client: int, n: int, rng: random.Random, chunked: bool) -> tuple[bytes, Check]:
    size = rng.choice(UPLOADS)
    body = rng.randbytes(size)
    digest = hashlib.sha256(body).hexdigest()

    def check(resp: Response) -> None:
        assert resp.status == 200, (resp.status, resp.body[:200])
        assert resp.json() == {"bytes": size, "sha256": digest}, resp.body[:200]

    head = b"POST /upload HTTP/1.1\r\n" + H + b"Content-Type: application/octet-stream\r\n"
    if not chunked:
        return head + b"Content-Length: %d\r\n\r\n" % size + body, check
    third = size // 3
    pieces = [body[:third], body[third:2 * third], body[2 * third:]]
    framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed, check


MIX: dict[str, tuple[int, Callable[[int, int, random.Random], tuple[bytes, Check]]]] = {
    "echo": (50, _echo),
    "download": (25, _download),
    "upload-cl": (15, lambda c, n, r: _upload(c, n, r, chunked=False)),
    "upload-chunked": (10, lambda c, n, r: _upload(c, n, r, chunked=True)),
}


async def _client(i: int, port: int, ctx: ssl.SSLContext, deadline: float, stats: LoadStats,
                  reconnect_every: int, seed: int) -> None:
    rng = random.Random(seed * 100_003 + i)
    names = list(MIX)
    weights = [MIX[k][0] for k in names]
    n = 0
    while time.monotonic() < deadline:
        try:
            c = await asyncio.wait_for(RawClient.connect(port, ctx), 30)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            stats.errors.append(f"client {i}: connect: {exc!r}")
            continue
        stats.connections += 1
        try:
            for _ in range(reconnect_every):
                if time.monotonic() >= deadline:
                    break
                kind = rng.choices(names, weights)[0]
                data, check = MIX[kind][1](i, n, rng)
                n += 1
                resp = await c.request(data, timeout=60)
                check(resp)
                stats.requests += 1
                stats.kinds[kind] += 1
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, AssertionError, ValueError) as exc:
            stats.errors.append(f"client {i} request {n}: {exc!r}"[:500])
        finally:
            await c.close()


async def run_clients(port: int, ctx: ssl.SSLContext, clients: int, seconds: float, *, reconnect_every: int = 40,
                      seed: int = 6) -> LoadStats:
    """Run ``clients`` concurrent clients for ``seconds``; returns what they did (errors included, never raised)."""
    stats = LoadStats()
    deadline = time.monotonic() + seconds
    await asyncio.gather(*(_client(i, port, ctx, deadline, stats, reconnect_every, seed) for i in range(clients)))
    return stats
