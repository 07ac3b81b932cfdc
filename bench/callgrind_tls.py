"""Instructions per keep-alive request and per full handshake of the real proxy process, TLS included.

``micro_exchange.py`` measures the proxy's Python work without sockets or TLS; this one runs ``mtls-proxy serve``
(one worker, TLS 1.2 with a required client certificate, the bench's cipher list, access log on) under
``valgrind --tool=callgrind`` and drives it from this process: a verified TLS upstream answering a fixed 207-byte
body, and a blocking TLS client.  Start-up and shutdown cost the same in every run, so the difference of two runs
divided by the difference of their counts is the cost of one more request (or handshake):

    python bench/callgrind_tls.py ka 1000 5000     # keep-alive GETs on one connection
    python bench/callgrind_tls.py ka-traced 1000 5000   # the same, each GET with its own X-Amzn-Trace-Id
    python bench/callgrind_tls.py hs 100 300       # connections: full handshake, one GET, close_notify

``ka`` repeats one head byte for byte (as the yardstick's load generator and a polling client do); ``ka-traced``
gives each request a distinct trace id (as most SDK clients do), so no two heads are the same.  Prints both totals and the per-unit figure.  Needs valgrind and a PKI from ``mtls-proxy certs init`` (made in a
scratch directory when absent).  Everything listens on 127.0.0.1 only and each run stops by itself.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("BENCH_WORK", tempfile.gettempdir())) / "mtls-proxy-callgrind"
BODY = b'{"status":"ok","data":"' + b"x" * 182 + b'"}'  # 207 bytes, as the bench upstream
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n%s" % (len(BODY), BODY))
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
CIPHERS = "ECDH+AESGCM:ECDH+AES256:ECDH+AES128:DH+3DES:!ADH:!AECDH:!MD5"


def pki() -> Path:
    d = WORK / "pki"
    if not (d / "client.crt").exists():
        subprocess.run([sys.executable, "-m", "proxy", "certs", "init", str(d)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream(pki_dir: Path, stop: threading.Event) -> int:
    """A keep-alive TLS upstream in a thread: answers every request head with RESPONSE."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki_dir / "upstream.crt", pki_dir / "upstream.key")
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(0.2)

    def serve(conn: socket.socket) -> None:
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                while not stop.is_set():
                    data = tls.recv(65536)
                    if not data:
                        return
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, buf = buf.split(b"\r\n\r\n", 1)
                        tls.sendall(RESPONSE)
        except OSError:
            return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(lsock.getsockname()[1])


def config(pki_dir: Path, port: int, up_port: int) -> Path:
    path = WORK / "proxy.toml"
    path.write_text(f"""allow_all_verified = false
[server]
listen = "127.0.0.1:{port}"
cert = "{pki_dir}/server.crt"
key = "{pki_dir}/server.key"
client_ca = "{pki_dir}/ca.crt"
tls_versions = ["1.2"]
ciphers = "{CIPHERS}"
workers = 1
handshake_timeout = 60.0
idle_timeout = 600.0
[upstream]
url = "https://demo.execute-api.local"
connect_to = "127.0.0.1:{up_port}"
ca_bundle = "{pki_dir}/upstream-ca.crt"
verify = true
read_timeout = 60.0
connect_timeout = 60.0
[admin]
listen = "127.0.0.1:{free_port()}"
[log]
access = true
level = "warning"
[[allow]]
name = "bench-client"
subject_cn = ["client"]
methods = ["GET"]
paths = ["/"]
""")
    return path


def client_context(pki_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki_dir / "server-ca.crt")
    ctx.load_cert_chain(pki_dir / "client.crt", pki_dir / "client.key")
    return ctx


def read_response(tls: ssl.SSLSocket, buf: bytes) -> bytes:
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", buf[:end])
            assert m and buf.startswith(b"HTTP/1.1 200 "), buf[:200]
            total = end + 4 + int(m.group(1))
            if len(buf) >= total:
                return buf[total:]
        data = tls.recv(65536)
        if not data:
            raise ConnectionError("proxy closed the connection")
        buf += data


def traced(i: int) -> bytes:
    """REQUEST with a per-request trace id header of the X-Ray shape (the same length every time)."""
    return REQUEST[:-2] + b"X-Amzn-Trace-Id: Root=1-67890abc-%024x\r\n\r\n" % i


def drive(mode: str, n: int, port: int, ctx: ssl.SSLContext) -> None:
    if mode in ("ka", "ka-traced"):
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            buf = b""
            for i in range(n):
                tls.sendall(REQUEST if mode == "ka" else traced(i))
                buf = read_response(tls, buf)
        return
    for _ in range(n):  # a fresh session each time: every connection is a full handshake
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost") as tls:
            tls.sendall(REQUEST)
            read_response(tls, b"")
            tls.unwrap()


def run(mode: str, n: int, pki_dir: Path, up_port: int) -> int:
    port = free_port()
    cfg = config(pki_dir, port, up_port)
    out = WORK / f"callgrind.{mode}.{n}.out"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                             sys.executable, "-m", "proxy", "serve", "--config", str(cfg)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ctx = client_context(pki_dir)
    deadline = time.monotonic() + 300
    while True:  # ready when a request gets its answer (the warm-up also fills the upstream pool)
        try:
            drive("ka", 20, port, ctx)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"proxy did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.5)
    drive(mode, n, port, ctx)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    m = re.search(r"Collected : (\d+)", err.decode())
    if not m:
        raise SystemExit(f"no callgrind total in: {err.decode()[-2000:]}")
    return int(m.group(1))


def main() -> None:
    mode, low, high = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode not in ("ka", "ka-traced", "hs"):
        raise SystemExit(f"mode: expected ka, ka-traced or hs, got {mode!r}")
    WORK.mkdir(parents=True, exist_ok=True)
    pki_dir = pki()
    stop = threading.Event()
    up_port = upstream(pki_dir, stop)
    a = run(mode, low, pki_dir, up_port)
    b = run(mode, high, pki_dir, up_port)
    stop.set()
    unit = "handshake" if mode == "hs" else "request"
    print(f"{mode}: I({low}) = {a}  I({high}) = {b}  per {unit}: {(b - a) / (high - low):.0f} instructions")


if __name__ == "__main__":
    main()
