"""Command line: ``serve``, ``check``, ``certs init``, ``demo``.

Owns: argument parsing, turning every expected failure into one line on stderr and a non-zero exit, event-log
setup (JSON lines on stderr; the access log is stdout), and choosing the event loop (``serve --loop``: uvloop when
it is installed, as in production, or asyncio's own loop, which the test suite also runs the process on).

Must not: contain proxy logic; every command calls into the package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import config as config_mod
from .errors import ConfigErrors

log = logging.getLogger("mtls_proxy")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "msg": record.getMessage()}
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False


LOOPS = ("auto", "uvloop", "asyncio")


def _run(coro_factory: object, loop: str = "auto") -> int:
    """Run the coroutine on the chosen loop: ``auto`` is uvloop when installed, else asyncio."""
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            if loop == "uvloop":
                raise
        else:
            return uvloop.run(coro_factory())  # type: ignore[operator, no-any-return]
    return asyncio.run(coro_factory())  # type: ignore[operator, no-any-return]


def _load(path: str | None) -> config_mod.Config | None:
    try:
        return config_mod.load(path)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    if args.loop == "uvloop" and not _has_uvloop():
        print("error: --loop uvloop: uvloop is not installed", file=sys.stderr)
        return 1
    # A SIGHUP (reload) that arrives before the event loop installs its handler must not kill the process with
    # the default action: a supervisor forwards SIGHUP to workers that may still be starting.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    cfg = _load(args.config)
    if cfg is None:
        return 1
    setup_logging(cfg.log.level)
    from .runtime import build_runtime

    try:
        # Fail fast with one line per bad file, before binding anything; the snapshot built here is the one the
        # server starts with (reading and parsing every certificate twice would double the start-up work).
        runtime = build_runtime(cfg)
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
        return 1
    from .supervisor import CONTROL_ENV, supervise

    control = os.environ.get(CONTROL_ENV)
    if cfg.server.workers > 1 and control is None:
        del runtime  # the supervisor serves no TLS: each worker builds and uses its own
        return supervise(cfg, args.loop)
    from .server import run

    try:
        return _run(lambda: run(cfg, control_fd=int(control) if control else None, runtime=runtime), args.loop)
    except OSError as exc:
        print(f"error: {_bind_error(cfg, exc)}", file=sys.stderr)
        return 1


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return False
    return True


def _bind_error(cfg: config_mod.Config, exc: OSError) -> str:
    """Name the listener that could not bind.  The admin port binds first (``/healthz`` answers from the start)
    through ``loop.create_server``, whose message carries the address ("... on address ('127.0.0.1', 9100): ...");
    the proxy's own ``bind()`` gives the bare strerror."""
    text = str(exc.strerror or exc)
    admin = cfg.admin.listen
    if re.search(rf", {admin.port}[,)]", text):
        return f"admin.listen: cannot listen on {admin}: {text}"
    return f"server.listen: cannot listen on {cfg.server.listen}: {text}"


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check

    errors, warnings = check(args.config)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 1
    print(f"ok: {args.config or config_mod.ENVIRONMENT} is valid ({len(warnings)} warning(s))")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from .dev.devpki import DevPkiError, init_dev_pki

    try:
        written = init_dev_pki(Path(args.dir), clients=args.client, server_names=args.server_name, force=args.force)
    except DevPkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {args.dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(written)} files to {args.dir} (development only; keys are mode 0600 and git-ignored)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .dev.demo import run_demo
    from .dev.devpki import DevPkiError

    setup_logging("info")
    try:
        return _run(lambda: run_demo(Path(args.dir), args.listen, args.admin, args.upstream_port))
    except ConfigErrors as exc:
        for err in exc.errors:
            print(f"error: {err}", file=sys.stderr)
    except DevPkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"error: demo: {exc.strerror or exc}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtls-proxy", description="Mutual-TLS reverse proxy for private APIs.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the proxy")
    s.add_argument("--config", help="TOML file (optional: MTLS_PROXY_* environment variables alone also work)")
    s.add_argument("--loop", choices=LOOPS, default="auto",
                   help="event loop: auto (uvloop when installed, the default), uvloop, or asyncio's own")
    s.set_defaults(func=cmd_serve)
    c = sub.add_parser("check", help="validate the configuration and every file it names")
    c.add_argument("--config")
    c.set_defaults(func=cmd_check)
    certs = sub.add_parser("certs", help="development certificates")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser("init", help="write a development PKI into DIR")
    ci.add_argument("dir")
    ci.add_argument("--client", action="append", default=[], metavar="NAME", help="extra client certificate")
    ci.add_argument("--server-name", action="append", default=[], metavar="NAME", help="extra server SAN")
    ci.add_argument("--force", action="store_true", help="overwrite existing files")
    ci.set_defaults(func=cmd_certs_init)
    d = sub.add_parser("demo", help="proxy + built-in demo API upstream with development certificates")
    d.add_argument("--dir", default="certs")
    d.add_argument("--listen", default="127.0.0.1:8443")
    d.add_argument("--admin", default="127.0.0.1:9100")
    d.add_argument("--upstream-port", type=int, default=9443)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
