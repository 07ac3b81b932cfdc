"""proxy.dev.devpki: the files ``mtls-proxy certs init`` writes, their modes, and that they work with real TLS.

The end of this file runs the partner smoke test from the reference pattern against the generated files:
``curl --key client.key --cert client.crt --cacert server.crt https://localhost:PORT/``.
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from proxy.dev import devpki
from proxy.dev.devpki import DevPkiError, init_dev_pki
from tests.pki import probe_handshake

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
FIXED_FILES = {
    "ca.crt", "ca.key", "server-ca.crt", "server-ca.key", "server.crt", "server.key", "client.crt", "client.key",
    "revoked.crt", "revoked.key", "crl.pem", "upstream-ca.crt", "upstream-ca.key", "upstream.crt", "upstream.key",
}  # fmt: skip
CERT_REVOKED = 23  # OpenSSL X509_V_ERR_CERT_REVOKED
CURL = "/usr/bin/curl"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated directory (with one extra client and server name) shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("devpki") / "certs"
    init_dev_pki(directory, clients=["partner-x"], server_names=["proxy.example.com", "10.0.0.7"])
    return directory


def load(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def one(path: Path) -> x509.Certificate:
    (cert,) = load(path)
    return cert


def sans(cert: x509.Certificate) -> list[object]:
    return [n.value for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# ---- what gets written -------------------------------------------------------------------------------------


def test_writes_exactly_the_documented_files(tmp_path: Path) -> None:
    written = init_dev_pki(tmp_path / "new" / "certs", clients=["alice", "Bob.2"])
    extra = {"alice.crt", "alice.key", "Bob.2.crt", "Bob.2.key"}
    assert {p.name for p in written} == FIXED_FILES | extra
    assert len(written) == len(FIXED_FILES | extra)
    assert {p.name for p in (tmp_path / "new" / "certs").iterdir()} == FIXED_FILES | extra  # no temp files left


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_keys_are_0600_and_certs_0644_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        written = init_dev_pki(tmp_path)
    finally:
        os.umask(old)
    for path in written:
        expected = 0o600 if path.suffix == ".key" else 0o644
        assert path.stat().st_mode & 0o777 == expected, path.name
        assert path.is_file() and not path.is_symlink()


def test_key_files_are_0600_from_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permissions are checked when a file is opened: a key file created 0644 and chmod-ed later could be opened
    # by another user in between and read once the key is written.  A spy on os.open records the mode of every
    # file right after it is created (umask 0, so nothing masks a wrong mode).
    created: dict[str, int] = {}
    real_open = os.open

    def spy(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kwargs: object) -> int:
        fd = real_open(path, flags, mode, **kwargs)  # type: ignore[arg-type]
        if flags & os.O_CREAT:
            created[Path(path).name] = os.fstat(fd).st_mode & 0o777
        return fd

    old = os.umask(0)
    try:
        monkeypatch.setattr(os, "open", spy)
        init_dev_pki(tmp_path)
    finally:
        monkeypatch.undo()
        os.umask(old)
    key_files = {name: mode for name, mode in created.items() if ".key." in name}
    assert len(key_files) == 7
    assert set(key_files.values()) == {0o600}


def test_keys_are_unencrypted_pkcs8_p256(certs: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    for key_path in certs.glob("*.key"):
        text = key_path.read_bytes()
        assert text.startswith(b"-----BEGIN PRIVATE KEY-----\n"), key_path.name  # PKCS8, not "EC PRIVATE KEY"
        key = load_pem_private_key(text, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        cert = load(key_path.with_suffix(".crt"))[0]
        assert cert.public_key() == key.public_key(), key_path.name


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "crl.pem").write_text("keep me")
    with pytest.raises(DevPkiError, match=r"crl\.pem exists; use --force to overwrite"):
        init_dev_pki(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["crl.pem"]
    assert (tmp_path / "crl.pem").read_text() == "keep me"


def test_refusal_names_the_first_existing_file_and_counts_the_rest(tmp_path: Path) -> None:
    init_dev_pki(tmp_path)
    with pytest.raises(DevPkiError) as info:
        init_dev_pki(tmp_path)
    assert str(info.value) == f"{tmp_path / 'ca.crt'} exists (and 14 more); use --force to overwrite"
    assert "\n" not in str(info.value)


def test_a_dangling_symlink_counts_as_existing(tmp_path: Path) -> None:
    (tmp_path / "server.key").symlink_to(tmp_path / "nowhere")
    with pytest.raises(DevPkiError, match="server.key exists"):
        init_dev_pki(tmp_path)


def test_force_overwrites_everything(tmp_path: Path) -> None:
    init_dev_pki(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    init_dev_pki(tmp_path, force=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before.keys() == after.keys() == FIXED_FILES
    assert all(before[name] != after[name] for name in before)


def test_force_replaces_a_symlink_instead_of_writing_through_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not a key")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "server.key").symlink_to(outside)
    init_dev_pki(certs, force=True)
    assert outside.read_text() == "not a key"
    assert not (certs / "server.key").is_symlink()
    assert (certs / "server.key").stat().st_mode & 0o777 == 0o600


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = []

    def failing(fd: int, data: bytes) -> int:
        calls.append(fd)
        if len(calls) == 4:  # the fourth file, server-ca.key
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing)
    with pytest.raises(DevPkiError, match="No space left on device"):
        init_dev_pki(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.crt", "ca.key", "server-ca.crt"]


def test_a_file_appearing_after_the_check_is_not_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "client.key").write_text("someone else's key")
    monkeypatch.setattr(os.path, "lexists", lambda path: False)  # the check runs before the file "appears"
    with pytest.raises(DevPkiError, match=r"client\.key exists; use --force to overwrite"):
        init_dev_pki(tmp_path)
    assert (tmp_path / "client.key").read_text() == "someone else's key"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_works_on_a_file_system_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    written = init_dev_pki(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in written} == FIXED_FILES
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600


def test_directory_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "certs").write_text("")
    with pytest.raises(DevPkiError, match="not a directory"):
        init_dev_pki(tmp_path / "certs")


def test_naive_now_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DevPkiError, match="timezone-aware"):
        init_dev_pki(tmp_path, now=dt.datetime(2030, 1, 1))


# ---- names ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "alice", "Bob_2.x-y", "9lives", "a" * 63, "partner.example"])
def test_valid_client_names(tmp_path: Path, name: str) -> None:
    written = init_dev_pki(tmp_path, clients=[name])
    leaf = one(tmp_path / f"{name}.crt")
    assert tmp_path / f"{name}.key" in written
    assert cn(leaf) == name
    assert sans(leaf) == [f"{name}.dev.test", f"spiffe://dev.test/{name}"]
    assert ekus(leaf) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize(
    "names",
    [
        [""], ["-a"], [".a"], ["_a"], ["a/b"], ["../x"], ["a b"], ["ü"], ["a" * 64], ["a..b"], ["a."], ["a\n"],
        ["ca"], ["CA"], ["server"], ["server-ca"], ["revoked"], ["crl"], ["upstream"], ["Upstream-CA"], ["client"],
        ["x", "X"],
    ],
)  # fmt: skip
def test_invalid_client_names_are_refused_before_writing(tmp_path: Path, names: list[str]) -> None:
    with pytest.raises(DevPkiError) as info:
        init_dev_pki(tmp_path, clients=names)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("name", "san"),
    [
        ("proxy.example.com", x509.DNSName("proxy.example.com")),
        ("Proxy.Example.COM", x509.DNSName("proxy.example.com")),
        ("*.example.com", x509.DNSName("*.example.com")),
        ("vpce-0abc-123.vpce-svc-0def.eu-west-1.vpce.amazonaws.com",
         x509.DNSName("vpce-0abc-123.vpce-svc-0def.eu-west-1.vpce.amazonaws.com")),
        ("10.1.2.3", x509.IPAddress(ipaddress.ip_address("10.1.2.3"))),
        ("2001:db8::1", x509.IPAddress(ipaddress.ip_address("2001:db8::1"))),
    ],
)  # fmt: skip
def test_server_names_become_dns_or_ip_sans(tmp_path: Path, name: str, san: x509.GeneralName) -> None:
    init_dev_pki(tmp_path, server_names=[name, "localhost", "127.0.0.1"])
    leaf = load(tmp_path / "server.crt")[0]
    names = list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    assert names == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
        san,
    ]


@pytest.mark.parametrize(
    "name", ["", "bad_name", "exa mple.com", "*.com", "a.*.com", "-a.com", "a-.com", "ünï.com", "fe80::1%eth0",
             "a..com", "x" * 64 + ".com", "http://a.com"],
)  # fmt: skip
def test_invalid_server_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(DevPkiError, match="invalid server name"):
        init_dev_pki(tmp_path, server_names=[name])
    assert list(tmp_path.iterdir()) == []


# ---- certificate contents --------------------------------------------------------------------------------------


def test_server_crt_is_leaf_then_server_ca(certs: Path) -> None:
    leaf, ca = load(certs / "server.crt")
    assert ca == one(certs / "server-ca.crt")
    leaf.verify_directly_issued_by(ca)
    assert sans(leaf) == [
        "localhost",
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        "proxy.example.com",
        ipaddress.ip_address("10.0.0.7"),
    ]
    assert ekus(leaf) == [ExtendedKeyUsageOID.SERVER_AUTH]


@pytest.mark.parametrize(
    ("stem", "common_name"),
    [
        ("ca", "mtls-proxy dev client CA"),
        ("server-ca", "mtls-proxy dev server CA"),
        ("upstream-ca", "mtls-proxy dev upstream CA"),
    ],
)
def test_cas_are_separate_pathlen_zero_signing_only(certs: Path, stem: str, common_name: str) -> None:
    ca = one(certs / f"{stem}.crt")
    assert cn(ca) == common_name
    assert ca.issuer == ca.subject
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    others = {"ca", "server-ca", "upstream-ca"} - {stem}
    assert all(one(certs / f"{o}.crt").public_key() != ca.public_key() for o in others)


def test_validity_periods(tmp_path: Path) -> None:
    init_dev_pki(tmp_path, now=NOW)
    ca, leaf = one(tmp_path / "ca.crt"), one(tmp_path / "client.crt")
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    hour = dt.timedelta(hours=1)
    assert ca.not_valid_before_utc == leaf.not_valid_before_utc == NOW - hour
    assert ca.not_valid_after_utc == NOW + dt.timedelta(days=5 * 365)
    assert leaf.not_valid_after_utc == NOW + dt.timedelta(days=365)
    assert crl.next_update_utc == NOW + dt.timedelta(days=30)


@pytest.mark.parametrize(
    ("stem", "common_name", "san"),
    [
        ("client", "client", ["client.dev.test", "spiffe://dev.test/client"]),
        ("partner-x", "partner-x", ["partner-x.dev.test", "spiffe://dev.test/partner-x"]),
        ("revoked", "revoked", ["revoked.dev.test", "spiffe://dev.test/revoked"]),
    ],
)
def test_client_certs_verify_against_ca_for_client_auth(certs: Path, stem: str, common_name: str, san: list) -> None:
    leaf = one(certs / f"{stem}.crt")
    assert cn(leaf) == common_name
    assert sans(leaf) == san
    assert ekus(leaf) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # cryptography's RFC 5280 path validation with the client-auth policy (checks EKU and the CA chain).
    ca = one(certs / "ca.crt")
    verifier = PolicyBuilder().store(Store([ca])).time(leaf.not_valid_before_utc).build_client_verifier()
    assert verifier.verify(leaf, []).chain == [leaf, ca]


def test_client_cert_does_not_verify_against_the_server_ca(certs: Path) -> None:
    leaf = one(certs / "client.crt")
    verifier = PolicyBuilder().store(Store([one(certs / "server-ca.crt")])).build_client_verifier()
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(leaf, [])


def test_crl_revokes_revoked_and_is_signed_by_the_client_ca(certs: Path) -> None:
    ca = one(certs / "ca.crt")
    crl = x509.load_pem_x509_crl((certs / "crl.pem").read_bytes())
    assert crl.issuer == ca.subject
    assert crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in crl] == [one(certs / "revoked.crt").serial_number]
    assert crl.get_revoked_certificate_by_serial_number(one(certs / "client.crt").serial_number) is None
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1


def test_upstream_cert_is_for_the_demo_upstream(certs: Path) -> None:
    leaf = one(certs / "upstream.crt")
    leaf.verify_directly_issued_by(one(certs / "upstream-ca.crt"))
    assert sans(leaf) == ["localhost", ipaddress.ip_address("127.0.0.1"), devpki.DEMO_UPSTREAM_HOST]
    assert ekus(leaf) == [ExtendedKeyUsageOID.SERVER_AUTH]
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs / "upstream.crt", certs / "upstream.key")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=certs / "upstream-ca.crt")
    assert probe_handshake(server, client, devpki.DEMO_UPSTREAM_HOST).server_ok


# ---- real TLS with the generated files -------------------------------------------------------------------------


def proxy_like_context(certs: Path) -> ssl.SSLContext:
    """What the proxy builds from the dev files: server.crt/key, client CA ca.crt, crl.pem, leaf CRL check."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=certs / "ca.crt")
    ctx.load_verify_locations(cafile=certs / "crl.pem")
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    return ctx


def smoke_client_context(certs: Path, stem: str) -> ssl.SSLContext:
    """Like curl --cacert server.crt: trust whatever server.crt contains."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=certs / "server.crt")
    ctx.load_cert_chain(certs / f"{stem}.crt", certs / f"{stem}.key")
    return ctx


@pytest.mark.parametrize(("stem", "code"), [("client", None), ("partner-x", None), ("revoked", CERT_REVOKED)])
def test_handshake_with_generated_files(certs: Path, stem: str, code: int | None) -> None:
    result = probe_handshake(proxy_like_context(certs), smoke_client_context(certs, stem))
    assert result.server_ok is (code is None)
    assert result.server_verify_code == code, result


def serve_https_once(ctx: ssl.SSLContext, listener: socket.socket, outcome: dict[str, object]) -> None:
    listener.settimeout(10)
    try:
        conn, _ = listener.accept()
    except OSError as exc:
        outcome["error"] = repr(exc)
        return
    with conn:
        conn.settimeout(10)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                outcome["request"] = request
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nOK\n")
        except ssl.SSLCertVerificationError as exc:
            outcome["verify_code"] = exc.verify_code
        except (ssl.SSLError, OSError) as exc:
            outcome["error"] = repr(exc)


@pytest.mark.skipif(not os.access(CURL, os.X_OK), reason="needs /usr/bin/curl")
@pytest.mark.parametrize(("stem", "code"), [("client", None), ("revoked", CERT_REVOKED)])
def test_partner_curl_smoke_test(certs: Path, stem: str, code: int | None) -> None:
    outcome: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        thread = threading.Thread(target=serve_https_once, args=(proxy_like_context(certs), listener, outcome))
        thread.start()
        proc = subprocess.run(
            [CURL, "-sS", "--max-time", "10", "--key", f"{stem}.key", "--cert", f"{stem}.crt",
             "--cacert", "server.crt", f"https://localhost:{port}/"],
            cwd=certs, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        thread.join(10)
    if code is None:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "OK\n"
        assert str(outcome.get("request", b"")).startswith("b'GET / HTTP/1.1")
    else:
        assert proc.returncode != 0
        assert outcome.get("verify_code") == code, outcome
