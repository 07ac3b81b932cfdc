"""A stand-in for a private API Gateway REST API, for the demo and the test suite.

Owns: an aiohttp HTTPS app that routes like API Gateway behind an ``execute-api`` endpoint: it answers
``403 {"message":"Forbidden"}`` unless the Host header's first label or ``x-apigw-api-id`` names its API id, and
unless the path starts with the stage (``/prod``).  Under the stage:

- ``GET  /{stage}/bytes/{n}``  n deterministic bytes (Content-Length, streamed in 64 KiB pieces)
- ``*    /{stage}/upload``      reads the body as a stream, answers ``{"bytes": n, "sha256": "..."}``
- ``*    /{stage}/...``         echoes ``method``, ``path`` (raw, with query), every received header (as a list of
                                pairs, duplicates kept) and the body's length and sha256.

``python -m proxy.dev.demo_upstream --listen HOST:PORT --cert FILE --key FILE [--api-id ID] [--stage NAME]`` serves it
as a process until SIGTERM or SIGINT (the compose stack and the container test run it that way).

Must not: be used as anything but a demo or test upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import ssl
import sys
from collections.abc import Sequence

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


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


async def serve(host: str, port: int, cert: str, key: str, api_id: str, stage: str) -> int:
    """Serve until SIGTERM or SIGINT; the handlers only set an event."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = await start(host, port, cert, key, api_id, stage)
    print(f"demo upstream (api id {api_id!r}, stage {stage!r}) listening on https://{host}:{port}/", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.dev.demo_upstream",
                                description="A stand-in for a private API Gateway REST API (demo and tests only).")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 9443), metavar="HOST:PORT",
                   help="address to listen on (default 127.0.0.1:9443)")
    p.add_argument("--cert", required=True, help="server certificate chain (PEM), e.g. upstream.crt of certs init")
    p.add_argument("--key", required=True, help="its private key (PEM)")
    p.add_argument("--api-id", default="demo", help="the API id Host or x-apigw-api-id must name (default demo)")
    p.add_argument("--stage", default="prod", help="the stage every path must start with (default prod)")
    args = p.parse_args(argv)
    host, port = args.listen
    try:
        server_context(args.cert, args.key)  # one clear line for a bad pair, before anything starts
    except (OSError, ssl.SSLError) as exc:
        print(f"error: cannot load --cert {args.cert} / --key {args.key}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(serve(host, port, args.cert, args.key, args.api_id, args.stage))
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
