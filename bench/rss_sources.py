"""Idle RSS of one proxy worker with file-only sources and with one AWS source (``server.crl`` in S3).

boto3 and botocore are imported only when an AWS source is configured; this shows what that costs.  It starts a
moto server on loopback (the test dependency ``moto[server]``), a dev PKI from ``mtls-proxy certs init``, and the
real ``mtls-proxy serve`` with the same config but for where the CRL comes from (one worker, three times; then a
supervisor with two workers), waits for ``/readyz``, idles past one ``reload_interval`` and reads VmRSS from /proc:

    .venv/bin/python bench/rss_sources.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.remote import start_moto  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def tree(pid: int) -> list[int]:
    """The process and its children (a supervisor and its workers)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid] + [p for k in kids for p in tree(int(k))]


def measure(work: Path, pki: Path, crl: str, env: dict[str, str], idle: float, workers: int) -> list[int]:
    admin = free_port()
    cfg = work / f"proxy-{admin}.toml"
    cfg.write_text(f"""
allow_all_verified = true
[server]
listen = "127.0.0.1:{free_port()}"
cert = "{pki}/server.crt"
key = "{pki}/server.key"
client_ca = "{pki}/ca.crt"
crl = "{crl}"
workers = {workers}
reload_interval = 5
[upstream]
url = "https://localhost"
connect_to = "127.0.0.1:{free_port()}"
ca_bundle = "{pki}/upstream-ca.crt"
[admin]
listen = "127.0.0.1:{admin}"
[log]
access = false
""")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mtls-proxy"), "serve", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"proxy did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.1)
        time.sleep(idle)  # at least one reload_interval: the poller has run
        return [rss_kb(p) for p in tree(proc.pid)]
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pki = work / "pki"
        subprocess.run([sys.executable, "-m", "proxy", "certs", "init", str(pki)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        moto = start_moto(work)
        try:
            s3 = moto.client("s3")
            s3.create_bucket(Bucket="config")
            s3.put_object(Bucket="config", Key="crl.pem", Body=(pki / "crl.pem").read_bytes())
            env = {**os.environ, **moto.env()}
            for label, crl in (("file", str(pki / "crl.pem")), ("s3", "s3://config/crl.pem")):
                figures = sorted(measure(work, pki, crl, env, idle=6.0, workers=1)[0] for _ in range(3))
                print(f"workers = 1, server.crl from {label:4}: idle RSS {figures[1] / 1024:.1f} MiB (median of 3: "
                      f"{', '.join(f'{f / 1024:.1f}' for f in figures)})")
                procs = measure(work, pki, crl, env, idle=6.0, workers=2)
                print(f"workers = 2, server.crl from {label:4}: supervisor {procs[0] / 1024:.1f} MiB, workers "
                      f"{', '.join(f'{p / 1024:.1f}' for p in procs[1:])} MiB, task {sum(procs) / 1024:.1f} MiB")
        finally:
            moto.stop()


if __name__ == "__main__":
    main()
