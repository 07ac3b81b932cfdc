"""Real remote sources on loopback, for the source tests: moto's server and an HTTP(S) distribution point.

Owns: ``start_moto`` (moto's server mode as a subprocess on an ephemeral port: a real S3, Secrets Manager and SSM
API speaking HTTP, which boto3 reaches through ``AWS_ENDPOINT_URL`` with dummy credentials) and
``DistributionPoint`` (a threaded HTTP server that serves bytes with an ETag and Last-Modified, answers
conditional requests with 304, optionally over TLS, and records every request it saw).

Must not: talk to anything but 127.0.0.1, or sleep a fixed time (readiness is polled).
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import os
import re
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account


@dataclass
class MotoServer:
    proc: subprocess.Popen[bytes]
    endpoint: str
    log: Path

    def env(self) -> dict[str, str]:
        """What a process needs to use this server instead of AWS (and never the real credential chain)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing", "AWS_REGION": REGION,
                "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self, service: str) -> Any:
        """A boto3 client for the test's own calls (creating buckets, rotating secrets)."""
        import boto3

        return boto3.session.Session().client(
            service, region_name=REGION, endpoint_url=self.endpoint, aws_access_key_id="testing",
            aws_secret_access_key="testing", aws_session_token="testing")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_moto(directory: Path, timeout: float = 30.0) -> MotoServer:
    """``python -m moto.server`` on port 0; the port is read from its start-up line, then readiness polled."""
    log = directory / "moto.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    endpoint = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited {proc.returncode}: {log.read_text()}")
        if endpoint is None:
            found = re.search(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
            endpoint = found.group(1) if found else None
        if endpoint is not None:
            try:
                with urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2) as resp:
                    if resp.status == 200:
                        return MotoServer(proc, endpoint, log)
            except OSError:
                pass
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"moto server not ready after {timeout} s: {log.read_text()}")


# ---- an HTTP(S) distribution point --------------------------------------------------------------------------


@dataclass
class Served:
    data: bytes
    etag: str | None
    last_modified: str | None
    lie_length: int | None = None  # announce this Content-Length, then send ``data`` and close (a cut body)


@dataclass(frozen=True, slots=True)
class Seen:
    path: str
    headers: dict[str, str]
    status: int


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, ssl.SSLError)):  # a client that hung up early
            super().handle_error(request, client_address)


@dataclass
class DistributionPoint:
    """``put(path, data)`` publishes; every request lands in ``seen``.  ``redirects`` maps a path to a URL."""

    tls: ssl.SSLContext | None = None
    files: dict[str, Served] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    _server: _Server | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> DistributionPoint:
        point = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (the stdlib's naming)
                status, body, headers, lie = point._answer(self)
                with point._lock:  # recorded before answering: a client never sees an unrecorded reply
                    point.seen.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}, status))
                _reply(self, status, body, headers, lie)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def url(self, path: str) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def put(self, path: str, data: bytes, *, etag: bool = True, last_modified: bool = True,
            lie_length: int | None = None) -> None:
        # A strong ETag from the content; Last-Modified one second later than any previous one, so that
        # If-Modified-Since works even for two puts within the same second.
        with self._lock:
            old = self.files.get(path)
            stamp = time.time()
            if old is not None and old.last_modified:
                stamp = max(stamp, email.utils.parsedate_to_datetime(old.last_modified).timestamp() + 1)
            self.files[path] = Served(data, f'"{hashlib.sha256(data).hexdigest()[:16]}"' if etag else None,
                                      email.utils.formatdate(stamp, usegmt=True) if last_modified else None,
                                      lie_length)

    def delete(self, path: str) -> None:
        with self._lock:
            self.files.pop(path, None)

    def statuses(self, path: str) -> list[int]:
        with self._lock:
            return [s.status for s in self.seen if s.path == path]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes, dict[str, str], int | None]:
        with self._lock:
            target = self.redirects.get(h.path)
            served = self.files.get(h.path)
        if target is not None:
            return 302, b"", {"Location": target}, None
        if served is None:
            return 404, b"not found\n", {}, None
        validators = {k: v for k, v in (("ETag", served.etag), ("Last-Modified", served.last_modified)) if v}
        inm, ims = h.headers.get("If-None-Match"), h.headers.get("If-Modified-Since")
        # RFC 9110 section 13.2.2: If-None-Match decides when present; If-Modified-Since only without it.
        if inm is not None:
            if served.etag is not None and inm == served.etag:
                return 304, b"", validators, None
        elif ims is not None and served.last_modified is not None:
            if (email.utils.parsedate_to_datetime(served.last_modified)
                    <= email.utils.parsedate_to_datetime(ims)):
                return 304, b"", validators, None
        return 200, served.data, validators, served.lie_length


def _reply(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str],
           lie_length: int | None) -> None:
    h.send_response(status)
    for k, v in headers.items():
        h.send_header(k, v)
    if status != 304:
        # A lie announces more than it sends, then closes: the client sees a body cut short.
        h.send_header("Content-Length", str(len(body) if lie_length is None else lie_length))
    h.end_headers()
    if status != 304:
        h.wfile.write(body)
    if lie_length is not None:
        h.wfile.flush()
        h.close_connection = True
