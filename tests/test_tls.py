"""tls: the server and upstream contexts, chain depth through ctypes, and handshake-failure reasons.

Everything is checked against real OpenSSL: contexts are built from the test PKI's files and exercised with real
loopback handshakes (tests.pki.probe_handshake, or ``server_failure`` below when the server-side exception itself
is needed).
"""

from __future__ import annotations

import ctypes
import datetime as dt
import socket
import ssl
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from proxy import tls
from proxy.config import DEFAULT_CIPHERS, PemSource, ServerConfig, UpstreamConfig
from proxy.errors import ConfigError
from proxy.metrics import HANDSHAKE_REASONS
from tests.pki import Pki, probe_handshake

CERT_CHAIN_TOO_LONG = 22  # X509_V_ERR_CERT_CHAIN_TOO_LONG (x509_vfy.h)
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
CRL_HAS_EXPIRED = 12


def server_cfg(pki: Pki, **changes: object) -> ServerConfig:
    values: dict[str, object] = {"cert": PemSource(pki.server_cert), "key": PemSource(pki.server_key),
                                 "client_ca": PemSource(pki.client_ca), "crl": PemSource(pki.crl_bundle)}
    values.update(changes)
    return ServerConfig(**values)  # type: ignore[arg-type]


def upstream_cfg(**changes: object) -> UpstreamConfig:
    values: dict[str, object] = {"url": "https://api.test/prod", "scheme": "https", "host": "api.test", "port": 443,
                                 "base_path": "/prod"}
    values.update(changes)
    return UpstreamConfig(**values)  # type: ignore[arg-type]


def build(pki: Pki, **changes: object) -> ssl.SSLContext:
    return tls.build_server_context(server_cfg(pki, **changes))[0]


def config_error(pki: Pki, **changes: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        tls.build_server_context(server_cfg(pki, **changes))
    assert "\n" not in str(info.value)
    return info.value


# ---- reading the verify depth back from OpenSSL (independently of proxy.tls) ---------------------------


def _libssl() -> ctypes.CDLL:
    import _ssl  # noqa: F401

    with open("/proc/self/maps") as fh:
        paths = {line.rsplit(None, 1)[-1] for line in fh if "/libssl.so" in line}
    assert len(paths) == 1, paths
    lib = ctypes.CDLL(paths.pop())
    lib.SSL_CTX_get_verify_depth.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_depth.restype = ctypes.c_int
    return lib


def openssl_verify_depth(ctx: ssl.SSLContext) -> int:
    # PySSLContext: PyObject_HEAD, then the SSL_CTX* (Modules/_ssl.c).
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    return int(_libssl().SSL_CTX_get_verify_depth(ptr))


def openssl_session_cache_size(ctx: ssl.SSLContext) -> int:
    """SSL_CTX_sess_get_cache_size(ctx): a macro for SSL_CTX_ctrl(ctx, SSL_CTRL_GET_SESS_CACHE_SIZE = 43, 0, NULL)."""
    lib = _libssl()
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    return int(lib.SSL_CTX_ctrl(ptr, 43, 0, None))


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 9])
def test_verify_depth_is_set_in_openssl(pki: Pki, depth: int) -> None:
    assert openssl_verify_depth(build(pki, verify_depth=depth)) == depth


def test_verify_depth_reader_sees_the_openssl_default_on_a_plain_context() -> None:
    # Proves the reader looks at the real SSL_CTX: an untouched context has OpenSSL's "unset" depth (-1).
    assert openssl_verify_depth(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) == -1


@pytest.mark.parametrize(("client", "depth", "code"), [
    ("too_deep", 2, CERT_CHAIN_TOO_LONG),  # leaf, i3, i2, i1, root: three intermediates
    ("too_deep", 3, None),
    ("via_intermediate", 1, None),
    ("via_intermediate", 0, CERT_CHAIN_TOO_LONG),
    ("good", 0, None),
])
def test_verify_depth_decides_real_handshakes(pki: Pki, client: str, depth: int, code: int | None) -> None:
    ctx = build(pki, verify_depth=depth, crl=None)
    result = probe_handshake(ctx, pki.client_context(pki.clients[client]))
    assert result.server_ok is (code is None), result
    assert result.server_verify_code == code


# ---- protocol versions, options, ciphers ---------------------------------------------------------------


@pytest.mark.parametrize(("versions", "low", "high"), [
    (("1.2", "1.3"), ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    (("1.3", "1.2"), ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3),
    (("1.2",), ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2),
    (("1.3",), ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3),
])
def test_tls_versions(pki: Pki, versions: tuple[str, ...], low: ssl.TLSVersion, high: ssl.TLSVersion) -> None:
    ctx = build(pki, tls_versions=versions)
    assert (ctx.minimum_version, ctx.maximum_version) == (low, high)


@pytest.mark.parametrize(("versions", "client_max", "negotiated"), [
    (("1.2", "1.3"), None, "TLSv1.3"),
    (("1.2", "1.3"), ssl.TLSVersion.TLSv1_2, "TLSv1.2"),
    (("1.2",), None, "TLSv1.2"),  # mirrors the NGINX ssl_protocols TLSv1.2
    (("1.3",), ssl.TLSVersion.TLSv1_2, None),
])
def test_tls_versions_in_real_handshakes(pki: Pki, versions: tuple[str, ...], client_max: ssl.TLSVersion | None,
                                         negotiated: str | None) -> None:
    result = probe_handshake(build(pki, tls_versions=versions),
                             pki.client_context(pki.clients["good"], tls_max=client_max))
    assert result.version == negotiated, result


def test_options_disable_compression_and_renegotiation(pki: Pki) -> None:
    ctx = build(pki)
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.options & ssl.OP_NO_TICKET  # resumption from the server's session cache only (see below)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.verify_flags & ssl.VERIFY_CRL_CHECK_LEAF
    assert not build(pki, crl=None).verify_flags & ssl.VERIFY_CRL_CHECK_LEAF


def test_default_ciphers_are_only_ecdhe_aead(pki: Pki) -> None:
    tls12 = [c for c in build(pki).get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert {c["name"] for c in tls12} == set(DEFAULT_CIPHERS.split(":"))
    assert all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12), tls12


def test_configured_ciphers_are_used(pki: Pki) -> None:
    ctx = build(pki, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    assert [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"] == ["ECDHE-ECDSA-AES256-GCM-SHA384"]
    result = probe_handshake(ctx, pki.client_context(pki.clients["good"], tls_max=ssl.TLSVersion.TLSv1_2))
    assert result.server_ok, result


def test_no_matching_cipher_is_a_config_error(pki: Pki) -> None:
    err = config_error(pki, ciphers="NO-SUCH-CIPHER")
    assert err.key == "server.ciphers" and "NO-SUCH-CIPHER" in err.message


# ---- facts ----------------------------------------------------------------------------------------------


def test_facts_name_what_was_loaded(pki: Pki) -> None:
    _, facts = tls.build_server_context(server_cfg(pki))
    leaf = x509.load_pem_x509_certificates(pki.server_cert.read_bytes())[0]
    cas = x509.load_pem_x509_certificates(pki.client_ca.read_bytes())
    by_kind: dict[str, list[tls.CertFact]] = {}
    for f in facts:
        by_kind.setdefault(f.label.split(":")[0], []).append(f)
    assert [f.not_after for f in by_kind["server"]] == [leaf.not_valid_after_utc.timestamp()]
    assert sorted(f.not_after for f in by_kind["client_ca"]) == sorted(c.not_valid_after_utc.timestamp() for c in cas)
    assert "client_ca:partner-selfsigned" in {f.label for f in facts}
    assert len(by_kind["crl"]) == pki.crl_bundle.read_bytes().count(b"BEGIN X509 CRL")
    assert all(f.not_after > 0 for f in facts)


def test_expiring() -> None:
    facts = [tls.CertFact("a", 100.0 + 10 * 86400), tls.CertFact("b", 100.0 + 40 * 86400), tls.CertFact("c", 50.0)]
    assert [f.label for f in tls.expiring(facts, 30, now=100.0)] == ["a", "c"]


# ---- bad inputs: one ConfigError naming the key and the file ----------------------------------------


def test_key_that_does_not_match_the_certificate(pki: Pki) -> None:
    err = config_error(pki, key=PemSource(pki.upstream_key))
    assert err.key == "server.key"
    assert str(pki.upstream_key) in err.message and str(pki.server_cert) in err.message
    assert "does not match" in err.message


@pytest.mark.parametrize("key", ["cert", "key", "client_ca", "crl"])
def test_missing_file(pki: Pki, tmp_path: Path, key: str) -> None:
    missing = tmp_path / f"missing-{key}.pem"
    err = config_error(pki, **{key: PemSource(missing)})
    assert err.key == f"server.{key}" and str(missing) in err.message and "not found" in err.message


@pytest.mark.parametrize("key", ["cert", "key", "client_ca", "crl"])
def test_non_pem_file(pki: Pki, tmp_path: Path, key: str) -> None:
    junk = tmp_path / "junk.der"
    junk.write_bytes(b"\x30\x82\x01\x00 not pem at all")
    err = config_error(pki, **{key: PemSource(junk)})
    # A CRL may be DER (what distribution points serve), so DER-looking junk is reported as a bad DER CRL.
    expected = "bad DER CRL" if key == "crl" else "no PEM data"
    assert err.key == f"server.{key}" and str(junk) in err.message and expected in err.message


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "no PEM data"),
    (b"# an empty bundle\n", "no PEM data"),
    (None, "not a PEM certificate bundle"),  # a private key where certificates belong
])
def test_bad_ca_bundle(pki: Pki, tmp_path: Path, content: bytes | None, fragment: str) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(pki.server_key.read_bytes() if content is None else content)
    err = config_error(pki, client_ca=PemSource(bundle))
    assert err.key == "server.client_ca" and str(bundle) in err.message and fragment in err.message


def test_cert_file_holding_only_a_key(pki: Pki) -> None:
    err = config_error(pki, cert=PemSource(pki.server_key))
    assert err.key == "server.cert" and str(pki.server_key) in err.message


def test_key_file_holding_a_certificate(pki: Pki) -> None:
    err = config_error(pki, key=PemSource(pki.server_cert))
    assert err.key == "server.key" and str(pki.server_cert) in err.message


@pytest.mark.parametrize(("content", "fragment"), [
    (b"-----BEGIN X509 CRL-----\nbm90IGEgY3Js\n-----END X509 CRL-----\n", "bad CRL"),
    (None, "no CRL found"),  # a certificate file given as the CRL
])
def test_bad_crl(pki: Pki, tmp_path: Path, content: bytes | None, fragment: str) -> None:
    crl = tmp_path / "crl.pem"
    crl.write_bytes(pki.client_ca_only.read_bytes() if content is None else content)
    err = config_error(pki, crl=PemSource(crl))
    assert err.key == "server.crl" and str(crl) in err.message and fragment in err.message


def test_encrypted_key_is_a_config_error_not_a_prompt(pki: Pki, tmp_path: Path) -> None:
    # Regression: without a password callback OpenSSL prompted on the terminal (hanging start-up and reloads)
    # or, without one, raised a bare OSError(EINVAL) that escaped as a traceback.
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    for i, fmt in enumerate((serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL)):
        encrypted = tmp_path / f"encrypted-{i}.key"
        encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt,
                                                serialization.BestAvailableEncryption(b"secret")))
        err = config_error(pki, key=PemSource(encrypted))
        assert err.key == "server.key" and str(encrypted) in err.message and "encrypted" in err.message


@pytest.mark.parametrize("key", ["cert", "key", "client_ca", "crl"])
def test_unset_env_source(pki: Pki, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.delenv("MTLS_TEST_UNSET_PEM", raising=False)
    err = config_error(pki, **{key: PemSource(env="MTLS_TEST_UNSET_PEM")})
    assert err.key == f"server.{key}" and "MTLS_TEST_UNSET_PEM" in err.message


def test_env_sources_load(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, path in (("T_CERT", pki.server_cert), ("T_KEY", pki.server_key), ("T_CA", pki.client_ca),
                       ("T_CRL", pki.crl_bundle)):
        monkeypatch.setenv(name, path.read_text())
    ctx = build(pki, cert=PemSource(env="T_CERT"), key=PemSource(env="T_KEY"), client_ca=PemSource(env="T_CA"),
                crl=PemSource(env="T_CRL"))
    assert probe_handshake(ctx, pki.client_context(pki.clients["good"])).server_ok
    assert probe_handshake(ctx, pki.client_context(pki.clients["revoked"])).server_verify_code == 23


# ---- client verification ------------------------------------------------------------------------------


def test_self_signed_client_listed_in_client_ca_is_its_own_anchor(pki: Pki) -> None:
    assert probe_handshake(build(pki), pki.client_context(pki.clients["self_signed"])).server_ok


def test_certificates_in_the_crl_file_are_not_trusted(pki: Pki, tmp_path: Path) -> None:
    # Regression: the CRL file was loaded with load_verify_locations(cafile=...), which also trusts every
    # certificate in it.  A CA certificate slipped into crl.pem (with a CRL of its own, so CRL_CHECK_LEAF is
    # satisfied) made its clients acceptable although server.client_ca never listed it.
    rogue = trustme.CA(organization_name="rogue")
    leaf = rogue.issue_cert("rogue.partner.test", common_name="client-a")
    rogue_key = serialization.load_pem_private_key(rogue.private_key_pem.bytes(), password=None)
    rogue_cert = x509.load_pem_x509_certificate(rogue.cert_pem.bytes())
    now = dt.datetime.now(dt.timezone.utc)
    rogue_crl = (x509.CertificateRevocationListBuilder().issuer_name(rogue_cert.subject)
                 .last_update(now - dt.timedelta(days=1)).next_update(now + dt.timedelta(days=30))
                 .sign(rogue_key, hashes.SHA256()))  # type: ignore[arg-type]
    crl = tmp_path / "crl-with-a-ca.pem"
    crl.write_bytes(pki.crl_bundle.read_bytes() + rogue.cert_pem.bytes()
                    + rogue_crl.public_bytes(serialization.Encoding.PEM))
    client_pem = tmp_path / "rogue-client.pem"
    client_pem.write_bytes(leaf.private_key_and_cert_chain_pem.bytes())
    client = pki.client_context(None)
    client.load_cert_chain(client_pem)

    ctx = build(pki, crl=PemSource(crl))
    result = probe_handshake(ctx, client)
    assert not result.server_ok and result.server_verify_code == UNABLE_TO_GET_ISSUER_CERT_LOCALLY, result
    # ... while the CRLs in the same file still work.
    assert probe_handshake(ctx, pki.client_context(pki.clients["good"])).server_ok
    assert probe_handshake(ctx, pki.client_context(pki.clients["revoked"])).server_verify_code == 23


# ---- upstream context ---------------------------------------------------------------------------------


def test_upstream_context_verifies_the_name_with_the_ca_bundle(pki: Pki) -> None:
    ctx = tls.build_upstream_context(upstream_cfg(ca_bundle=PemSource(pki.upstream_ca)))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.options & ssl.OP_NO_COMPRESSION
    assert probe_handshake(pki.upstream_server_context("good"), ctx, server_hostname="api.test").client_error is None
    wrong = probe_handshake(pki.upstream_server_context("wrong_name"), ctx, server_hostname="api.test")
    untrusted = probe_handshake(pki.upstream_server_context("untrusted"), ctx, server_hostname="api.test")
    assert wrong.client_verify_code == 62 and untrusted.client_verify_code == UNABLE_TO_GET_ISSUER_CERT_LOCALLY


def test_upstream_context_without_bundle_uses_the_system_store(pki: Pki) -> None:
    ctx = tls.build_upstream_context(upstream_cfg())
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    result = probe_handshake(pki.upstream_server_context("good"), ctx, server_hostname="api.test")
    assert result.client_verify_code == UNABLE_TO_GET_ISSUER_CERT_LOCALLY  # the test CA is not a public one


def test_upstream_verify_false(pki: Pki) -> None:
    ctx = tls.build_upstream_context(upstream_cfg(verify=False))
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert probe_handshake(pki.upstream_server_context("untrusted"), ctx, server_hostname="api.test").client_error \
        is None


@pytest.mark.parametrize("kind", ["missing", "non_pem", "key_only", "env_unset"])
def test_bad_upstream_ca_bundle(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.delenv("MTLS_TEST_UNSET_PEM", raising=False)
    path = tmp_path / "api-ca.pem"
    if kind == "non_pem":
        path.write_text("hello")
    elif kind == "key_only":
        path.write_bytes(pki.upstream_key.read_bytes())
    source = PemSource(env="MTLS_TEST_UNSET_PEM") if kind == "env_unset" else PemSource(path)
    with pytest.raises(ConfigError) as info:
        tls.build_upstream_context(upstream_cfg(ca_bundle=source))
    assert info.value.key == "upstream.ca_bundle"
    assert (source.env or str(source.path)) in info.value.message


# ---- handshake failure reasons, from real handshakes ------------------------------------------------


def server_failure(server_ctx: ssl.SSLContext, client: Callable[[socket.socket], object],
                   server_timeout: float = 10.0) -> BaseException | None:
    """Run one server-side handshake against ``client`` (given the raw connected socket); return what the
    server's handshake raised (None if it completed)."""
    result: dict[str, BaseException] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(15)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(server_timeout)
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls_sock:
                        tls_sock.sendall(b"ok")
                except BaseException as exc:  # noqa: BLE001 - the exception is the result
                    result["exc"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=15) as raw:
            try:
                client(raw)
            except (ssl.SSLError, OSError):
                pass  # the client's view does not matter here
        thread.join(20)
        assert not thread.is_alive()
    return result.get("exc")


def tls_client(ctx: ssl.SSLContext) -> Callable[[socket.socket], object]:
    def run(raw: socket.socket) -> None:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            while s.recv(16):  # TLS 1.3: the server's verdict on our certificate arrives after our handshake
                pass
    return run


def tls11_client() -> Callable[[socket.socket], object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.0/1.1 on purpose
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return tls_client(ctx)


def wait_for_close(raw: socket.socket) -> None:
    while raw.recv(1024):
        pass


CLIENT_REASONS = [
    ("no_cert", None),
    ("expired", "expired"),
    ("not_yet_valid", "expired"),
    ("revoked", "revoked"),
    ("no_client_auth", "bad_purpose"),
    ("other_ca_same_cn", "untrusted"),
    ("too_deep", "untrusted"),
]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda v: v.name)
@pytest.mark.parametrize(("client", "reason"), CLIENT_REASONS, ids=[c for c, _ in CLIENT_REASONS])
def test_reason_for_refused_client_certificates(pki: Pki, client: str, reason: str | None,
                                                version: ssl.TLSVersion) -> None:
    cert = None if client == "no_cert" else pki.clients[client]
    exc = server_failure(build(pki), tls_client(pki.client_context(cert, tls_max=version)))
    assert exc is not None
    assert tls.handshake_failure_reason(exc) == (reason or "no_cert")
    if isinstance(exc, ssl.SSLCertVerificationError):
        assert f"(X509_V_ERR {exc.verify_code})" in tls.handshake_failure_detail(exc)


def test_good_client_has_no_failure(pki: Pki) -> None:
    assert server_failure(build(pki), tls_client(pki.client_context(pki.clients["good"]))) is None


@pytest.mark.parametrize(("client", "reason"), [
    (tls11_client(), "protocol"),  # TLS 1.0/1.1 are never accepted
    (lambda raw: (raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), wait_for_close(raw)), "protocol"),
    (lambda raw: (raw.sendall(b"\x16\x03\x01\x00\x05hello"), wait_for_close(raw)), "protocol"),
    (lambda raw: None, "other"),  # connect and close: EOF during the handshake
], ids=["tls1.1", "plain-http", "garbage-record", "eof"])
def test_reason_for_protocol_failures(pki: Pki, client: Callable[[socket.socket], object], reason: str) -> None:
    exc = server_failure(build(pki), client)
    assert exc is not None and tls.handshake_failure_reason(exc) == reason, repr(exc)


def test_reason_for_a_silent_client_is_timeout(pki: Pki) -> None:
    exc = server_failure(build(pki), wait_for_close, server_timeout=0.3)
    assert isinstance(exc, TimeoutError) and tls.handshake_failure_reason(exc) == "timeout"


def test_expired_crl_refuses_every_client_and_says_so(pki: Pki) -> None:
    exc = server_failure(build(pki, crl=PemSource(pki.crl_expired), client_ca=PemSource(pki.client_ca_only)),
                         tls_client(pki.client_context(pki.clients["good"])))
    assert isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_code == CRL_HAS_EXPIRED
    assert tls.handshake_failure_reason(exc) in HANDSHAKE_REASONS
    assert "CRL has expired" in tls.handshake_failure_detail(exc)


@pytest.mark.parametrize("exc", [
    ssl.SSLCertVerificationError(1, "x"), ssl.SSLError(1, "x"), ssl.SSLEOFError(8, "x"), TimeoutError(),
    ConnectionResetError(104, "reset"), OSError(), ValueError("odd"),
])
def test_every_reason_is_a_metric_label(exc: BaseException) -> None:
    # The listener indexes a dict pre-filled with HANDSHAKE_REASONS: any other string would be a KeyError.
    assert tls.handshake_failure_reason(exc) in HANDSHAKE_REASONS
    assert tls.handshake_failure_detail(exc)


def test_pem_from_environment_never_touches_the_disk(pki: Pki, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """env: key material goes through an anonymous memory file: no temp file appears, none can be left behind."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("T_CERT", pki.server_cert.read_text())
    monkeypatch.setenv("T_KEY", pki.server_key.read_text())
    monkeypatch.setenv("T_CA", pki.client_ca.read_text())
    opened: list[str] = []
    real_open = tls.os.open

    def spy(path: str, *args: object, **kw: object) -> int:
        opened.append(str(path))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tls.os, "open", spy)
    server = ServerConfig(cert=PemSource(env="T_CERT"), key=PemSource(env="T_KEY"), client_ca=PemSource(env="T_CA"))
    ctx, _ = tls.build_server_context(server)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert list(tmp_path.iterdir()) == []
    assert not any(p.endswith(".pem") for p in opened)


# ---- the client's chains, as RFC 9440 Client-Cert-Chain needs them ------------------------------------------------


def _pump(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
          session: ssl.SSLSession | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A full mTLS handshake over memory BIOs (no sockets), then one byte each way."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    done = {server: False, client: False}
    for _ in range(20):
        for end in (client, server):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    client.write(b"x")
    s_in.write(c_out.read())
    assert server.read(1) == b"x"
    server.write(b"y")
    c_in.write(s_out.read())
    assert client.read(1) == b"y"  # (also takes in TLS 1.3 session tickets)
    return server, client


def _ders(path: Path) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(path.read_bytes())]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda v: v.name)
def test_peer_chains_on_the_server_side(pki: Pki, version: ssl.TLSVersion) -> None:
    client = pki.clients["via_intermediate"]
    server, _ = _pump(build(pki), pki.client_context(client, tls_max=version))
    sent, verified = tls.peer_chains(server)  # type: ignore[arg-type]  # an SSLObject has the same _sslobj
    leaf, intermediate = _ders(client.cert)
    root = _ders(pki.client_ca_only)[0]
    assert sent == [leaf, intermediate]  # Python puts the leaf first on a server (OpenSSL leaves it out)
    assert verified == [leaf, intermediate, root]


def test_peer_chains_are_unknown_on_a_resumed_session(pki: Pki) -> None:
    server_ctx = build(pki)
    client_ctx = pki.client_context(pki.clients["via_intermediate"], tls_max=ssl.TLSVersion.TLSv1_2)
    _, first = _pump(server_ctx, client_ctx)
    server, second = _pump(server_ctx, client_ctx, session=first.session)
    assert second.session_reused
    assert tls.peer_chains(server) == (None, None)  # type: ignore[arg-type]
    assert server.getpeercert(binary_form=True) == pki.clients["via_intermediate"].der  # the leaf is still known


# ---- session resumption: the server's own cache, no stateless tickets -------------------------------------------


def _connect(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
             session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSession, bool, bytes | None]:
    """One mTLS connection over 127.0.0.1, one byte each way (which also takes in TLS 1.3 tickets), closed
    cleanly.  Returns (the client's session, whether it was resumed, the client certificate the server saw)."""
    seen: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls_sock:
                seen["peer"] = tls_sock.getpeercert(binary_form=True)
                seen["reused"] = tls_sock.session_reused
                assert tls_sock.recv(1) == b"x"
                tls_sock.sendall(b"y")
                tls_sock.unwrap()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls_sock:
                tls_sock.sendall(b"x")
                assert tls_sock.recv(1) == b"y"
                got, reused = tls_sock.session, tls_sock.session_reused
                tls_sock.unwrap()
        thread.join(5)
    assert got is not None
    assert seen["reused"] == reused
    return got, reused, seen["peer"]  # type: ignore[return-value]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=lambda v: v.name)
def test_a_session_is_resumed_from_the_servers_cache(pki: Pki, version: ssl.TLSVersion) -> None:
    server_ctx = build(pki)
    client = pki.clients["good"]
    client_ctx = pki.client_context(client, tls_max=version)
    first, reused, _ = _connect(server_ctx, client_ctx)
    assert not reused
    # Stateful: the session is in the server's cache.  With stateless tickets a TLS 1.3 server caches nothing.
    assert server_ctx.session_stats()["number"] >= 1
    if version == ssl.TLSVersion.TLSv1_2:
        assert not first.has_ticket  # no NewSessionTicket: resumption by session ID
    second, reused, peer = _connect(server_ctx, client_ctx, session=first)
    assert reused
    assert peer == client.der  # the resumed session still names the verified client certificate
    assert server_ctx.session_stats()["hits"] == 1


def test_a_reloaded_context_resumes_nothing_from_the_old_one(pki: Pki) -> None:
    """A reload builds a new context, with a new, empty cache: a session made under the old client CAs or CRL is
    not resumed (the client gets a full handshake, with the certificate checked again)."""
    client_ctx = pki.client_context(pki.clients["good"], tls_max=ssl.TLSVersion.TLSv1_2)
    old, _, _ = _connect(build(pki), client_ctx)
    reloaded = build(pki)
    _, reused, peer = _connect(reloaded, client_ctx, session=old)
    assert not reused
    assert peer == pki.clients["good"].der
    assert reloaded.session_stats()["hits"] == 0


def test_the_server_session_cache_is_capped(pki: Pki) -> None:
    ctx = build(pki)
    assert openssl_session_cache_size(ctx) == 256
    assert openssl_session_cache_size(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)) == 1024 * 20  # OpenSSL's default


def test_the_cache_limit_holds_in_real_handshakes(pki: Pki) -> None:
    """(OpenSSL drops the session of a connection freed without close_notify, so the connections here close
    cleanly, as TLSTransport.close does.)"""
    from proxy import openssl

    ctx = build(pki)
    openssl.set_session_cache_size(ctx, 4)
    client_ctx = pki.client_context(pki.clients["good"], tls_max=ssl.TLSVersion.TLSv1_2)
    for _ in range(8):
        _connect(ctx, client_ctx)  # a full handshake each, a new session each, kept: both sides close cleanly
    stats = ctx.session_stats()
    assert 0 < stats["number"] <= 4  # the oldest sessions make room for new ones
    assert stats["cache_full"] >= 4
