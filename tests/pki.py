"""The PKI the whole test suite uses, built once per session (fixture ``pki`` in tests/conftest.py).

Owns: every certificate, key and CRL the tests need, written as files into one directory, plus two context
factories and a loopback handshake probe that reports what OpenSSL decided on each side.  ``trustme`` makes the
CAs and the server certificates; client certificates are issued with ``cryptography`` directly because trustme
cannot set URI SANs, a clientAuth-only EKU or arbitrary subjects.

Trust layout (three independent CAs, like production):
    client CA ("main")  -> good, renewed, rsa, other, expired, not_yet_valid, revoked, no_client_auth, weird
                        -> intermediate -> via_intermediate
                        -> i1 -> i2 -> i3 -> too_deep          (3 intermediates: beyond verify_depth 2)
    self_signed         its own anchor, appended to ``client_ca`` (the reference NGINX sample's pattern)
    other client CA     -> other_ca_same_cn                    (not trusted by the proxy)
    server CA -> server intermediate -> server leaf            (``server_cert`` = leaf + intermediate)
    upstream CA -> upstream leaf, wrong-name leaf;  untrusted upstream CA -> untrusted leaf

Every client serial has exactly 40 hex digits, so ``serial_hex`` reads the same whether a formatter pads to
whole bytes (OpenSSL, NGINX) or not (``format(n, "X")``).

Must not: touch anything outside its directory, or hold state shared between two ``Pki`` values.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import socket
import ssl
import threading
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM
ORG = "mtls-proxy tests"
WEIRD_CN = '"quoted", comma; semicolon=\r\nü漢'
WEIRD_O = "Weird+Org, Inc."
WEIRD_DNS = 'weird"dns,;=.partner.test'
WEIRD_URI = 'spiffe://partner-w/p?q="x",y;z=1'

UpstreamKind = Literal["good", "wrong_name", "untrusted"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class ClientCert:
    name: str
    cert: Path  # leaf + the intermediates the client sends
    key: Path
    pem: Path  # cert chain + key in one file (ab -E, curl --cert FILE)
    der: bytes  # leaf only
    fingerprint: str  # lowercase hex SHA-256 of ``der``
    serial_hex: str  # uppercase hex, 40 digits
    subject: str  # RFC 4514 string of the leaf subject, as cryptography renders it
    leaf: x509.Certificate


@dataclass(frozen=True, slots=True)
class _Authority:
    """A CA as ``cryptography`` objects, with the chain a leaf it issues must send (nearest first)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @classmethod
    def of(cls, ca: trustme.CA) -> _Authority:
        chain: list[x509.Certificate] = []
        parent = ca.parent_cert
        while parent is not None and parent.parent_cert is not None:  # stop before the root: clients omit it
            chain.append(x509.load_pem_x509_certificate(parent.cert_pem.bytes()))
            parent = parent.parent_cert
        cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise TypeError(f"unexpected CA key type {type(key).__name__}")
        own = (cert,) if ca.parent_cert is not None else ()
        return cls(cert, key, own + tuple(chain))


@dataclass(frozen=True, slots=True)
class Pki:
    dir: Path
    client_ca: Path  # main client CA + self_signed client cert: what server.client_ca points at
    client_ca_only: Path
    other_client_ca: Path  # the CA of other_ca_same_cn (trust it to test CA reload)
    server_cert: Path  # leaf + intermediate
    server_key: Path
    server_ca: Path
    upstream_ca: Path
    upstream_cert: Path
    upstream_key: Path
    upstream_wrong_name_cert: Path
    upstream_wrong_name_key: Path
    upstream_untrusted_cert: Path
    upstream_untrusted_key: Path
    crl: Path  # main CA, revokes "revoked"
    crl_expired: Path  # main CA, next_update in the past, revokes nothing
    crl_intermediate: Path  # via_intermediate's issuer, revokes nothing
    crl_self_signed: Path  # signed by self_signed's own key, revokes nothing
    crl_bundle: Path  # every CRL a CRL_CHECK_LEAF server needs to accept all good clients
    clients: Mapping[str, ClientCert]
    _main: _Authority = field(repr=False)

    @classmethod
    def build(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.timezone.utc)
        main_ca = trustme.CA(organization_name=ORG, organization_unit_name="client CA")
        other_ca = trustme.CA(organization_name=ORG, organization_unit_name="other client CA")
        intermediate = main_ca.create_child_ca()
        deep = [main_ca.create_child_ca()]
        for _ in range(2):
            deep.append(deep[-1].create_child_ca())
        main, inter, deepest = _Authority.of(main_ca), _Authority.of(intermediate), _Authority.of(deep[-1])
        out = _Out(directory)

        client_a = _sans("client-a.partner.test", "spiffe://partner-a/orders")
        week, day = dt.timedelta(days=7), dt.timedelta(days=1)
        specs: list[tuple[str, _Authority, x509.Name, list[x509.GeneralName], dict[str, object]]] = [
            ("good", main, _subject("client-a"), client_a, {}),
            # the same partner's next certificate, valid longer (rotation; certificate lifecycle tests)
            ("renewed", main, _subject("client-a"), client_a, {"not_after": now + 90 * day}),
            ("rsa", main, _subject("client-rsa"), _sans("client-rsa.partner.test"), {"use_rsa": True}),
            ("other", main, _subject("client-b"), _sans("client-b.partner.test"), {}),
            ("expired", main, _subject("client-a"), client_a, {"not_before": now - week, "not_after": now - day}),
            ("not_yet_valid", main, _subject("client-a"), client_a, {"not_before": now + day}),
            ("revoked", main, _subject("revoked"), _sans("revoked.partner.test"), {}),
            ("no_client_auth", main, _subject("client-a"), client_a, {"eku": ExtendedKeyUsageOID.SERVER_AUTH}),
            ("other_ca_same_cn", _Authority.of(other_ca), _subject("client-a"), client_a, {}),
            ("via_intermediate", inter, _subject("client-c"), _sans("client-c.partner.test"), {}),
            ("too_deep", deepest, _subject("client-deep"), _sans("client-deep.partner.test"), {}),
            ("weird", main, _subject(WEIRD_CN, WEIRD_O), _sans(WEIRD_DNS, WEIRD_URI), {}),
        ]
        issued: dict[str, tuple[x509.Certificate, PrivateKey, tuple[x509.Certificate, ...]]] = {}
        for name, issuer, subject, sans, opts in specs:
            cert, key = _issue(issuer, subject, sans, now, **opts)  # type: ignore[arg-type]
            issued[name] = (cert, key, issuer.chain)
        self_signed_cert, self_signed_key = _self_signed(now)
        issued["self_signed"] = (self_signed_cert, self_signed_key, ())
        clients = {name: out.client(name, *parts) for name, parts in issued.items()}

        crl = _crl(main, [issued["revoked"][0]], now - day, now + week, number=2)
        crl_expired = _crl(main, [], now - week, now - day, number=1)
        crl_intermediate = _crl(inter, [], now - day, now + week)
        self_anchor = _Authority(self_signed_cert, self_signed_key)
        crl_self_signed = _crl(self_anchor, [], now - day, now + week)
        crl_deep = [_crl(_Authority.of(ca), [], now - day, now + week) for ca in deep]

        server_root = trustme.CA(organization_name=ORG, organization_unit_name="server CA")
        server_leaf = server_root.create_child_ca().issue_cert(
            "localhost", "127.0.0.1", "::1", common_name="localhost", organization_name=ORG
        )
        upstream_root = trustme.CA(organization_name=ORG, organization_unit_name="upstream CA")
        untrusted_root = trustme.CA(organization_name=ORG, organization_unit_name="untrusted upstream CA")
        upstream_names = ("api.test", "localhost", "127.0.0.1")
        upstream = upstream_root.issue_cert(*upstream_names, common_name="api.test", organization_name=ORG)
        wrong_name = upstream_root.issue_cert("other.test", common_name="other.test", organization_name=ORG)
        untrusted = untrusted_root.issue_cert(*upstream_names, common_name="api.test", organization_name=ORG)

        main_pem = main.cert.public_bytes(PEM)
        return cls(
            dir=directory,
            client_ca=out.write("client-ca.crt", main_pem + self_signed_cert.public_bytes(PEM)),
            client_ca_only=out.write("client-ca-only.crt", main_pem),
            other_client_ca=out.write("other-client-ca.crt", other_ca.cert_pem.bytes()),
            server_cert=out.write("server.crt", b"".join(b.bytes() for b in server_leaf.cert_chain_pems)),
            server_key=out.write("server.key", server_leaf.private_key_pem.bytes()),
            server_ca=out.write("server-ca.crt", server_root.cert_pem.bytes()),
            upstream_ca=out.write("upstream-ca.crt", upstream_root.cert_pem.bytes()),
            upstream_cert=out.write("upstream.crt", upstream.cert_chain_pems[0].bytes()),
            upstream_key=out.write("upstream.key", upstream.private_key_pem.bytes()),
            upstream_wrong_name_cert=out.write("upstream-wrong-name.crt", wrong_name.cert_chain_pems[0].bytes()),
            upstream_wrong_name_key=out.write("upstream-wrong-name.key", wrong_name.private_key_pem.bytes()),
            upstream_untrusted_cert=out.write("upstream-untrusted.crt", untrusted.cert_chain_pems[0].bytes()),
            upstream_untrusted_key=out.write("upstream-untrusted.key", untrusted.private_key_pem.bytes()),
            crl=out.write("crl.pem", crl),
            crl_expired=out.write("crl-expired.pem", crl_expired),
            crl_intermediate=out.write("crl-intermediate.pem", crl_intermediate),
            crl_self_signed=out.write("crl-self-signed.pem", crl_self_signed),
            crl_bundle=out.write("crl-bundle.pem", b"".join([crl, crl_intermediate, crl_self_signed, *crl_deep])),
            clients=types.MappingProxyType(clients),
            _main=main,
        )

    # ---- helpers for tests -------------------------------------------------------------------------------

    def client_context(
        self, client: ClientCert | None, *, tls_max: ssl.TLSVersion | None = None
    ) -> ssl.SSLContext:
        """A client context that trusts ``server_ca`` and presents ``client`` (or no certificate)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=self.server_ca)
        if client is not None:
            ctx.load_cert_chain(client.cert, client.key)
        if tls_max is not None:
            ctx.maximum_version = tls_max
        return ctx

    def upstream_server_context(self, which: UpstreamKind = "good") -> ssl.SSLContext:
        """A server context for a test upstream: ``good`` (api.test, localhost, 127.0.0.1 from upstream_ca),
        ``wrong_name`` (other.test only, from upstream_ca) or ``untrusted`` (api.test from an unknown CA)."""
        cert, key = {
            "good": (self.upstream_cert, self.upstream_key),
            "wrong_name": (self.upstream_wrong_name_cert, self.upstream_wrong_name_key),
            "untrusted": (self.upstream_untrusted_cert, self.upstream_untrusted_key),
        }[which]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        return ctx

    def write_crl(
        self, path: Path, revoked: Iterable[ClientCert] = (), *, number: int = 3, expired: bool = False
    ) -> Path:
        """Write a fresh CRL from the main client CA revoking ``revoked`` (for CRL reload tests)."""
        certs = [c.leaf for c in revoked]
        if any(c.issuer != self._main.cert.subject for c in certs):
            raise ValueError("write_crl can only revoke certificates issued by the main client CA")
        now = dt.datetime.now(dt.timezone.utc)
        day = dt.timedelta(days=1)
        until = now - dt.timedelta(seconds=1) if expired else now + day
        path.write_bytes(_crl(self._main, certs, now - day, until, number=number))
        return path


# ---- a loopback handshake probe: what did OpenSSL decide on each side? -----------------------------------


@dataclass(frozen=True, slots=True)
class Handshake:
    server_ok: bool
    server_verify_code: int | None  # SSLCertVerificationError.verify_code seen by the server (client cert)
    server_error: str | None
    client_verify_code: int | None  # ... seen by the client (server cert)
    client_error: str | None
    peer_cert_der: bytes | None  # the client certificate the server saw, if the handshake completed
    version: str | None  # the negotiated protocol ("TLSv1.3"), if the handshake completed


def probe_handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_hostname: str | None = "localhost",
    timeout: float = 5.0,
) -> Handshake:
    """One TLS handshake over 127.0.0.1 between the two contexts; the server answers b"ok" if it completes."""
    result: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(timeout)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                result["server_error"] = repr(exc)
                return
            with conn:
                conn.settimeout(timeout)
                try:
                    with server_ctx.wrap_socket(conn, server_side=True) as tls:
                        result["peer"] = tls.getpeercert(binary_form=True)
                        result["version"] = tls.version()
                        result["server_ok"] = True
                        tls.sendall(b"ok")
                except ssl.SSLCertVerificationError as exc:
                    result["server_code"] = exc.verify_code
                    result["server_error"] = exc.verify_message
                except (ssl.SSLError, OSError) as exc:
                    result["server_error"] = repr(exc)

        thread = threading.Thread(target=serve, name="probe-handshake", daemon=True)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=timeout) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    # TLS 1.3: the server judges our certificate after our handshake returns; reading shows it.
                    while tls.recv(16):
                        pass
        except ssl.SSLCertVerificationError as exc:
            result["client_code"] = exc.verify_code
            result["client_error"] = exc.verify_message
        except (ssl.SSLError, OSError) as exc:
            result["client_error"] = repr(exc)
        thread.join(timeout)
    return Handshake(
        server_ok=bool(result.get("server_ok")),
        server_verify_code=result.get("server_code"),  # type: ignore[arg-type]
        server_error=result.get("server_error"),  # type: ignore[arg-type]
        client_verify_code=result.get("client_code"),  # type: ignore[arg-type]
        client_error=result.get("client_error"),  # type: ignore[arg-type]
        peer_cert_der=result.get("peer"),  # type: ignore[arg-type]
        version=result.get("version"),  # type: ignore[arg-type]
    )


# ---- building blocks ----------------------------------------------------------------------------------------


class _Out:
    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def write(self, name: str, data: bytes, mode: int | None = None) -> Path:
        # Keys 0600 like real deployments, in case the code under test refuses group/world-readable keys.
        if mode is None:
            mode = 0o600 if name.endswith(".key") else 0o644
        path = self.dir / name
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def client(
        self, name: str, leaf: x509.Certificate, key: PrivateKey, chain: Sequence[x509.Certificate]
    ) -> ClientCert:
        chain_pem = b"".join(c.public_bytes(PEM) for c in [leaf, *chain])
        key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        der = leaf.public_bytes(serialization.Encoding.DER)
        return ClientCert(
            name=name,
            cert=self.write(f"client-{name}.crt", chain_pem),
            key=self.write(f"client-{name}.key", key_pem),
            pem=self.write(f"client-{name}.pem", chain_pem + key_pem, 0o600),
            der=der,
            fingerprint=hashlib.sha256(der).hexdigest(),
            serial_hex=f"{leaf.serial_number:X}",
            subject=leaf.subject.rfc4514_string(),
            leaf=leaf,
        )


def _subject(common_name: str, organization: str = ORG) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _sans(dns: str, uri: str | None = None) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = [x509.DNSName(dns)]
    if uri is not None:
        sans.append(x509.UniformResourceIdentifier(uri))
    return sans


def _serial() -> int:
    # 40 hex digits whose top nibble is 1-7: positive, 20 DER bytes without a 0x00 pad (RFC 5280 4.1.2.2).
    return ((secrets.randbelow(7) + 1) << 156) | secrets.randbits(156)


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _issue(
    issuer: _Authority,
    subject: x509.Name,
    sans: list[x509.GeneralName],
    now: dt.datetime,
    *,
    use_rsa: bool = False,
    eku: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key(use_rsa)
    not_before = not_before or now - dt.timedelta(days=1)
    not_after = not_after or max(now, not_before) + dt.timedelta(days=30)
    issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return cert, key


def _self_signed(now: dt.datetime) -> tuple[x509.Certificate, PrivateKey]:
    """CA:FALSE, clientAuth, no keyUsage: a partner's self-signed client certificate that is its own anchor.

    No keyUsage extension (like ``openssl req -x509``) so the same key may also sign the CRL that a
    CRL_CHECK_LEAF server demands for it; with keyUsage=digitalSignature OpenSSL rejects that CRL (code 35).
    """
    key = _new_key(use_rsa=False)
    name = _subject("partner-selfsigned")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_sans("partner-selfsigned.partner.test")), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_key(use_rsa: bool) -> PrivateKey:
    if use_rsa:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _crl(
    issuer: _Authority,
    revoked: Sequence[x509.Certificate],
    last_update: dt.datetime,
    next_update: dt.datetime,
    number: int = 1,
) -> bytes:
    ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(last_update)
        .next_update(next_update)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number).revocation_date(last_update).build()
        )
    return builder.sign(issuer.key, hashes.SHA256()).public_bytes(PEM)
