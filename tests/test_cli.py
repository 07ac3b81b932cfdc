"""The command line as operators and partners use it: real ``python -m proxy`` processes, real curl.

``serve`` fails with one line per problem and no traceback; ``certs init`` refuses to overwrite; and the README's
partner smoke test runs against ``demo`` exactly as printed (the README's "Two commands").
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.harness import ROOT, free_port, spawn_proxy, write_config
from tests.pki import Pki

CURL = "/usr/bin/curl"
needs_curl = pytest.mark.skipif(not os.access(CURL, os.X_OK), reason="needs /usr/bin/curl")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MTLS_PROXY_")}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=ROOT, env=clean_env(), capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_errors(proc: subprocess.CompletedProcess[str], count: int) -> list[str]:
    assert proc.returncode == 1, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == count and all(line.startswith("error: ") for line in lines), lines
    return [line[len("error: "):] for line in lines]


# ---- serve: start-up failures ---------------------------------------------------------------------------


def test_serve_bad_config_one_line_per_problem(tmp_path: Path, pki: Pki) -> None:
    path = write_config(tmp_path / "p.toml", pki, 9, server={"listen": "nowhere", "verify_depth": "2"},
                        upstream={"url": "http://api.test/prod"}, log={"colour": "red"})
    lines = assert_one_line_errors(cli("serve", "--config", str(path)), 4)
    assert sorted(line.split(": ")[0] for line in lines) == [
        "log.colour", "server.listen", "server.verify_depth", "upstream.url"]


def test_serve_bad_files_one_line_per_problem(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "no-such.crt"
    path = write_config(tmp_path / "p.toml", pki, 9, server={"cert": str(missing)},
                        upstream={"ca_bundle": str(tmp_path / "no-such-ca.crt")})
    lines = assert_one_line_errors(cli("serve", "--config", str(path)), 2)
    assert lines[0].startswith("server.cert: ") and str(missing) in lines[0]
    assert lines[1].startswith("upstream.ca_bundle: ")


def test_serve_refuses_to_start_without_rules(tmp_path: Path, pki: Pki) -> None:
    path = write_config(tmp_path / "p.toml", pki, 9, rules=[])
    (line,) = assert_one_line_errors(cli("serve", "--config", str(path)), 1)
    assert line.startswith("allow: no [[allow]] rules") and "allow_all_verified" in line


def test_serve_missing_config_file(tmp_path: Path) -> None:
    lines = assert_one_line_errors(cli("serve", "--config", str(tmp_path / "x.toml")), 1)
    assert lines == [f"{tmp_path / 'x.toml'}: config file not found"]


def test_serve_port_in_use(tmp_path: Path, pki: Pki) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = write_config(tmp_path / "p.toml", pki, 9, server={"listen": f"127.0.0.1:{port}"})
        lines = assert_one_line_errors(cli("serve", "--config", str(path)), 1)
    assert lines[0].startswith(f"server.listen: cannot listen on 127.0.0.1:{port}: "), lines


def test_serve_admin_port_in_use_names_admin_listen(tmp_path: Path, pki: Pki) -> None:
    # Regression: the admin port binds first, and its failure was reported as "server.listen".
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        path = write_config(tmp_path / "p.toml", pki, 9, admin={"listen": f"127.0.0.1:{port}"})
        lines = assert_one_line_errors(cli("serve", "--config", str(path)), 1)
    assert lines[0].startswith(f"admin.listen: cannot listen on 127.0.0.1:{port}: "), lines


def test_serve_runs_until_sigterm_and_exits_0(tmp_path: Path, pki: Pki) -> None:
    path = write_config(tmp_path / "p.toml", pki, free_port())
    proxy = spawn_proxy(path, tmp_path)
    try:
        assert proxy.admin_get("/healthz")[0] == 200
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
    finally:
        proxy.stop()
    events = [json.loads(line)["msg"] for line in proxy.stderr().splitlines()]  # JSON lines only, no traceback
    assert "listening" in events and events[-1] == "stopped", events


# ---- certs init ---------------------------------------------------------------------------------------


def test_certs_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    first = cli("certs", "init", str(d))
    assert first.returncode == 0 and first.stdout.startswith("wrote "), first
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert {"ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key", "revoked.crt",
            "revoked.key", "crl.pem"} <= set(before)

    again = cli("certs", "init", str(d))
    (line,) = assert_one_line_errors(again, 1)
    assert "use --force" in line and str(d) in line
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # nothing touched

    forced = cli("certs", "init", str(d), "--force")
    assert forced.returncode == 0, forced
    assert (d / "ca.crt").read_bytes() != before["ca.crt"]


def test_certs_init_bad_client_name_is_one_line(tmp_path: Path) -> None:
    assert_one_line_errors(cli("certs", "init", str(tmp_path / "c"), "--client", "../evil"), 1)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# ---- the README smoke test against the demo -------------------------------------------------------------


def wait_ready(proc: subprocess.Popen[bytes], admin: str, err: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited {proc.returncode}: {err.read_text()}")
        try:
            with urllib.request.urlopen(f"http://{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"demo not ready: {err.read_text()}")


def partner_curl(d: Path, port: int, stem: str | None) -> tuple[int, str, bytes]:
    """The README command (``curl --key X.key --cert X.crt --cacert server.crt https://localhost:P/hello``), plus
    flags that only capture the outcome: (curl exit code, HTTP status, body)."""
    creds = ["--key", f"{stem}.key", "--cert", f"{stem}.crt"] if stem else []
    body = d / "curl-body"
    body.unlink(missing_ok=True)
    proc = subprocess.run([CURL, *creds, "--cacert", "server.crt", f"https://localhost:{port}/hello",
                           "-sS", "--max-time", "20", "-o", str(body), "-w", "%{http_code}"],
                          cwd=d, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, body.read_bytes() if body.exists() else b""


@needs_curl
def test_certs_init_then_partner_smoke_test_against_demo(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    init = cli("certs", "init", str(d), "--client", "other")
    assert init.returncode == 0, init
    port, admin_port, upstream_port = free_port(), free_port(), free_port()
    admin = f"127.0.0.1:{admin_port}"
    out, err = tmp_path / "demo.out", tmp_path / "demo.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--dir", str(d), "--listen",
                                 f"127.0.0.1:{port}", "--admin", admin, "--upstream-port", str(upstream_port)],
                                cwd=ROOT, env=clean_env(), stdout=o, stderr=e)
    try:
        wait_ready(proc, admin, err)
        # The printed instructions are the ones this test runs.
        assert (f"curl --key {d}/client.key --cert {d}/client.crt --cacert {d}/server.crt "
                f"https://localhost:{port}/hello") in out.read_text()

        code, status, body = partner_curl(d, port, "client")
        assert (code, status) == (0, "200"), body
        echo = json.loads(body)
        headers = {k.lower(): v for k, v in echo["headers"]}
        der = x509.load_pem_x509_certificate((d / "client.crt").read_bytes()).public_bytes(Encoding.DER)
        assert echo["path"] == "/prod/hello"
        assert headers["x-client-cert-fingerprint"] == hashlib.sha256(der).hexdigest()
        assert "CN=client" in headers["x-client-cert-subject"]
        assert headers["x-forwarded-proto"] == "https" and headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["host"] == "demo.execute-api.local" and headers["x-apigw-api-id"] == "demo"

        code, status, body = partner_curl(d, port, "other")  # valid certificate, no rule allows it
        assert (code, status) == (0, "403"), body
        refusal = json.loads(body)
        other = x509.load_pem_x509_certificate((d / "other.crt").read_bytes())
        assert refusal["error"] == "forbidden" and refusal["reason"]
        assert refusal["subject"] == other.subject.rfc4514_string()
        assert refusal["fingerprint"] == hashlib.sha256(other.public_bytes(Encoding.DER)).hexdigest()

        for stem in ("revoked", None):  # refused during the TLS handshake: no HTTP status at all
            code, status, body = partner_curl(d, port, stem)
            assert code != 0 and status == "000" and body == b"", (stem, code, status)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err.read_text()


def test_python_dash_m_runs_the_cli_and_importing_main_runs_nothing() -> None:
    # Tools that walk the package (pkgutil) import proxy.__main__: that must not parse sys.argv or exit.
    imported = subprocess.run([sys.executable, "-c", "import proxy.__main__; print('imported')"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
    assert imported.returncode == 0 and imported.stdout.strip() == "imported", imported.stderr
    run = subprocess.run([sys.executable, "-m", "proxy", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert run.returncode == 0 and "serve" in run.stdout
