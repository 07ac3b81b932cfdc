"""End to end with the real process (``python -m proxy serve``) and moto's server on loopback: the client CA and
the CRL live in SSM and S3, are re-read every ``reload_interval``, bad content keeps the last good copy (the
error metric counts), and a changed client CA takes effect on new handshakes without a restart."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.harness import client_ctx, free_port, spawn_proxy, write_config
from tests.pki import Pki
from tests.sources.conftest import unique


def _status(port: int, ctx: ssl.SSLContext) -> int | None:
    """The HTTP status the proxy answers a GET with, or None when the TLS handshake or connection fails."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /x HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
            head = tls.recv(64)
    except (ssl.SSLError, OSError):
        return None
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def _metric(proxy: Any, line_start: str) -> float | None:
    for line in proxy.admin_get("/metrics")[1].splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_sources_in_s3_and_ssm_reload_without_restart(tmp_path: Path, pki: Pki, aws_env: Any,
                                                     aws: Callable[[str], Any]) -> None:
    bucket, param = unique("pki"), "/" + unique("ca")
    s3, ssm = aws("s3"), aws("ssm")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="crl.pem", Body=pki.crl_bundle.read_bytes())
    ssm.put_parameter(Name=param, Value=pki.client_ca.read_text(), Type="SecureString")
    path = write_config(tmp_path / "p.toml", pki, free_port(), server={
        "crl": f"s3://{bucket}/crl.pem", "client_ca": f"ssm:{param}", "reload_interval": 0.5})
    proxy = spawn_proxy(path, tmp_path, env=aws_env.env())
    try:
        good = client_ctx(pki, "good")
        assert _status(proxy.port, good) == 502  # admitted (no upstream is running: 502 after the rules)
        assert _status(proxy.port, client_ctx(pki, "revoked")) is None  # the S3 CRL revokes it

        # Garbage in the CRL object: the last good CRL stays in force and the error metric counts.
        s3.put_object(Bucket=bucket, Key="crl.pem", Body=b"not a CRL")
        assert _wait_for(lambda: (_metric(proxy, 'mtls_proxy_source_errors_total{source="server.crl"}') or 0) >= 2)
        assert _status(proxy.port, good) == 502
        assert _status(proxy.port, client_ctx(pki, "revoked")) is None
        # Deleted: the same.
        s3.delete_object(Bucket=bucket, Key="crl.pem")
        before = _metric(proxy, 'mtls_proxy_source_errors_total{source="server.crl"}') or 0
        assert _wait_for(lambda: (_metric(proxy, 'mtls_proxy_source_errors_total{source="server.crl"}') or 0)
                         > before + 1)
        assert _status(proxy.port, good) == 502
        assert proxy.proc.poll() is None
        stderr = proxy.stderr()
        assert stderr.count("source server.crl failing") == 1, stderr  # logged once per state change
        s3.put_object(Bucket=bucket, Key="crl.pem", Body=pki.crl_bundle.read_bytes())
        assert _wait_for(lambda: "source server.crl recovered" in proxy.stderr())
        age = _metric(proxy, 'mtls_proxy_source_age_seconds{source="server.crl"}')
        assert age is not None and age < 5

        # A new client CA in SSM (one that did not issue "good"): new handshakes use it, no restart.
        started = time.monotonic()
        ssm.put_parameter(Name=param, Value=pki.other_client_ca.read_text(), Type="SecureString", Overwrite=True)
        assert _wait_for(lambda: _status(proxy.port, good) is None)
        took = time.monotonic() - started
        assert proxy.proc.poll() is None
        print(f"client CA change in SSM took effect after {took:.2f} s (reload_interval 0.5 s)")
    finally:
        proxy.stop()


def test_a_partner_onboarded_in_the_s3_rules_document_is_admitted_without_restart(
        tmp_path: Path, pki: Pki, aws_env: Any, aws: Callable[[str], Any]) -> None:
    bucket = unique("rules")
    s3 = aws("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="rules.toml", Body=b'[[allow]]\nname = "other"\nsubject_cn = ["nobody"]\n')
    path = write_config(tmp_path / "p.toml", pki, free_port(), rules=[],
                        top={"allow_from": f"s3://{bucket}/rules.toml"}, server={"reload_interval": 0.5})
    proxy = spawn_proxy(path, tmp_path, env=aws_env.env())
    try:
        good = client_ctx(pki, "good")
        assert _status(proxy.port, good) == 403  # verified, but no rule names it
        # A rule that fails validation: the old rules stay, the proxy keeps serving.
        s3.put_object(Bucket=bucket, Key="rules.toml", Body=b'[[allow]]\nname = "a"\nsubject_cn = []\n')
        assert _wait_for(lambda: 'mtls_proxy_reloads_total{result="error"} 1.0' in proxy.admin_get("/metrics")[1])
        assert _status(proxy.port, good) == 403
        started = time.monotonic()
        s3.put_object(Bucket=bucket, Key="rules.toml", Body=b'[[allow]]\nname = "other"\nsubject_cn = ["nobody"]\n'
                      b'[[allow]]\nname = "partner-a"\nsubject_cn = ["client-a"]\n')
        assert _wait_for(lambda: _status(proxy.port, good) == 502)  # admitted (no upstream: 502)
        print(f"onboarding through S3 took effect after {time.monotonic() - started:.2f} s")
        assert proxy.proc.poll() is None
    finally:
        proxy.stop()


def test_server_certificate_rotated_in_secrets_manager_with_no_failed_handshake(
        tmp_path: Path, pki: Pki, aws_env: Any, aws: Callable[[str], Any]) -> None:
    # Certificate and key in one secret, so a rotation can never pair a new certificate with an old key.
    secret = unique("server-tls")
    sm = aws("secretsmanager")
    sm.create_secret(Name=secret, SecretString=pki.server_cert.read_text() + pki.server_key.read_text())
    path = write_config(tmp_path / "p.toml", pki, free_port(), server={
        "cert": f"secretsmanager:{secret}", "key": f"secretsmanager:{secret}", "reload_interval": 0.5})
    proxy = spawn_proxy(path, tmp_path, env=aws_env.env())
    ctx = client_ctx(pki, "good")
    ctx.load_verify_locations(cafile=pki.upstream_ca)  # trusts the issuer of the rotated-in certificate too
    old_der, new_der = (x509.load_pem_x509_certificates(p.read_bytes())[0].public_bytes(Encoding.DER)
                        for p in (pki.server_cert, pki.upstream_cert))
    results: list[tuple[int | None, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw, \
                        ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    der = tls.getpeercert(binary_form=True)
                    issuer = "old" if der == old_der else "new" if der == new_der else "unknown"
                    tls.sendall(b"GET /x HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
                    head = tls.recv(64)
                results.append((int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None, str(issuer)))
            except (ssl.SSLError, OSError) as exc:
                results.append((None, repr(exc)))

    worker = threading.Thread(target=hammer)
    try:
        worker.start()
        assert _wait_for(lambda: len(results) >= 3)
        started = time.monotonic()
        sm.put_secret_value(SecretId=secret,
                            SecretString=pki.upstream_cert.read_text() + pki.upstream_key.read_text())
        assert _wait_for(lambda: bool(results) and results[-1][1] == "new")
        took = time.monotonic() - started
        count = len(results)
        assert _wait_for(lambda: len(results) >= count + 3)
        stop.set()
        worker.join(10)
        failed = [r for r in results if r[0] != 502]  # 502: admitted, no upstream runs
        assert failed == [], failed[:5]
        issuers = [r[1] for r in results]
        first_new = issuers.index("new")
        assert first_new > 0 and set(issuers[:first_new]) == {"old"} and set(issuers[first_new:]) == {"new"}
        print(f"rotation: {len(results)} requests, 0 failed; new certificate served after {took:.2f} s")
    finally:
        stop.set()
        worker.join(10)
        proxy.stop()
