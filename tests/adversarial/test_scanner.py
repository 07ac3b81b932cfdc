"""A TLS scanner's view of the real proxy process: sslyze, with and without a client certificate.

Owns: running ``sslyze`` against the proxy twice and asserting what an auditor would check -- client authentication
REQUIRED, only TLS 1.2 and 1.3 accepted, no CBC/3DES/RC4/NULL/EXPORT/anonymous suites with the default ciphers, no
TLS compression, secure renegotiation only (no client-initiated renegotiation), and a complete certificate chain:
the proxy sends its intermediate, so the path validates against the root alone.  Also: not vulnerable to
Heartbleed, CCS injection or ROBOT; TLS_FALLBACK_SCSV and extended master secret supported.

Why a separate virtualenv: sslyze 6 pins ``cryptography<47`` and the proxy runs on a newer one, so sslyze lives in
its own venv, created on first use by ``sslyze_python()`` in ``$XDG_CACHE_HOME/mtls-proxy/sslyze-<version>``
(``~/.cache`` by default; kept between runs, shared by concurrent runs through a lock file) from PyPI.  Set
``ADVERSARIAL_SSLYZE_PYTHON`` to an interpreter that has sslyze to skip the install.

The server certificate here is made for the scan (root -> intermediate -> leaf with a non-critical SAN):
trustme's leaves mark the SAN critical, which sslyze's validator (cryptography's, RFC 5280 §4.2.1.6) refuses.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.adversarial.figures import Figures
from tests.adversarial.recorder import RecordingUpstream
from tests.adversarial.target import spawn
from tests.harness import ProxyProcess
from tests.pki import Pki

SSLYZE_VERSION = "6.3.1"
SCAN_COMMANDS = ["--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--compression", "--reneg",
                 "--certinfo", "--fallback", "--heartbleed", "--openssl_ccs", "--robot", "--ems"]
# "_SHA " matches a suite name ending in _SHA (a SHA-1 MAC) once a space is appended to the name
WEAK = ("CBC", "3DES", "DES_", "RC4", "NULL", "EXPORT", "anon", "MD5", "_SHA ")


def sslyze_python() -> Path:
    """An interpreter with sslyze: $ADVERSARIAL_SSLYZE_PYTHON, or a cached venv created on first use."""
    given = os.environ.get("ADVERSARIAL_SSLYZE_PYTHON")
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mtls-proxy"
    venv = cache / f"sslyze-{SSLYZE_VERSION}"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / "sslyze.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent run waits for the first one's install
        ok = python.exists() and subprocess.run([python, "-c", "import sslyze"], capture_output=True).returncode == 0
        if not ok:
            subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True, capture_output=True)
            done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                                   f"sslyze=={SSLYZE_VERSION}"], capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"cannot install sslyze {SSLYZE_VERSION} into {venv}: {done.stderr[-2000:]}")
    return python


def server_chain(directory: Path) -> tuple[Path, Path, Path]:
    """(root CA file, leaf+intermediate chain file, leaf key): what a correctly deployed server sends."""
    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mtls-proxy scan"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
              ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=ca,
                                          crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                            critical=False))
        if not ca:
            b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return b.sign(signer, hashes.SHA256())

    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue("scan root", root_key, "scan root", root_key, ca=True)
    inter = issue("scan intermediate", inter_key, "scan root", root_key, ca=True)
    leaf = issue("localhost", leaf_key, "scan intermediate", inter_key, ca=False)
    pem = serialization.Encoding.PEM
    root_file, chain_file, key_file = directory / "scan-root.crt", directory / "scan.crt", directory / "scan.key"
    root_file.write_bytes(root.public_bytes(pem))
    chain_file.write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    key_file.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    key_file.chmod(0o600)
    return root_file, chain_file, key_file


Scan = dict[str, Any]


@pytest.fixture(scope="module")
def scans(pki: Pki, recorder: RecordingUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Scan]]:
    python = sslyze_python()
    tmp = tmp_path_factory.mktemp("scanner")
    root, chain, key = server_chain(tmp)
    proc: ProxyProcess = spawn(tmp, pki, recorder.port, "scanned", server={"cert": str(chain), "key": str(key)})
    good = pki.clients["good"]
    results: dict[str, Scan] = {}
    try:
        for label, extra in (("no-cert", []), ("client-cert", ["--cert", str(good.cert), "--key", str(good.key)])):
            out = tmp / f"{label}.json"
            done = subprocess.run(
                [python, "-m", "sslyze", f"--json_out={out}", "--quiet", *SCAN_COMMANDS,
                 f"--certinfo_ca_file={root}", *extra, f"localhost:{proc.port}{{127.0.0.1}}"],
                capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            (server,) = json.loads(out.read_text())["server_scan_results"]
            assert server["scan_status"] == "COMPLETED", server.get("connectivity_error_trace")
            results[label] = server
        yield results
    finally:
        proc.stop()
    assert "Traceback" not in proc.stderr(), proc.stderr()[-3000:]


def result(scan: Scan, command: str) -> Any:
    entry = scan["scan_result"][command]
    assert entry["status"] == "COMPLETED", (command, entry.get("error_reason"), entry.get("error_trace"))
    return entry["result"]


def accepted(scan: Scan, command: str) -> list[str]:
    return [c["cipher_suite"]["name"] for c in result(scan, command)["accepted_cipher_suites"]]


BOTH = pytest.mark.parametrize("label", ["no-cert", "client-cert"])


def test_client_authentication_is_required(scans: dict[str, Scan]) -> None:
    assert scans["no-cert"]["connectivity_result"]["client_auth_requirement"] == "REQUIRED"


@BOTH
def test_only_tls12_and_tls13(scans: dict[str, Scan], label: str) -> None:
    for old in ("ssl_2_0_cipher_suites", "ssl_3_0_cipher_suites", "tls_1_0_cipher_suites", "tls_1_1_cipher_suites"):
        assert accepted(scans[label], old) == [], old
    assert accepted(scans[label], "tls_1_2_cipher_suites")
    assert accepted(scans[label], "tls_1_3_cipher_suites")
    assert scans[label]["connectivity_result"]["highest_tls_version_supported"] == "TLS_1_3"


@BOTH
def test_no_weak_cipher_suites_by_default(scans: dict[str, Scan], label: str, figures: Figures) -> None:
    suites = accepted(scans[label], "tls_1_2_cipher_suites") + accepted(scans[label], "tls_1_3_cipher_suites")
    weak = [s for s in suites if any(w in s + " " for w in WEAK)]
    assert weak == [], weak
    assert all("GCM" in s or "CHACHA20_POLY1305" in s for s in suites), suites  # AEAD only
    if label == "client-cert":
        figures.note(f"sslyze {SSLYZE_VERSION}: {len(suites)} suites accepted, all AEAD with forward secrecy "
                     f"(TLS 1.2 + 1.3); SSL 2/3, TLS 1.0/1.1 refused; client auth REQUIRED; no compression; "
                     f"no client renegotiation")


@BOTH
def test_no_compression(scans: dict[str, Scan], label: str) -> None:
    assert result(scans[label], "tls_compression")["supports_compression"] is False


def test_secure_renegotiation_only(scans: dict[str, Scan]) -> None:
    reneg = result(scans["client-cert"], "session_renegotiation")
    assert reneg["supports_secure_renegotiation"] is True
    assert reneg["is_vulnerable_to_client_renegotiation_dos"] is False
    assert reneg["client_renegotiations_success_count"] == 0
    # without a certificate there is no session to renegotiate: the scanner is stopped at the handshake
    entry = scans["no-cert"]["scan_result"]["session_renegotiation"]
    assert entry["status"] == "ERROR" and entry["error_reason"] == "CLIENT_CERTIFICATE_NEEDED", entry["status"]


@BOTH
def test_certificate_chain_is_complete(scans: dict[str, Scan], label: str) -> None:
    (deployment,) = result(scans[label], "certificate_info")["certificate_deployments"]
    assert len(deployment["received_certificate_chain"]) == 2  # leaf + intermediate, no anchor
    assert deployment["received_chain_has_valid_order"] is True
    custom = [r for r in deployment["path_validation_results"] if r["trust_store"]["path"].endswith("scan-root.crt")]
    assert len(custom) == 1, [r["trust_store"] for r in deployment["path_validation_results"]]
    assert custom[0]["was_validation_successful"] is True, custom[0]["validation_error"]
    assert len(custom[0]["verified_certificate_chain"]) == 3  # leaf, intermediate (sent), root (ours)


@BOTH
def test_known_attacks_do_not_apply(scans: dict[str, Scan], label: str) -> None:
    scan = scans[label]
    assert result(scan, "heartbleed")["is_vulnerable_to_heartbleed"] is False
    assert result(scan, "openssl_ccs_injection")["is_vulnerable_to_ccs_injection"] is False
    assert result(scan, "robot")["robot_result"].startswith("NOT_VULNERABLE")
    assert result(scan, "tls_fallback_scsv")["supports_fallback_scsv"] is True
    assert result(scan, "tls_extended_master_secret")["supports_ems_extension"] is True
