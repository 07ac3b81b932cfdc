"""Hostile client certificates, issued by a CA of their own that the proxy under attack trusts.

Owns: a small ECDSA CA (``HostileCA``) and the certificate shapes a hostile partner could present through a real
handshake: a chain of N real intermediates, a leaf followed by unrelated junk certificates, a leaf carrying an
unknown extension of any size, a leaf with thousands of SANs, and leaves whose subject uses an odd or invalid
string encoding.  Encodings the ``cryptography`` builder refuses (invalid UTF-8, an odd-length BMPString, a CN that
is not a string at all) are made by same-length byte surgery on the to-be-signed bytes, then *re-signed* by the CA,
so OpenSSL's chain verification still passes and the bytes reach the proxy's identity parser.

Must not: touch the session PKI (tests/pki.py) or anything outside the directory it is given.
"""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

PEM = serialization.Encoding.PEM
DER = serialization.Encoding.DER
PLACEHOLDER = "PLACEHOLDER-CN-VALUE-0123456789"  # 31 bytes, unique in the TBS, replaced byte for byte
BIG_EXTENSION_OID = ObjectIdentifier("1.3.6.1.4.1.55555.1.1")  # a private arc: unknown to everyone, non-critical


@dataclass(frozen=True, slots=True)
class Credential:
    """Files a TLS client loads: ``cert`` holds the leaf then whatever else the client sends."""

    name: str
    cert: Path
    key: Path
    leaf_der: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hostile partner"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _tlv(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _pem(der: bytes) -> bytes:
    """PEM armour by hand: ``cryptography`` would refuse to re-encode the deliberately broken ones."""
    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


def _tlv_end(der: bytes, offset: int) -> int:
    """Index just past the DER element starting at ``offset`` (definite lengths only, X.690 8.1.3)."""
    first = der[offset + 1]
    if first < 0x80:
        return offset + 2 + first
    n = first & 0x7F
    return offset + 2 + n + int.from_bytes(der[offset + 2:offset + 2 + n], "big")


class HostileCA:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.now = dt.datetime.now(dt.timezone.utc)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._ca(_name("hostile root CA"), self.key, self.key.public_key(), _name("hostile root CA"))
        self.root_pem = self.dir / "hostile-root.crt"
        self.root_pem.write_bytes(self.cert.public_bytes(PEM))

    # -- building blocks -------------------------------------------------------------------------------------------
    def _builder(self, subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey
                 ) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                .serial_number((secrets.randbelow(7) + 1) << 150 | secrets.randbits(150))
                .not_valid_before(self.now - dt.timedelta(days=1))
                .not_valid_after(self.now + dt.timedelta(days=30)))

    def _ca(self, subject: x509.Name, signer: ec.EllipticCurvePrivateKey, public: ec.EllipticCurvePublicKey,
            issuer: x509.Name) -> x509.Certificate:
        return (self._builder(subject, issuer, public)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
                .sign(signer, hashes.SHA256()))

    def _leaf(self, subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate,
              signer: ec.EllipticCurvePrivateKey, sans: list[x509.GeneralName] | None = None,
              extra: tuple[x509.ExtensionType, ...] = ()) -> x509.Certificate:
        builder = (self._builder(subject, issuer.subject, key.public_key())
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       issuer.public_key()), critical=False))  # type: ignore[arg-type]
        if sans is None:
            sans = [x509.DNSName("hostile.partner.test")]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        for ext in extra:
            builder = builder.add_extension(ext, critical=False)
        with warnings.catch_warnings():  # over-long attributes warn; hostile partners send them anyway
            warnings.simplefilter("ignore", UserWarning)
            return builder.sign(signer, hashes.SHA256())

    def _write(self, name: str, certs: list[bytes], key: ec.EllipticCurvePrivateKey) -> Credential:
        """``certs`` are DER, leaf first."""
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(b"".join(_pem(d) for d in certs))
        key_path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return Credential(name, cert_path, key_path, certs[0])

    def _resign(self, cert: x509.Certificate, old: bytes, new: bytes) -> bytes:
        """The certificate with ``old`` replaced by ``new`` (same length) in its TBS, signed again by this CA."""
        assert len(old) == len(new)
        tbs = cert.tbs_certificate_bytes
        assert tbs.count(old) == 1, old
        tbs = tbs.replace(old, new)
        der = cert.public_bytes(DER)
        tbs_at = der.index(cert.tbs_certificate_bytes)
        alg_at = tbs_at + len(cert.tbs_certificate_bytes)
        alg = der[alg_at:_tlv_end(der, alg_at)]  # ecdsa-with-SHA256, as the builder wrote it
        signature = self.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
        return _tlv(0x30, tbs + alg + _tlv(0x03, b"\x00" + signature))

    # -- the shapes ------------------------------------------------------------------------------------------------
    def chain(self, name: str, intermediates: int) -> Credential:
        """leaf <- i_n <- ... <- i_1 <- root: the client sends the leaf and every intermediate."""
        issuer, signer, sent = self.cert, self.key, []
        for i in range(intermediates):
            key = ec.generate_private_key(ec.SECP256R1())
            ca = self._ca(_name(f"hostile intermediate {i + 1}"), signer, key.public_key(), issuer.subject)
            sent.append(ca.public_bytes(DER))
            issuer, signer = ca, key
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._leaf(_name(f"hostile-{name}"), key, issuer, signer)
        return self._write(name, [leaf.public_bytes(DER), *reversed(sent)], key)

    def with_junk(self, name: str, junk: int) -> Credential:
        """A leaf issued by the root, followed by ``junk`` unrelated self-signed certificates."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._leaf(_name(f"hostile-{name}"), key, self.cert, self.key)
        extras = []
        for i in range(junk):
            k = ec.generate_private_key(ec.SECP256R1())
            extras.append(self._ca(_name(f"junk {i}"), k, k.public_key(), _name(f"junk {i}")).public_bytes(DER))
        return self._write(name, [leaf.public_bytes(DER), *extras], key)

    def big_extension(self, name: str, size: int) -> Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        ext = x509.UnrecognizedExtension(BIG_EXTENSION_OID, _tlv(0x04, b"\xa5" * size))
        leaf = self._leaf(_name(f"hostile-{name}"), key, self.cert, self.key, extra=(ext,))
        return self._write(name, [leaf.public_bytes(DER)], key)

    def many_sans(self, name: str, count: int) -> Credential:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(f"h{i}.partner.test") for i in range(count)]
        leaf = self._leaf(_name(f"hostile-{name}"), key, self.cert, self.key, sans=sans)
        return self._write(name, [leaf.public_bytes(DER)], key)

    def subject(self, name: str, attributes: list[x509.NameAttribute]) -> Credential:
        """A leaf with exactly this subject (built without the builder's length checks)."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._leaf(x509.Name(attributes), key, self.cert, self.key)
        return self._write(name, [leaf.public_bytes(DER)], key)

    def raw_cn(self, name: str, tag: int, value: bytes) -> Credential:
        """A leaf whose CN is the DER string ``tag`` holding ``value`` (len(value) == len(PLACEHOLDER))."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._leaf(_name(PLACEHOLDER), key, self.cert, self.key)
        placeholder = bytes([0x0C, len(PLACEHOLDER)]) + PLACEHOLDER.encode()
        der = self._resign(leaf, placeholder, bytes([tag, len(value)]) + value)
        return self._write(name, [der], key)


def attribute(oid: ObjectIdentifier, value: str, asn1_type: _ASN1Type | None = None) -> x509.NameAttribute:
    with warnings.catch_warnings():  # _validate=False still warns about out-of-bounds lengths
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(oid, value, asn1_type, _validate=False)
