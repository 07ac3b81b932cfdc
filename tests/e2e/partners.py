"""Partners' TLS stacks, each driven the way a partner drives it, against a real ``mtls-proxy serve`` process.

Owns: the stacks (``curl``, ``openssl s_client``, Java 17 ``HttpClient`` compiled at test time from
``clients/PartnerClient.java``, Node's ``https`` from ``clients/partner_client.mjs``, Python ``requests`` and
``httpx``), what one request through each of them gave (``Outcome``: the HTTP answer, or the error the stack itself
reported), the PKCS12 keystores a Java partner holds, and a demo upstream on its own thread so that one proxy
process can serve many tests.

Each stack runs a batch of requests per call (one JVM, one node process), so a whole mode costs one start-up.

Must not: decide what is right: the tests compare outcomes with what a partner should see.  Never mocks TLS or
sockets: every request is a real handshake with a real client certificate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.dev import demo_upstream
from tests.certificate_request import CertificateRequest, from_s_client
from tests.e2e.kit import Echo, echo_of
from tests.pki import ClientCert, Pki

CLIENTS_DIR = Path(__file__).resolve().parent / "clients"
KEYSTORE_PASSWORD = "changeit"  # a test keystore's password (Java's traditional default); protects nothing real
TIMEOUT = 30.0


class Unavailable(Exception):
    """A stack is not installed here; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Request:
    """One GET through a stack: ``name`` keys the outcome, ``client`` presents a certificate (for Java: the PKCS12
    keystore ``keystore`` instead, whose key manager picks the certificate)."""

    name: str
    path: str
    client: ClientCert | None = None
    keystore: Path | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one request through one stack gave."""

    status: int | None  # the HTTP status, None when no HTTP answer came (a refused handshake, a failed connection)
    protocol: str | None  # the negotiated TLS version as the stack names it ("TLSv1.3"), None if it cannot say
    body: bytes
    error: str  # the stack's own error report ("" with an HTTP answer)
    certificate_request: CertificateRequest | None = None  # openssl s_client only: the server's, as received

    def echo(self) -> Echo:
        return echo_of(self.body)


# ---- the upstream ----------------------------------------------------------------------------------------------


class UpstreamThread:
    """The demo upstream (API id ``api``, stage ``prod``) on an event loop of its own thread, recording the raw
    target of every request it received in ``paths``, so a test can prove a refused request never reached it."""

    def __init__(self, pki: Pki) -> None:
        self.pki = pki
        self.paths: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="partner-upstream", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    async def _start(self) -> None:
        @web.middleware
        async def record(request: web.Request, handler: Any) -> web.StreamResponse:
            self.paths.append(request.raw_path)
            return await handler(request)

        app = demo_upstream.make_app(api_id="api", stage="prod")
        app.middlewares.append(record)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ctx = demo_upstream.server_context(str(self.pki.upstream_cert), str(self.pki.upstream_key))
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported by start() in the test's thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        if self._runner is not None:
            self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def start(self) -> UpstreamThread:
        self._thread.start()
        if not self._started.wait(TIMEOUT):
            raise RuntimeError("the partner upstream did not start")
        if self._error is not None:
            raise RuntimeError(f"the partner upstream did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(TIMEOUT)


# ---- PKCS12 keystores ----------------------------------------------------------------------------------------


def write_pkcs12(client: ClientCert, path: Path) -> Path:
    """``client``'s key, leaf and the intermediates it sends as one PKCS12 key entry (alias = the client's name)."""
    chain = x509.load_pem_x509_certificates(client.cert.read_bytes())
    key = serialization.load_pem_private_key(client.key.read_bytes(), password=None)
    data = pkcs12.serialize_key_and_certificates(
        client.name.encode(), key, chain[0], chain[1:] or None,  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(KEYSTORE_PASSWORD.encode()))
    path.write_bytes(data)
    path.chmod(0o600)
    return path


# ---- the stacks --------------------------------------------------------------------------------------------------
# Every stack: ``run(port, requests) -> {name: Outcome}``, with the stack's defaults for everything not named here
# (protocol versions, cipher suites, signature algorithms): what a partner gets without tuning anything.


def _run(args: Sequence[str], stdin: bytes = b"", timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(list(args), input=stdin, capture_output=True, timeout=timeout, env=_clean_env(),
                          check=False)


_CLIENT_SETTINGS = ("CURL_HOME", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "NODE_OPTIONS",
                    "NODE_EXTRA_CA_CERTS", "SSLKEYLOGFILE", "OPENSSL_CONF")


def _clean_env() -> dict[str, str]:
    """The environment without proxy variables or tool settings that could reroute or change a client."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k not in _CLIENT_SETTINGS}


def _which(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise Unavailable(f"{name} is not installed (scripts/test.sh installs it with apt-get when run as root)")
    return path


def _http(raw: bytes) -> tuple[int | None, bytes]:
    """Status and body of one HTTP/1.1 response with Content-Length (what the proxy and the demo upstream send)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    if not sep or not m:
        return None, raw
    return int(m.group(1)), body


def _client(r: Request) -> ClientCert:
    if r.client is None:
        raise ValueError(f"{r.name}: this stack needs a client certificate")
    return r.client


class Curl:
    """The partner smoke test: ``curl --key client.key --cert client.crt --cacert server.crt URL``."""

    def __init__(self, server_ca: Path) -> None:
        self.bin, self.server_ca = _which("curl"), server_ca

    def run(self, port: int, requests: Sequence[Request]) -> dict[str, Outcome]:
        out = {}
        for r in requests:
            c = _client(r)
            res = _run([self.bin, "-q", "--silent", "--show-error", "--verbose", "--noproxy", "*", "--max-time", "30",
                        "--key", str(c.key), "--cert", str(c.cert), "--cacert", str(self.server_ca),
                        "--write-out", "\n%{http_code}", f"https://localhost:{port}{r.path}"])
            body, _, code = res.stdout.rpartition(b"\n")
            err = res.stderr.decode(errors="replace")
            m = re.search(r"SSL connection using (TLSv1\.[0-3])", err)
            status = int(code) if res.returncode == 0 and code.isdigit() else None
            errors = "\n".join(line for line in err.splitlines() if line.startswith("curl:"))
            out[r.name] = Outcome(status, m.group(1) if m else None, body, "" if status else errors)
        return out


class SClient:
    """``openssl s_client -msg``: one connection per request; also keeps the server's CertificateRequest."""

    def __init__(self, server_ca: Path, tmp: Path) -> None:
        self.bin, self.server_ca, self.tmp = _which("openssl"), server_ca, tmp

    def run(self, port: int, requests: Sequence[Request]) -> dict[str, Outcome]:
        out = {}
        for r in requests:
            c = _client(r)
            msgfile = self.tmp / f"s_client-{port}-{r.name}.msg"
            res = _run([self.bin, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-verify_hostname", "localhost", "-verify_return_error", "-CAfile", str(self.server_ca),
                        "-cert", str(c.cert), "-key", str(c.key), "-msg", "-msgfile", str(msgfile), "-quiet"],
                       stdin=f"GET {r.path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
            transcript = msgfile.read_text() if msgfile.exists() else ""
            status, body = _http(res.stdout)
            try:
                request: CertificateRequest | None = from_s_client(transcript)
            except ValueError:
                request = None
            # s_client labels a message with the version in force when it arrives: the ServerHello still carries
            # the client's own, the server's Certificate the negotiated one.
            m = re.search(r"^<<< TLS (1\.[0-3]), Handshake \[length [0-9a-f]+\], Certificate$", transcript, re.M)
            errors = "\n".join(line for line in res.stderr.decode(errors="replace").splitlines()
                               if "error" in line.lower() or "alert" in line.lower())
            out[r.name] = Outcome(status, f"TLSv{m.group(1)}" if m else None, body,
                                  "" if status else errors or f"exit {res.returncode}", request)
        return out


class Java:
    """Java 17's ``HttpClient`` with the default (SunX509) key manager on PKCS12 keystores; compiled once.

    A request with ``client`` uses that client's single-entry keystore; one with ``keystore`` uses that file."""

    def __init__(self, server_ca: Path, tmp: Path) -> None:
        javac, self.java = _which("javac"), _which("java")
        self.server_ca, self.tmp = server_ca, tmp
        self.classes = tmp / "classes"
        res = _run([javac, "-d", str(self.classes), str(CLIENTS_DIR / "PartnerClient.java")], timeout=180)
        if res.returncode != 0:
            raise RuntimeError(f"javac failed: {res.stderr.decode(errors='replace')}")
        self._single: dict[str, Path] = {}
        self._keystores: set[Path] = set()
        self._pending: list[list[str]] = []  # keystore lines for the next script
        self._scripts = 0

    def _script(self, lines: Sequence[Sequence[str]]) -> list[str]:
        self._scripts += 1
        script = self.tmp / f"script-{self._scripts}.tsv"
        script.write_text("".join("\t".join(line) + "\n" for line in lines))
        # C1 only: a run is a second or two of start-up and handshakes, never long enough for C2 to pay off.
        res = _run([self.java, "-XX:TieredStopAtLevel=1", "-cp", str(self.classes), "PartnerClient", str(script)],
                   timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"PartnerClient failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
        return res.stdout.decode().splitlines()

    def single(self, client: ClientCert) -> Path:
        if client.name not in self._single:
            self._single[client.name] = write_pkcs12(client, self.tmp / f"{client.name}.p12")
        return self._single[client.name]

    def keystore(self, name: str, entries: Sequence[tuple[str, ClientCert]]) -> Path:
        """The PKCS12 keystore ``name``.p12 holding each client's key entry under the given alias, in that order,
        written by Java's own KeyStore (as keytool -importkeystore would) at the start of the next ``run``."""
        path = self.tmp / f"{name}.p12"
        if path not in self._keystores:
            self._keystores.add(path)
            self._pending.append(["keystore", str(path), KEYSTORE_PASSWORD,
                                  *(f"{alias}={self.single(c)}" for alias, c in entries)])
        return path

    def run(self, port: int, requests: Sequence[Request]) -> dict[str, Outcome]:
        gets = [["get", r.name, f"https://localhost:{port}{r.path}", str(r.keystore or self.single(_client(r))),
                 KEYSTORE_PASSWORD, str(self.server_ca), "TLSv1.3,TLSv1.2"] for r in requests]
        lines, self._pending = [*self._pending, *gets], []
        out = {}
        for line in self._script(lines):
            name, kind, *rest = line.split("\t")
            if kind == "status":
                code, protocol, body = rest
                out[name] = Outcome(int(code), protocol, base64.b64decode(body), "")
            else:
                out[name] = Outcome(None, None, b"", base64.b64decode(rest[0]).decode(errors="replace"))
        return out


class Node:
    """Node's ``https.request`` with PEM ``key``/``cert``/``ca`` options."""

    def __init__(self, server_ca: Path, tmp: Path) -> None:
        self.bin, self.server_ca, self.tmp = _which("node"), server_ca, tmp

    def run(self, port: int, requests: Sequence[Request]) -> dict[str, Outcome]:
        cases = self.tmp / f"node-{port}.json"
        cases.write_text(json.dumps([{"name": r.name, "port": port, "path": r.path, "cert": str(_client(r).cert),
                                      "key": str(_client(r).key), "ca": str(self.server_ca),
                                      "maxVersion": "TLSv1.3"} for r in requests]))
        res = _run([self.bin, str(CLIENTS_DIR / "partner_client.mjs"), str(cases)])
        if res.returncode != 0:
            raise RuntimeError(f"partner_client.mjs failed ({res.returncode}): {res.stderr.decode(errors='replace')}")
        out = {}
        for line in res.stdout.decode().splitlines():
            d = json.loads(line)
            if "error" in d:
                out[d["name"]] = Outcome(None, None, b"", f"{d['error']['code']}: {d['error']['message']}")
            else:
                out[d["name"]] = Outcome(d["status"], d["protocol"], d["body"].encode(), "")
        return out


class Requests:
    """``requests.get(url, cert=(cert, key), verify=ca)``, the way its documentation shows client certificates."""

    def __init__(self, server_ca: Path) -> None:
        self.server_ca = server_ca

    def run(self, port: int, requests: Sequence[Request]) -> dict[str, Outcome]:
        import requests as requests_lib

        out = {}
        for r in requests:
            c = _client(r)
            try:
                with requests_lib.Session() as session, session.get(
                        f"https://localhost:{port}{r.path}", cert=(str(c.cert), str(c.key)),
                        verify=str(self.server_ca), timeout=TIMEOUT, stream=True) as resp:
                    sock = resp.raw.connection.sock  # before the body is read: then the connection is pooled
                    protocol = sock.version() if isinstance(sock, ssl.SSLSocket) else None
                    out[r.name] = Outcome(resp.status_code, protocol, resp.content, "")
            except requests_lib.RequestException as exc:
                out[r.name] = Outcome(None, None, b"", f"{type(exc).__name__}: {exc}")
        return out


class Httpx:
    """``httpx.Client(verify=ctx)`` with an ``ssl`` context holding the client certificate (httpx's documented way)."""

    def __init__(self, server_ca: Path) -> None:
        self.server_ca = server_ca

    def run(self, port: int, requests: Sequence[Request]) -> dict[str, Outcome]:
        import httpx

        out = {}
        for r in requests:
            c = _client(r)
            ctx = ssl.create_default_context(cafile=str(self.server_ca))
            ctx.load_cert_chain(c.cert, c.key)
            try:
                with httpx.Client(verify=ctx, timeout=TIMEOUT) as client:
                    resp = client.get(f"https://localhost:{port}{r.path}")
                    tls = resp.extensions["network_stream"].get_extra_info("ssl_object")
                    out[r.name] = Outcome(resp.status_code, tls.version() if tls else None, resp.content, "")
            except httpx.HTTPError as exc:
                out[r.name] = Outcome(None, None, b"", f"{type(exc).__name__}: {exc}")
        return out
