"""Development certificates for ``mtls-proxy certs init DIR``.

Owns: building a throw-away PKI with ``cryptography`` (ECDSA P-256, SHA-256) and writing it safely: every target
is checked before anything is written, private keys are created 0600 (never readable by others, not even for a
moment), and each file is written to a temporary name and renamed, so a crash never leaves half a key.

Files written into DIR (the ``<name>`` pair once per ``--client NAME``):

    ca.crt ca.key                   client CA: signs the client certificates the proxy accepts (server.client_ca)
    server-ca.crt server-ca.key     a separate CA for the proxy's own server certificate
    server.crt server.key           server leaf FOLLOWED BY server-ca.crt, so that the smoke test
                                    ``curl --key client.key --cert client.crt --cacert server.crt`` works
    client.crt client.key           CN "client", clientAuth
    <name>.crt <name>.key           CN NAME, clientAuth
    revoked.crt revoked.key         CN "revoked", clientAuth, listed in crl.pem
    crl.pem                         CRL from the client CA revoking revoked.crt
    upstream-ca.crt upstream-ca.key a third CA, for the built-in demo upstream
    upstream.crt upstream.key       demo upstream server certificate (so the demo verifies upstream TLS too)

Must not: be used for production certificates, print, or exit the process (the CLI turns ``DevPkiError`` into a
one-line message).
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "mtls-proxy dev"
CLIENT_CA_CN = "mtls-proxy dev client CA"
SERVER_CA_CN = "mtls-proxy dev server CA"
UPSTREAM_CA_CN = "mtls-proxy dev upstream CA"
DEMO_UPSTREAM_HOST = "demo.execute-api.local"
CLIENT_DNS_SUFFIX = "dev.test"

# File stems the fixed part of the PKI uses; a --client NAME must not collide with them.  "client" is the
# default client's stem.  Compared case-insensitively: on a case-insensitive file system CA.key is ca.key.
RESERVED_STEMS = frozenset({"ca", "server", "server-ca", "revoked", "crl", "upstream", "upstream-ca", "client"})
_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# RFC 1123 section 2.1 host name labels; a leading "*." wildcard is allowed for --server-name.
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

CA_VALIDITY = dt.timedelta(days=5 * 365)
LEAF_VALIDITY = dt.timedelta(days=365)
CRL_VALIDITY = dt.timedelta(days=30)
# Backdate notBefore so a client whose clock is a little behind does not see "certificate is not yet valid".
CLOCK_SKEW = dt.timedelta(hours=1)

KEY_MODE = 0o600
CERT_MODE = 0o644


class DevPkiError(Exception):
    """``certs init`` cannot proceed; the message is one line meant for the operator."""


@dataclass(frozen=True, slots=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class _Output:
    name: str
    data: bytes
    mode: int


def init_dev_pki(
    directory: Path,
    clients: Sequence[str] = (),
    server_names: Sequence[str] = (),
    force: bool = False,
    now: dt.datetime | None = None,
) -> list[Path]:
    """Write the development PKI into ``directory`` (created if missing) and return the files written.

    Raises ``DevPkiError`` for a bad client or server name, an existing target file without ``force`` (then
    nothing is written), or a file system error.
    """
    if now is None:
        now = dt.datetime.now(dt.timezone.utc)
    elif now.tzinfo is None:
        raise DevPkiError("now must be timezone-aware")
    client_names = _check_client_names(clients)
    server_sans = _server_sans(server_names)
    outputs = _build(now, client_names, server_sans)

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DevPkiError(f"{directory} exists and is not a directory")
    targets = [directory / out.name for out in outputs]
    if not force:
        # lexists: a dangling symlink is still something we would silently replace.
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise DevPkiError(f"{existing[0]} exists{more}; use --force to overwrite")
    try:
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        for out, target in zip(outputs, targets):
            _write_atomic(target, out.data, out.mode, replace=force)
        _fsync_dir(directory)
    except FileExistsError as exc:  # created by someone else between the check and our write
        raise DevPkiError(f"{exc.filename2 or exc.filename} exists; use --force to overwrite") from exc
    except OSError as exc:
        raise DevPkiError(f"cannot write {exc.filename or directory}: {exc.strerror or exc}") from exc
    return targets


def _check_client_names(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    for name in names:
        if not _CLIENT_NAME.fullmatch(name):
            raise DevPkiError(
                f"invalid client name {name!r}: use 1-63 of A-Z a-z 0-9 _ . - starting with a letter or digit"
            )
        if ".." in name or name.endswith("."):
            # The name becomes the DNS SAN NAME.dev.test: an empty label would make it malformed.
            raise DevPkiError(f"invalid client name {name!r}: empty DNS label")
        folded = name.lower()
        if folded in RESERVED_STEMS:
            raise DevPkiError(f"invalid client name {name!r}: reserved for {folded}.crt/{folded}.key")
        if folded in seen:
            raise DevPkiError(f"client name {name!r} given twice")
        seen.add(folded)
    return list(names)


def _server_sans(names: Sequence[str]) -> list[x509.GeneralName]:
    """localhost, 127.0.0.1, ::1, then every --server-name as an IP or DNS name, without duplicates."""
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    for name in names:
        san = _server_san(name)
        if san not in sans:
            sans.append(san)
    return sans


def _server_san(name: str) -> x509.GeneralName:
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        if "%" in name:  # an IPv6 zone id is local to one host and cannot be put in a certificate
            raise DevPkiError(f"invalid server name {name!r}: IPv6 zone ids are not allowed")
        return x509.IPAddress(address)
    host = name.lower()
    labels = host.split(".")
    if labels[0] == "*" and len(labels) > 2:  # RFC 6125 section 6.4.3: wildcard only as the whole left label
        labels = labels[1:]
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise DevPkiError(f"invalid server name {name!r}: not an IP address or an ASCII DNS name")
    return x509.DNSName(host)


def _build(now: dt.datetime, client_names: list[str], server_sans: list[x509.GeneralName]) -> list[_Output]:
    client_ca = _ca(CLIENT_CA_CN, now)
    server_ca = _ca(SERVER_CA_CN, now)
    upstream_ca = _ca(UPSTREAM_CA_CN, now)

    server = _leaf(server_ca, "localhost", server_sans, ExtendedKeyUsageOID.SERVER_AUTH, now)
    upstream_sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName(DEMO_UPSTREAM_HOST),
    ]
    upstream = _leaf(upstream_ca, DEMO_UPSTREAM_HOST, upstream_sans, ExtendedKeyUsageOID.SERVER_AUTH, now)
    clients = [(stem, _client(client_ca, stem, now)) for stem in ["client", *client_names]]
    revoked = _client(client_ca, "revoked", now)

    outputs = [
        *_pair("ca", client_ca),
        *_pair("server-ca", server_ca),
        # The chain after the leaf ends with the CA itself: curl --cacert server.crt then finds its anchor.
        *_pair("server", server, chain=[server_ca.cert]),
    ]
    for stem, issued in clients:
        outputs += _pair(stem, issued)
    outputs += [
        *_pair("revoked", revoked),
        _Output("crl.pem", _crl(client_ca, [revoked.cert], now).public_bytes(serialization.Encoding.PEM), CERT_MODE),
        *_pair("upstream-ca", upstream_ca),
        *_pair("upstream", upstream),
    ]
    return outputs


def _pair(stem: str, issued: _Issued, chain: Sequence[x509.Certificate] = ()) -> list[_Output]:
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [issued.cert, *chain])
    key = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return [_Output(f"{stem}.crt", pem, CERT_MODE), _Output(f"{stem}.key", key, KEY_MODE)]


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca(common_name: str, now: dt.datetime) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        # RFC 5280 section 4.2.1.9: critical, and pathlen 0 because these CAs only ever sign leaves.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _client(ca: _Issued, name: str, now: dt.datetime) -> _Issued:
    sans: list[x509.GeneralName] = [
        x509.DNSName(f"{name}.{CLIENT_DNS_SUFFIX}"),
        x509.UniformResourceIdentifier(f"spiffe://{CLIENT_DNS_SUFFIX}/{name}"),
    ]
    return _leaf(ca, name, sans, ExtendedKeyUsageOID.CLIENT_AUTH, now)


def _leaf(
    ca: _Issued, common_name: str, sans: list[x509.GeneralName], eku: x509.ObjectIdentifier, now: dt.datetime
) -> _Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + LEAF_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _Issued(cert, key)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # ECDSA leaves only sign (RFC 5480 section 3): no keyEncipherment.  CAs sign certificates and CRLs only.
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _crl(ca: _Issued, revoked: Sequence[x509.Certificate], now: dt.datetime) -> x509.CertificateRevocationList:
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + CRL_VALIDITY)
        # RFC 5280 section 5.2: conforming CRL issuers include the AKI and CRL number extensions.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.CRLNumber(1), critical=False)
    )
    for cert in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - CLOCK_SKEW)
            .build()
        )
    return builder.sign(ca.key, hashes.SHA256())


def _write_atomic(target: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write ``data`` to a fresh temporary file created with ``mode``, then move it onto ``target``.

    O_EXCL|O_NOFOLLOW: the temporary name can't be a pre-planted file or symlink; the mode is given to open()
    so a key is never readable by others, even before the fchmod that undoes a permissive or strict umask.
    """
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, target)  # atomic; replaces a symlink itself, never the file it points to
        else:
            _move_no_replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _move_no_replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` unless it exists: link() fails if the target appeared since the check."""
    try:
        os.link(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) or os.path.lexists(target):
            raise
        os.replace(tmp, target)  # a file system without hard links: the earlier check is all we have
    else:
        os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
