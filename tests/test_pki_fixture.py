"""The test-suite PKI (tests/pki.py) behaves as the other tests assume, checked against real OpenSSL.

A loopback TLS server (CERT_REQUIRED, ``pki.client_ca``, ``pki.crl_bundle``, VERIFY_CRL_CHECK_LEAF and
VERIFY_X509_STRICT) must accept every good client and reject each bad class with the verify code OpenSSL reports
on the server side.  Python's ssl has no set_verify_depth, so ``too_deep`` is checked with ``openssl verify``.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.pki import WEIRD_CN, WEIRD_DNS, WEIRD_O, WEIRD_URI, Pki, probe_handshake

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h)
UNABLE_TO_GET_CRL = 3
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
CRL_HAS_EXPIRED = 12
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
CERT_CHAIN_TOO_LONG = 22
CERT_REVOKED = 23
INVALID_PURPOSE = 26
HOSTNAME_MISMATCH = 62
DEPTH_ZERO_SELF_SIGNED_CERT = 18

DER, PEM = Encoding.DER, Encoding.PEM

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
ACCEPTED = ["good", "renewed", "rsa", "other", "via_intermediate", "self_signed", "weird", "too_deep"]
REJECTED = {
    "expired": CERT_HAS_EXPIRED,
    "not_yet_valid": CERT_NOT_YET_VALID,
    "revoked": CERT_REVOKED,
    "other_ca_same_cn": UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    "no_client_auth": INVALID_PURPOSE,
}


def server_context(pki: Pki, *crls: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=client_ca or pki.client_ca)
    for crl in crls:
        ctx.load_verify_locations(cafile=crl)
    if crls:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def test_every_named_client_exists(pki: Pki) -> None:
    assert set(pki.clients) == set(ACCEPTED) | set(REJECTED)


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize("name", ACCEPTED)
def test_server_accepts(pki: Pki, name: str, version: ssl.TLSVersion) -> None:
    client = pki.clients[name]
    result = probe_handshake(server_context(pki, pki.crl_bundle), pki.client_context(client, tls_max=version))
    assert result.server_ok, result
    assert result.peer_cert_der == client.der
    assert result.version == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=lambda v: v.name)
@pytest.mark.parametrize(("name", "code"), REJECTED.items())
def test_server_rejects_with_openssl_code(pki: Pki, name: str, code: int, version: ssl.TLSVersion) -> None:
    client = pki.clients[name]
    result = probe_handshake(server_context(pki, pki.crl_bundle), pki.client_context(client, tls_max=version))
    assert not result.server_ok
    assert result.server_verify_code == code, result


def test_server_rejects_missing_client_certificate(pki: Pki) -> None:
    result = probe_handshake(server_context(pki, pki.crl_bundle), pki.client_context(None))
    assert not result.server_ok
    assert result.server_verify_code is None
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in (result.server_error or "")


def test_expired_crl_rejects_even_good_clients(pki: Pki) -> None:
    result = probe_handshake(server_context(pki, pki.crl_expired), pki.client_context(pki.clients["good"]))
    assert result.server_verify_code == CRL_HAS_EXPIRED


@pytest.mark.parametrize("name", ["via_intermediate", "self_signed"])
def test_crl_check_leaf_needs_a_crl_from_the_leafs_own_issuer(pki: Pki, name: str) -> None:
    # Only the main CA's CRL: the intermediate's clients and a self-signed anchor have no CRL -> code 3.
    # This is why crl_bundle carries crl_intermediate and crl_self_signed.
    result = probe_handshake(server_context(pki, pki.crl), pki.client_context(pki.clients[name]))
    assert result.server_verify_code == UNABLE_TO_GET_CRL


def test_without_crl_check_revoked_client_is_accepted(pki: Pki) -> None:
    # The control for the revoked row above: it is the CRL, not the certificate, that refuses it.
    result = probe_handshake(server_context(pki), pki.client_context(pki.clients["revoked"]))
    assert result.server_ok


def test_client_ca_only_does_not_trust_the_self_signed_client(pki: Pki) -> None:
    ctx = server_context(pki, client_ca=pki.client_ca_only)
    result = probe_handshake(ctx, pki.client_context(pki.clients["self_signed"]))
    assert result.server_verify_code == DEPTH_ZERO_SELF_SIGNED_CERT


def test_client_ca_bundle_is_main_ca_plus_self_signed(pki: Pki) -> None:
    bundle = x509.load_pem_x509_certificates(pki.client_ca.read_bytes())
    (main,) = x509.load_pem_x509_certificates(pki.client_ca_only.read_bytes())
    assert bundle == [main, pki.clients["self_signed"].leaf]


def test_write_crl_revokes_a_good_client(pki: Pki, tmp_path: Path) -> None:
    crl = pki.write_crl(tmp_path / "crl.pem", [pki.clients["good"]])
    result = probe_handshake(server_context(pki, crl), pki.client_context(pki.clients["good"]))
    assert result.server_verify_code == CERT_REVOKED
    expired = pki.write_crl(tmp_path / "old.pem", expired=True)
    result = probe_handshake(server_context(pki, expired), pki.client_context(pki.clients["good"]))
    assert result.server_verify_code == CRL_HAS_EXPIRED
    with pytest.raises(ValueError):
        pki.write_crl(tmp_path / "x.pem", [pki.clients["other_ca_same_cn"]])


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1", "::1"])
def test_server_cert_chain_verifies_for_loopback_names(pki: Pki, hostname: str) -> None:
    leaf, intermediate = x509.load_pem_x509_certificates(pki.server_cert.read_bytes())
    (root,) = x509.load_pem_x509_certificates(pki.server_ca.read_bytes())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    result = probe_handshake(server_context(pki), pki.client_context(pki.clients["good"]), hostname)
    assert result.server_ok and result.client_error is None


@pytest.mark.parametrize(
    ("which", "hostname", "client_code"),
    [
        ("good", "api.test", None),
        ("good", "localhost", None),
        ("good", "127.0.0.1", None),
        ("wrong_name", "api.test", HOSTNAME_MISMATCH),
        ("untrusted", "api.test", UNABLE_TO_GET_ISSUER_CERT_LOCALLY),
    ],
)
def test_upstream_server_context(pki: Pki, which: str, hostname: str, client_code: int | None) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=pki.upstream_ca)
    result = probe_handshake(pki.upstream_server_context(which), client, hostname)  # type: ignore[arg-type]
    assert result.client_verify_code == client_code, result
    assert result.server_ok is (client_code is None)


def test_wrong_name_upstream_is_otherwise_valid(pki: Pki) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=pki.upstream_ca)
    result = probe_handshake(pki.upstream_server_context("wrong_name"), client, "other.test")
    assert result.server_ok


@pytest.mark.parametrize(("depth", "ok"), [(2, False), (3, True)])
def test_too_deep_exceeds_verify_depth_two(pki: Pki, tmp_path: Path, depth: int, ok: bool) -> None:
    client = pki.clients["too_deep"]
    chain = x509.load_pem_x509_certificates(client.cert.read_bytes())
    (root,) = x509.load_pem_x509_certificates(pki.client_ca_only.read_bytes())
    assert len(chain) == 4 and chain[0].public_bytes(DER) == client.der
    for child, parent in zip(chain, [*chain[1:], root]):
        child.verify_directly_issued_by(parent)
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(chain[0].public_bytes(PEM))
    cmd = ["openssl", "verify", "-purpose", "sslclient", "-verify_depth", str(depth)]
    cmd += ["-CAfile", str(pki.client_ca_only), "-untrusted", str(client.cert), str(leaf)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    if not ok:
        assert f"error {CERT_CHAIN_TOO_LONG} at" in proc.stdout + proc.stderr


def test_via_intermediate_sends_leaf_and_intermediate(pki: Pki) -> None:
    leaf, intermediate = x509.load_pem_x509_certificates(pki.clients["via_intermediate"].cert.read_bytes())
    (root,) = x509.load_pem_x509_certificates(pki.client_ca_only.read_bytes())
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)


@pytest.mark.parametrize("name", ACCEPTED + list(REJECTED))
def test_client_cert_values_describe_the_leaf(pki: Pki, name: str) -> None:
    client = pki.clients[name]
    leaf = x509.load_pem_x509_certificates(client.cert.read_bytes())[0]
    assert client.name == name
    assert client.der == leaf.public_bytes(DER) == client.leaf.public_bytes(DER)
    assert client.fingerprint == hashlib.sha256(client.der).hexdigest()
    assert client.serial_hex == format(leaf.serial_number, "X") and len(client.serial_hex) == 40
    assert client.subject == leaf.subject.rfc4514_string()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(client.pem)  # one file: chain + matching key
    assert client.pem.read_bytes().startswith(client.cert.read_bytes())
    assert client.key.stat().st_mode & 0o777 == 0o600


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in san]


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.mark.parametrize(
    ("name", "cn", "sans"),
    [
        ("good", "client-a", ["client-a.partner.test", "spiffe://partner-a/orders"]),
        ("rsa", "client-rsa", ["client-rsa.partner.test"]),
        ("other", "client-b", ["client-b.partner.test"]),
        ("expired", "client-a", ["client-a.partner.test", "spiffe://partner-a/orders"]),
        ("other_ca_same_cn", "client-a", ["client-a.partner.test", "spiffe://partner-a/orders"]),
        ("revoked", "revoked", ["revoked.partner.test"]),
        ("self_signed", "partner-selfsigned", ["partner-selfsigned.partner.test"]),
        ("weird", WEIRD_CN, [WEIRD_DNS, WEIRD_URI]),
    ],
)
def test_client_identities(pki: Pki, name: str, cn: str, sans: list[str]) -> None:
    leaf = pki.clients[name].leaf
    assert _cn(leaf) == cn
    assert _sans(leaf) == sans


def test_key_types_and_ekus(pki: Pki) -> None:
    assert isinstance(pki.clients["good"].leaf.public_key(), ec.EllipticCurvePublicKey)
    rsa_key = pki.clients["rsa"].leaf.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size == 2048
    assert _eku(pki.clients["good"].leaf) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _eku(pki.clients["no_client_auth"].leaf) == [ExtendedKeyUsageOID.SERVER_AUTH]
    weird = pki.clients["weird"].leaf
    assert weird.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == WEIRD_O
    selfsigned = pki.clients["self_signed"].leaf
    assert selfsigned.issuer == selfsigned.subject
    assert selfsigned.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert pki.clients["other_ca_same_cn"].leaf.issuer != pki.clients["good"].leaf.issuer


def test_crl_files(pki: Pki) -> None:
    (main,) = x509.load_pem_x509_certificates(pki.client_ca_only.read_bytes())
    crl = x509.load_pem_x509_crl(pki.crl.read_bytes())
    assert crl.is_signature_valid(main.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in crl] == [pki.clients["revoked"].leaf.serial_number]
    expired = x509.load_pem_x509_crl(pki.crl_expired.read_bytes())
    assert expired.is_signature_valid(main.public_key())  # type: ignore[arg-type]
    assert len(expired) == 0
    now = datetime.datetime.now(datetime.timezone.utc)
    assert expired.next_update_utc is not None and crl.next_update_utc is not None
    assert expired.next_update_utc < now < crl.next_update_utc
