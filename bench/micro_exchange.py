"""Per-request Python cost of the proxy's data path, without sockets or TLS.

Drives one ClientConnection and one pooled UpstreamConnection with in-memory transports through N keep-alive
exchanges (request head in, upstream head out, response in, response out, access-log line, metrics), so the
figure is the proxy's own per-request work.  Deterministic enough for callgrind:

    python bench/micro_exchange.py 20000                 # µs per exchange
    valgrind --tool=callgrind python bench/micro_exchange.py 2000   # instructions

RATE=1 in the environment gives the rule a rate limit no exchange reaches (the bucket is taken every time);
CERT_HEADER=1 adds RFC 9440 Client-Cert and Client-Cert-Chain lines the size of a real leaf and intermediate.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from proxy.accesslog import AccessLog  # noqa: E402
from proxy.config import AllowRule, load  # noqa: E402
from proxy.connection import ClientConnection  # noqa: E402
from proxy.runtime import Peer  # noqa: E402
from proxy.sockets import Lingerer  # noqa: E402
from proxy.slots import ConnectionSlots  # noqa: E402
from proxy.state import ServerState  # noqa: E402
from proxy.upstream import UpstreamConnection, UpstreamPool  # noqa: E402
from proxy.wire.headers import connection_block, upstream_block  # noqa: E402
from proxy.identity import Identity  # noqa: E402
from proxy.metrics import Metrics  # noqa: E402
from proxy.policy import Policy  # noqa: E402
from proxy.accesslog import connection_prefix  # noqa: E402
from proxy.wire.client_cert import rfc9440_lines  # noqa: E402
from proxy.partners import Partners, limits_of  # noqa: E402

REQUEST = (b"GET /orders/123?x=1 HTTP/1.1\r\nHost: localhost:18444\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
           b"X-Request-Id: abc\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 25 Nov 2026 22:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 207\r\nConnection: keep-alive\r\n\r\n" + b"x" * 207)


class MemTransport:
    def __init__(self) -> None:
        self.out = 0
        self.reading = True

    def write(self, data: bytes) -> None:
        self.out += len(data)

    def writelines(self, parts: list[bytes]) -> None:
        for p in parts:
            self.out += len(p)

    def is_reading(self) -> bool:
        return self.reading

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return _SSL if name == "ssl_object" else default


class _SSL:
    session = object()
    context = None


async def main(n: int) -> None:
    loop = asyncio.get_running_loop()
    env = {"MTLS_PROXY_SERVER_CERT": "x", "MTLS_PROXY_SERVER_KEY": "x", "MTLS_PROXY_SERVER_CLIENT_CA": "x",
           "MTLS_PROXY_UPSTREAM_URL": "https://api.test/prod", "MTLS_PROXY_ALLOW":
           '[{"name": "partner-a", "subject_cn": ["client-a"], "paths": ["/orders/**"]}]'}
    cfg = load(None, env)
    metrics = Metrics()
    log_fd = None if os.environ.get("NOLOG") else os.open(os.devnull, os.O_WRONLY)
    # The real shared state a ProxyServer builds, but no runtime: the connection is handed its Peer directly.
    srv = ServerState(loop, cfg, None, metrics, UpstreamPool(loop, cfg.upstream, None),  # type: ignore[arg-type]
                      AccessLog(loop, log_fd), Lingerer(loop), Partners(time.monotonic_ns, time.time),
                      ConnectionSlots(10, metrics))
    ident = Identity(subject="CN=client-a,O=partner", common_names=("client-a",), san_dns=(), san_uri=(),
                     serial="1A2B", fingerprint="ab" * 32, not_after=2e9,
                     xfcc='Hash=' + "ab" * 32 + ';Subject="CN=client-a,O=partner"', thumbprint="q" * 43)
    limited = bool(os.environ.get("RATE"))  # a limit no exchange of this run reaches: the bucket is taken each time
    rule = AllowRule(name="partner-a", subject_cn=("client-a",), paths=("/orders/**",),
                     rate_limit=1e6 if limited else None, burst=10**6 if limited else None)
    policy = Policy.compile((rule,), False)
    cert_lines = rfc9440_lines(b"L" * 700, (b"I" * 650,)) if os.environ.get("CERT_HEADER") else b""
    peer = Peer(ident, policy.for_connection(ident, None),
                connection_block(upstream_block(cfg.upstream), ident, "10.0.0.1", None, cert_lines),
                connection_prefix("10.0.0.1", None, ident.subject, ident.fingerprint), "10.0.0.1", None,
                limits_of([rule]))
    conn = ClientConnection(srv, peer)
    ct = MemTransport()
    conn.connection_made(ct)  # type: ignore[arg-type]
    up = UpstreamConnection(srv.pool)
    up.connection_made(MemTransport())  # type: ignore[arg-type]
    srv.pool._idle.append(up)
    for _ in range(200):  # warm-up
        conn.data_received(REQUEST)
        up.data_received(RESPONSE)
    t0 = time.perf_counter()
    for _ in range(n):
        conn.data_received(REQUEST)
        up.data_received(RESPONSE)
    dt = time.perf_counter() - t0
    assert srv.metrics.requests[("GET", "200", "partner-a")] == n + 200
    print(f"{n} exchanges: {dt / n * 1e6:.2f} us per exchange (proxy Python work, no IO)")
    srv.access_log.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000))
