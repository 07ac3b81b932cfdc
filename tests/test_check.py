"""``mtls-proxy check``: exit 0 and "ok" for a good configuration, one line per problem (exit 1), and the
warnings (exit 0).

The certificates whose validity matters (a server certificate expiring in 10 days, a CA expiring in 20, CRLs
whose next update has passed or is near) are made here with ``cryptography``; the session PKI's own CAs and
CRLs have short lifetimes by design, so the "clean" configuration uses long-lived ones made here too.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy import check as check_mod
from tests.harness import ROOT, write_config
from tests.pki import Pki

PEM = serialization.Encoding.PEM
NOW = dt.datetime.now(dt.timezone.utc)
DAY = dt.timedelta(days=1)
YEAR = dt.timedelta(days=365)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        crt, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        crt.write_bytes(self.cert.public_bytes(PEM))
        key.write_bytes(self.key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key.chmod(0o600)
        return crt, key


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "check tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, not_after: dt.datetime, issuer: Issued | None = None, *, ca: bool) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(cn))
               .issuer_name(issuer.cert.subject if issuer else _name(cn)).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(NOW - 30 * DAY).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    else:
        builder = (builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False))
    return Issued(builder.sign((issuer or Issued(None, key)).key, hashes.SHA256()), key)  # type: ignore[arg-type]


def make_crl(ca: Issued, next_update: dt.datetime) -> bytes:
    return (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
            .last_update(min(NOW - DAY, next_update - DAY)).next_update(next_update)
            .sign(ca.key, hashes.SHA256()).public_bytes(PEM))


@dataclass(frozen=True)
class Files:
    """Long-lived certificates: a configuration using only these has no expiry warning."""

    dir: Path
    client_ca: Path
    crl: Path
    server_cert: Path
    server_key: Path
    ca: Issued
    server_ca: Issued


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    d = tmp_path_factory.mktemp("check-pki")
    ca = make_cert("check client CA", NOW + 5 * YEAR, ca=True)
    server_ca = make_cert("check server CA", NOW + 5 * YEAR, ca=True)
    server_cert, server_key = make_cert("localhost", NOW + YEAR, server_ca, ca=False).write(d, "server")
    client_ca = d / "client-ca.crt"
    client_ca.write_bytes(ca.cert.public_bytes(PEM))
    crl = d / "crl.pem"
    crl.write_bytes(make_crl(ca, NOW + YEAR))
    return Files(d, client_ca, crl, server_cert, server_key, ca, server_ca)


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # check() reads the process environment (like serve): keep a stray MTLS_PROXY_* out of these tests.
    for name in list(os.environ):
        if name.startswith("MTLS_PROXY_"):
            monkeypatch.delenv(name)


def config(tmp_path: Path, pki: Pki, files: Files, *, server: dict[str, Any] | None = None,
           **kw: Any) -> Path:
    srv = {"cert": str(files.server_cert), "key": str(files.server_key), "client_ca": str(files.client_ca),
           "crl": str(files.crl)}
    srv.update(server or {})
    return write_config(tmp_path / "proxy.toml", pki, 9, server=srv, **kw)


def run_check(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MTLS_PROXY_")}
    return subprocess.run([sys.executable, "-m", "proxy", "check", "--config", str(path)], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)


# ---- a good configuration -----------------------------------------------------------------------------


def test_good_config_has_no_errors_and_no_warnings(tmp_path: Path, pki: Pki, files: Files) -> None:
    assert check_mod.check(str(config(tmp_path, pki, files))) == ([], [])


def test_good_config_process_exits_0_with_ok(tmp_path: Path, pki: Pki, files: Files) -> None:
    path = config(tmp_path, pki, files)
    proc = run_check(path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == f"ok: {path} is valid (0 warning(s))\n"


# ---- warnings (exit 0) ----------------------------------------------------------------------------------


def _expiring_server(d: Path, files: Files, days: float) -> dict[str, Any]:
    crt, key = make_cert("localhost", NOW + dt.timedelta(days=days), files.server_ca, ca=False).write(d, "soon")
    return {"server": {"cert": str(crt), "key": str(key)}}


def _ca_bundle(d: Path, files: Files, extra: Issued) -> Path:
    bundle = d / "bundle.crt"
    bundle.write_bytes(files.client_ca.read_bytes() + extra.cert.public_bytes(PEM))
    return bundle


def _crl_file(d: Path, files: Files, next_update: dt.datetime) -> dict[str, Any]:
    path = d / "crl-near.pem"
    path.write_bytes(make_crl(files.ca, next_update))
    return {"server": {"crl": str(path)}}


def _ca_expiring(d: Path, files: Files) -> dict[str, Any]:
    short = make_cert("short-lived CA", NOW + 20 * DAY, ca=True)
    crl = d / "crls.pem"
    crl.write_bytes(files.crl.read_bytes() + make_crl(short, NOW + YEAR))
    return {"server": {"client_ca": str(_ca_bundle(d, files, short)), "crl": str(crl)}}


def _ca_without_crl(d: Path, files: Files) -> dict[str, Any]:
    other = make_cert("CA without a CRL", NOW + 5 * YEAR, ca=True)
    return {"server": {"client_ca": str(_ca_bundle(d, files, other))}}


NGINX_CIPHERS = "ECDH+AESGCM:ECDH+AES256:ECDH+AES128:DH+3DES:!ADH:!AECDH:!MD5"  # the reference NGINX config

# (id, changes to the good configuration, regex the one warning must match)
WARNINGS: list[tuple[str, Any, str]] = [
    ("nginx-ciphers", lambda d, f: {"server": {"ciphers": NGINX_CIPHERS}},
     r"server\.ciphers: enables CBC \(non-AEAD\) suites: .*ECDHE-RSA-AES256-SHA384"),
    ("cbc-cipher", lambda d, f: {"server": {"ciphers": "ECDHE-RSA-AES128-SHA"}},
     r"server\.ciphers: enables CBC \(non-AEAD\) suites: ECDHE-RSA-AES128-SHA$"),
    ("verify-false", lambda d, f: {"upstream": {"verify": False}}, r"upstream\.verify: false: "),
    ("allow-all-verified", lambda d, f: {"top": {"allow_all_verified": True}, "rules": []},
     r"allow_all_verified: true: every client"),
    ("client-cert-header", lambda d, f: {"identity": {"client_cert_header": True}},
     r"identity\.client_cert_header: true: every request carries the client certificate .* over 10240 bytes.*"
     r"431 identity_too_large$"),
    ("server-cert-10-days", lambda d, f: _expiring_server(d, f, 10.5), r"server\.cert: expiry in 10 days \("),
    ("server-cert-expired", lambda d, f: _expiring_server(d, f, -1), r"server\.cert: expiry .* has passed$"),
    ("client-ca-20-days", _ca_expiring, r"server\.client_ca \(short-lived CA\): expiry in 20 days \("),
    ("crl-next-update-near", lambda d, f: _crl_file(d, f, NOW + 5.5 * DAY),
     r"server\.crl \(check client CA\): next update in 5 days \("),
    ("crl-next-update-passed", lambda d, f: _crl_file(d, f, NOW - DAY),
     r"server\.crl \(check client CA\): next update .* has passed \(every client is refused\)$"),
    ("ca-without-crl", _ca_without_crl,
     r"server\.crl: no CRL for client CA CN=CA without a CRL,O=check tests: with crl set, OpenSSL refuses"),
]


@pytest.mark.parametrize(("changes", "pattern"), [(c, p) for _, c, p in WARNINGS], ids=[i for i, _, _ in WARNINGS])
def test_warning(tmp_path: Path, pki: Pki, files: Files, changes: Any, pattern: str) -> None:
    errors, warnings = check_mod.check(str(config(tmp_path, pki, files, **changes(tmp_path, files))))
    assert errors == []
    assert len(warnings) == 1 and re.search(pattern, warnings[0]), warnings
    assert "\n" not in warnings[0]


def test_3des_cipher_warning(tmp_path: Path, pki: Pki, files: Files) -> None:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.set_ciphers("ECDHE-RSA-DES-CBC3-SHA:DES-CBC3-SHA")
    except ssl.SSLError:
        pytest.skip(f"{ssl.OPENSSL_VERSION} has no 3DES suites (the warning's name test is below)")
    _, warnings = check_mod.check(str(config(tmp_path, pki, files, server={"ciphers": "ECDHE-RSA-DES-CBC3-SHA"})))
    assert any(w.startswith("server.ciphers: enables 3DES suites: ") for w in warnings), warnings


class _Ciphers:
    """Stands in for an SSLContext where OpenSSL was built without 3DES (only get_ciphers() is used)."""

    def __init__(self, ciphers: list[dict[str, Any]]) -> None:
        self._ciphers = ciphers

    def get_ciphers(self) -> list[dict[str, Any]]:
        return self._ciphers


def test_cipher_warnings_table() -> None:
    ciphers = [
        {"name": "TLS_AES_128_GCM_SHA256", "protocol": "TLSv1.3", "aead": True},
        {"name": "ECDHE-RSA-AES128-GCM-SHA256", "protocol": "TLSv1.2", "aead": True},
        {"name": "ECDHE-RSA-DES-CBC3-SHA", "protocol": "TLSv1.2", "aead": False},
        {"name": "ECDHE-RSA-AES128-SHA", "protocol": "TLSv1.2", "aead": False},
    ]
    assert check_mod._cipher_warnings(_Ciphers(ciphers)) == [  # type: ignore[arg-type]
        "server.ciphers: enables 3DES suites: ECDHE-RSA-DES-CBC3-SHA",
        "server.ciphers: enables CBC (non-AEAD) suites: ECDHE-RSA-AES128-SHA",
    ]


def test_several_warnings_together(tmp_path: Path, pki: Pki, files: Files) -> None:
    path = config(tmp_path, pki, files, upstream={"verify": False}, top={"allow_all_verified": True},
                  server={"ciphers": NGINX_CIPHERS})
    errors, warnings = check_mod.check(str(path))
    assert errors == [] and [w.split(":")[0] for w in warnings] == ["server.ciphers", "upstream.verify",
                                                                   "allow_all_verified"]


def test_warnings_process_exits_0(tmp_path: Path, pki: Pki, files: Files) -> None:
    path = config(tmp_path, pki, files, **_expiring_server(tmp_path, files, 10.5))
    proc = run_check(path, {"MTLS_PROXY_UPSTREAM_VERIFY": "false"})  # the environment applies to check too
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert [line.split(":")[0:2] for line in lines] == [["warning", " upstream.verify"], ["warning", " server.cert"]]
    assert proc.stdout == f"ok: {path} is valid (2 warning(s))\n"


# ---- errors (exit 1, one line each) ---------------------------------------------------------------------


def test_config_errors_one_line_each(tmp_path: Path, pki: Pki, files: Files) -> None:
    path = config(tmp_path, pki, files, server={"bogus": 1, "verify_depth": 99}, upstream={"api_id": "NOPE"})
    errors, warnings = check_mod.check(str(path))
    assert warnings == []
    assert [e.split(": ")[0] for e in errors] == ["server.bogus", "server.verify_depth", "upstream.api_id"]


def test_file_errors_name_key_and_file(tmp_path: Path, pki: Pki, files: Files) -> None:
    missing = tmp_path / "gone.crt"
    path = config(tmp_path, pki, files, server={"cert": str(missing)}, upstream={"ca_bundle": str(pki.server_key)})
    errors, _ = check_mod.check(str(path))
    assert len(errors) == 2, errors
    assert errors[0].startswith("server.cert: ") and str(missing) in errors[0]
    assert errors[1].startswith("upstream.ca_bundle: ") and str(pki.server_key) in errors[1]


def test_rule_errors_are_reported(tmp_path: Path, pki: Pki, files: Files) -> None:
    path = config(tmp_path, pki, files, rules=[{"name": "no-identity", "paths": ["/x"]}])
    errors, _ = check_mod.check(str(path))
    assert errors == ["allow[0]: needs at least one identity field (subject_cn, san_dns, san_uri, fingerprint_sha256)"]


def test_errors_process_exits_1_one_line_per_problem(tmp_path: Path, pki: Pki, files: Files) -> None:
    path = config(tmp_path, pki, files, server={"listen": "nowhere", "tls_versions": ["1.1"]},
                  upstream={"url": "http://api.test/prod"})
    proc = run_check(path, {"MTLS_PROXY_TYPO": "x"})
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert sorted(line.split(": ")[1] for line in lines) == sorted(
        ["server.listen", "server.tls_versions", "upstream.url", "MTLS_PROXY_TYPO"]), lines
    assert all(line.startswith("error: ") for line in lines) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("url", ["https://bücher.example/prod", "https://[::1/prod"])
def test_url_that_used_to_crash_is_one_line(tmp_path: Path, pki: Pki, files: Files, url: str) -> None:
    # Regression: a non-ASCII host passed validation and crashed encoding the Host header (UnicodeEncodeError
    # traceback); an unbalanced "[" made urlsplit raise ValueError out of load().
    proc = run_check(config(tmp_path, pki, files, upstream={"url": url}))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: upstream.url: ")


def test_missing_config_file_process(tmp_path: Path) -> None:
    proc = run_check(tmp_path / "absent.toml")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"error: {tmp_path / 'absent.toml'}: config file not found\n"


def test_a_fast_path_this_python_cannot_use_is_a_warning(tmp_path: Path, pki: Pki, files: Files,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import openssl

    # a CPython whose ssl object layout the bridge has not checked: no pointer can be proven
    monkeypatch.setattr(openssl, "_LAYOUT_VERSIONS", ((3, 0), (3, 1)))
    errors, warnings = check_mod.check(str(config(tmp_path, pki, files)))
    # the chain depth limit is a security setting: without it the configuration is refused, naming the key
    assert len(errors) == 1 and errors[0].startswith("server.verify_depth: cannot enforce the chain depth limit")
    monkeypatch.undo()
    monkeypatch.setattr(openssl, "enable_read_ahead", lambda ctx: False)  # only a fast path is missing
    errors, warnings = check_mod.check(str(config(tmp_path, pki, files)))
    assert errors == []
    assert warnings == ["openssl: fast path read_ahead off: not set on the server and upstream context; two read() "
                        "calls per record"]


@pytest.mark.parametrize("days, warn_days, warned", [(10.5, 7, False), (10.5, 14, True), (5.5, 7, True),
                                                      (5.5, 3, False)])
def test_crl_warn_days_sets_the_crl_horizon(tmp_path: Path, pki: Pki, files: Files, days: float,
                                            warn_days: float, warned: bool) -> None:
    # A certificate 10 days from expiry is always warned about (30 days); a CRL only within crl_warn_days.
    changes = _crl_file(tmp_path, files, NOW + days * DAY)
    changes["server"]["crl_warn_days"] = warn_days
    errors, warnings = check_mod.check(str(config(tmp_path, pki, files, **changes)))
    assert errors == [] and bool([w for w in warnings if w.startswith("server.crl (")]) is warned, warnings
