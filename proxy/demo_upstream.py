"""A stand-in for a private API Gateway REST API, for the demo and the test suite.

Owns: an aiohttp HTTPS app that routes like API Gateway behind an ``execute-api`` endpoint: it answers
``403 {"message":"Forbidden"}`` unless the Host header's first label or ``x-apigw-api-id`` names its API id, and
unless the path starts with the stage (``/prod``).  Under the stage:

- ``GET  /{stage}/bytes/{n}``  n deterministic bytes (Content-Length, streamed in 64 KiB pieces)
- ``*    /{stage}/upload``      reads the body as a stream, answers ``{"bytes": n, "sha256": "..."}``
- ``*    /{stage}/...``         echoes ``method``, ``path`` (raw, with query), every received header (as a list of
                                pairs, duplicates kept) and the body's length and sha256.

Must not: be used as anything but a demo or test upstream.
"""

from __future__ import annotations

import hashlib
import json
import ssl

from aiohttp import web

PATTERN = bytes(range(256)) * 256  # 64 KiB of deterministic bytes


def pattern_bytes(n: int) -> bytes:
    """The bytes ``GET /{stage}/bytes/{n}`` returns (for tests that check downloads)."""
    reps, extra = divmod(n, len(PATTERN))
    return PATTERN * reps + PATTERN[:extra]


def make_app(api_id: str = "demo", stage: str = "prod") -> web.Application:
    prefix = f"/{stage}"

    async def handle(request: web.Request) -> web.StreamResponse:
        host = request.headers.get("Host", "").split(":")[0]
        if host.split(".")[0] != api_id and request.headers.get("x-apigw-api-id") != api_id:
            return web.json_response({"message": "Forbidden"}, status=403)
        path = request.path
        if path != prefix and not path.startswith(prefix + "/"):
            return web.json_response({"message": "Forbidden"}, status=403)
        sub = path[len(prefix):]
        if sub.startswith("/bytes/") and request.method == "GET":
            try:
                n = int(sub[len("/bytes/"):])
            except ValueError:
                return web.json_response({"message": "bad size"}, status=400)
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.content_length = n
            await resp.prepare(request)
            sent = 0
            while sent < n:
                piece = PATTERN[: min(len(PATTERN), n - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
            return resp
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        if sub == "/upload":
            return web.json_response({"bytes": size, "sha256": digest.hexdigest()})
        return web.json_response({
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_bytes": size,
            "body_sha256": digest.hexdigest(),
        }, dumps=json.dumps)

    app = web.Application(client_max_size=1024**4)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


async def start(host: str, port: int, cert: str, key: str, api_id: str = "demo",
                stage: str = "prod") -> web.AppRunner:
    """Start the demo upstream; returns the runner (``await runner.cleanup()`` stops it)."""
    runner = web.AppRunner(make_app(api_id, stage), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server_context(cert, key))
    await site.start()
    return runner
