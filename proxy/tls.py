"""TLS: the server and upstream SSL contexts, built from a frozen config, and handshake-failure reasons.

Owns: reading PEM sources (files or ``env:NAME``), building contexts with secure defaults (TLS >= 1.2, no
compression, no renegotiation, AEAD ciphers unless configured), client-certificate verification settings
(required, CRL leaf check, chain depth), certificate expiry facts for metrics and ``check``, and classifying a
failed handshake by OpenSSL's own verify result.

Must not: accept connections or keep state; a reload builds new contexts with ``build_server_context`` and the
caller swaps them.

Chain depth, read-ahead and the session cache size are set through ``proxy.openssl`` (Python's ``ssl`` has none of
them).  Without the depth limit OpenSSL would accept client chains up to 100 deep, so when it cannot be set the
proxy refuses to start (``server.verify_depth``); read-ahead and the session cache size are fast paths, left at
OpenSSL's defaults when they cannot be proven.

Session resumption: stateful only (``OP_NO_TICKET``; the cache holds ``openssl.SESSION_CACHE_SIZE`` sessions per
context, so per worker), and a reload's new context starts with an empty cache.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import _ssl
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from . import openssl
from .config import PemSource, ServerConfig, UpstreamConfig
from .errors import ConfigError

# transport.py still imports it from here; it belongs to the OpenSSL bridge.
pending_function = openssl.pending_function

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class CertFact:
    """One certificate or CRL whose expiry operators should watch."""

    label: str  # "server", "client_ca:<CN>", "crl:<issuer CN>"
    not_after: float  # POSIX seconds; for a CRL: its next update


class Fetched(Protocol):
    """Remote material already read and validated (``proxy.sources.material.Material``): what a reload builds from,
    so a source whose change the poll just found is not requested a second time."""

    def __contains__(self, key: object) -> bool: ...
    def __getitem__(self, key: str) -> bytes: ...
    def location(self, key: str) -> Any: ...


def read_pem(source: PemSource, key: str, fetched: Fetched | None = None) -> bytes:
    """The PEM bytes of a source (a CRL may also be DER), or ConfigError naming the key and the source.

    A remote source (S3, Secrets Manager, SSM, http(s)) comes from ``fetched`` when that holds this key at the same
    location, else it is read here, through ``proxy.sources``: at start-up a source that cannot be read is fatal,
    naming the key (fail closed).  boto3 is imported only for AWS kinds."""
    if source.uri is not None and fetched is not None and key in fetched and fetched.location(key) == source.location:
        data = fetched[key]
        if key != "server.crl" and b"-----BEGIN " not in data:
            raise ConfigError(key, f"{source}: no PEM data")
        return data
    if source.uri is not None:
        from .errors import ConfigErrors
        from .sources.material import Material

        material = Material({key: source.location}, environ=os.environ)
        try:
            material.load()
        except ConfigErrors as exc:
            raise exc.errors[0] from None
        data = material[key]
        if key != "server.crl" and b"-----BEGIN " not in data:
            raise ConfigError(key, f"{source}: no PEM data")
        return data
    if source.env is not None:
        value = os.environ.get(source.env)
        if not value:
            raise ConfigError(key, f"environment variable {source.env} is not set or empty")
        return value.encode()
    assert source.path is not None
    try:
        data = source.path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(key, f"{source.path}: file not found") from None
    except OSError as exc:
        raise ConfigError(key, f"{source.path}: cannot read: {exc.strerror}") from None
    if b"-----BEGIN " not in data and not (key == "server.crl" and data[:1] == b"\x30"):
        raise ConfigError(key, f"{source}: no PEM data")
    return data


def _load_certs(pem: bytes, key: str, source: PemSource) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ConfigError(key, f"{source}: not a PEM certificate bundle ({exc})") from None
    return certs


def _cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


class _PemFile:
    """PEM text behind a path, for OpenSSL APIs that only take paths (load_cert_chain, CRLs).

    On Linux the bytes live in an anonymous memory file (memfd) opened through /proc/self/fd: a private key never
    touches a disk and nothing is left behind if the process is killed mid-load.  Elsewhere: a 0600 temp file,
    removed right after loading.
    """

    def __init__(self, data: bytes) -> None:
        self._fd: int | None = None
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self._fd = os.memfd_create("mtls-proxy-pem", os.MFD_CLOEXEC)
            os.write(self._fd, data)
            self.path = f"/proc/self/fd/{self._fd}"
        else:  # pragma: no cover - non-Linux
            import tempfile

            fd, self.path = tempfile.mkstemp(prefix="mtls-proxy-", suffix=".pem")
            with os.fdopen(fd, "wb") as fh:  # mkstemp creates it 0600
                fh.write(data)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
        else:  # pragma: no cover - non-Linux
            os.unlink(self.path)


def build_server_context(server: ServerConfig,
                         fetched: Fetched | None = None) -> tuple[ssl.SSLContext, list[CertFact]]:
    """The client-facing context and the expiry facts of what it loaded; ConfigError on any bad input."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = sorted(_VERSIONS[v] for v in server.tls_versions)
    ctx.minimum_version = versions[0]
    ctx.maximum_version = versions[-1]
    # OP_NO_TICKET: resumption from the server's own session cache (a session ID; in TLS 1.3 a ticket that only
    # names a cached session) instead of stateless tickets, which cost an encryption of the whole session
    # (client certificate included) on every full handshake and a decryption on every resumption attempt.
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_TICKET)
    try:
        ctx.set_ciphers(server.ciphers)
    except ssl.SSLError:
        raise ConfigError("server.ciphers", f"OpenSSL accepts no cipher from {server.ciphers!r}") from None
    facts: list[CertFact] = []

    cert_pem = read_pem(server.cert, "server.cert", fetched)
    key_pem = read_pem(server.key, "server.key", fetched)
    chain = _load_certs(cert_pem, "server.cert", server.cert)
    if not chain:
        raise ConfigError("server.cert", f"{server.cert}: no certificate found")
    facts.append(CertFact("server", chain[0].not_valid_after_utc.timestamp()))
    with _PemFile(cert_pem) as cert_file, _PemFile(key_pem) as key_file:
        try:
            ctx.load_cert_chain(cert_file, key_file, password=_no_password)
        except _EncryptedKey:
            raise ConfigError("server.key", f"{server.key}: the private key is encrypted (a passphrase "
                                            f"cannot be given; store it unencrypted, mode 0600)") from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ConfigError("server.key", f"{server.key}: does not match the certificate in "
                                                f"{server.cert}") from None
            raise ConfigError("server.key", f"{server.key}: cannot load key ({exc.reason or exc})") from None
        except OSError as exc:
            raise ConfigError("server.key", f"{server.key}: cannot load key ({exc.strerror or exc})") from None

    ca_pem = read_pem(server.client_ca, "server.client_ca", fetched)
    cas = _load_certs(ca_pem, "server.client_ca", server.client_ca)
    if not cas:
        raise ConfigError("server.client_ca", f"{server.client_ca}: no certificate found")
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise ConfigError("server.client_ca", f"{server.client_ca}: {exc.reason or exc}") from None
    facts.extend(CertFact(f"client_ca:{_cn(c.subject)}", c.not_valid_after_utc.timestamp()) for c in cas)
    if server.crl is not None:
        crl_pem = read_pem(server.crl, "server.crl", fetched)
        crls = load_crls(crl_pem, server.crl)
        for crl in crls:
            nu = crl.next_update_utc
            facts.append(CertFact(f"crl:{_cn(crl.issuer)}", nu.timestamp() if nu else float("inf")))
        # Only the CRLs, re-encoded: OpenSSL's cafile loader would also trust any certificate in the CRL file.
        with _PemFile(b"".join(crl.public_bytes(serialization.Encoding.PEM) for crl in crls)) as crl_file:
            try:
                ctx.load_verify_locations(cafile=crl_file)
            except ssl.SSLError as exc:
                raise ConfigError("server.crl", f"{server.crl}: {exc.reason or exc}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    try:
        openssl.set_verify_depth(ctx, server.verify_depth)
    except openssl.Unavailable as exc:
        raise ConfigError("server.verify_depth", f"cannot enforce the chain depth limit: {exc}") from None
    if server.send_client_ca_names:
        try:
            openssl.set_client_ca_names(ctx, [c.public_bytes(serialization.Encoding.DER) for c in cas])
        except openssl.Unavailable as exc:
            raise ConfigError("server.send_client_ca_names", f"cannot send the client CA names ({exc}); set it to "
                                                             f"false to run without them") from None
    try:
        openssl.set_client_sigalgs(ctx, server.client_sigalgs)
    except ValueError as exc:
        raise ConfigError("server.client_sigalgs", str(exc)) from None
    except openssl.Unavailable as exc:
        raise ConfigError("server.client_sigalgs", f"cannot set the client signature algorithms: {exc}") from None

    openssl.enable_read_ahead(ctx)
    # The cache is this context's: a reload builds a new context, so its cache starts empty and no session made
    # under the old client CAs or CRL is resumed.  When the size cannot be set, OpenSSL's larger default stands
    # (more memory, same behaviour) and ``check`` says so.
    try:
        openssl.set_session_cache_size(ctx)
    except openssl.Unavailable:
        pass
    return ctx, facts


def client_ca_names_size(server: ServerConfig) -> int:
    """Bytes of the certificate_authorities list the CertificateRequest carries (each DER name with its 2-byte
    length, plus the list's own 2-byte length): 0 when the names are not sent."""
    if not server.send_client_ca_names:
        return 0
    cas = _load_certs(read_pem(server.client_ca, "server.client_ca"), "server.client_ca", server.client_ca)
    return 2 + sum(2 + len(c.subject.public_bytes()) for c in cas)


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    # Without a callback OpenSSL prompts on the terminal for an encrypted key (hanging ``serve`` and reloads),
    # or fails with a bare EINVAL when there is none.
    raise _EncryptedKey


def load_crls(pem: bytes, source: PemSource) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM bundle (only the CRL blocks: other PEM blocks in the file are ignored); ConfigError
    naming ``server.crl`` for a bad or missing one."""
    crls = []
    marker = b"-----BEGIN X509 CRL-----"
    if marker not in pem and pem[:1] == b"\x30":  # a DER SEQUENCE: CRL distribution points serve DER
        try:
            return [x509.load_der_x509_crl(pem)]
        except ValueError as exc:
            raise ConfigError("server.crl", f"{source}: bad DER CRL ({exc})") from None
    for part in pem.split(marker)[1:]:
        try:
            crls.append(x509.load_pem_x509_crl(marker + part.split(b"-----END X509 CRL-----")[0]
                                                + b"-----END X509 CRL-----\n"))
        except ValueError as exc:
            raise ConfigError("server.crl", f"{source}: bad CRL ({exc})") from None
    if not crls:
        raise ConfigError("server.crl", f"{source}: no CRL found")
    return crls


def build_upstream_context(upstream: UpstreamConfig, fetched: Fetched | None = None) -> ssl.SSLContext:
    """The context for connections to the API: verifies the upstream certificate for ``upstream.host``."""
    if upstream.ca_bundle is not None:
        pem = read_pem(upstream.ca_bundle, "upstream.ca_bundle", fetched)
        if not _load_certs(pem, "upstream.ca_bundle", upstream.ca_bundle):
            raise ConfigError("upstream.ca_bundle", f"{upstream.ca_bundle}: no certificate found")
        try:
            ctx = ssl.create_default_context(cadata=pem.decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise ConfigError("upstream.ca_bundle", f"{upstream.ca_bundle}: {exc.reason or exc}") from None
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    if not upstream.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    openssl.enable_read_ahead(ctx)
    return ctx


# The reasons a client handshake fails, as the metric labels them (a fixed set: every label exists from the start).
HANDSHAKE_REASONS = ("no_cert", "untrusted", "expired", "revoked", "bad_purpose", "protocol", "timeout", "other")

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) grouped into the metric's fixed reason set.
_VERIFY_REASONS = {
    9: "expired",  # CERT_NOT_YET_VALID: outside the validity window, like an expired one
    10: "expired",  # CERT_HAS_EXPIRED
    23: "revoked",  # CERT_REVOKED
    26: "bad_purpose",  # INVALID_PURPOSE (no clientAuth EKU)
    2: "untrusted", 7: "untrusted", 18: "untrusted", 19: "untrusted", 20: "untrusted", 21: "untrusted",
    22: "untrusted",  # CERT_CHAIN_TOO_LONG: deeper than verify_depth
    24: "untrusted", 25: "untrusted", 27: "untrusted", 28: "untrusted",
}


def handshake_failure_reason(exc: BaseException) -> str:
    """One of HANDSHAKE_REASONS."""
    # getattr: only errors raised by _ssl carry verify_code/reason; one built in Python code has neither.
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(getattr(exc, "verify_code", None), "other")  # type: ignore[arg-type]
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None)
        if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "no_cert"
        if reason in ("UNEXPECTED_EOF_WHILE_READING",) or isinstance(exc, ssl.SSLEOFError):
            return "other"
        return "protocol"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "other"


def handshake_failure_detail(exc: BaseException) -> str:
    """A short log text: OpenSSL's verify message when there is one."""
    if isinstance(exc, ssl.SSLCertVerificationError) and hasattr(exc, "verify_code"):
        return f"{exc.verify_message} (X509_V_ERR {exc.verify_code})"
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "reason", None) or exc.__class__.__name__
    return exc.__class__.__name__ + (f": {exc}" if str(exc) else "")


def expiring(facts: list[CertFact], within_days: float, now: float | None = None) -> list[CertFact]:
    now = dt.datetime.now(dt.timezone.utc).timestamp() if now is None else now
    return [f for f in facts if f.not_after - now < within_days * 86400]


def peer_chains(sock: ssl.SSLSocket) -> tuple[list[bytes] | None, list[bytes] | None]:
    """(the chain the client sent, the chain OpenSSL verified), each leaf first, as DER; (None, None) when the
    session was resumed (OpenSSL keeps neither in a session) or the running Python cannot say.

    Python's private ``get_unverified_chain`` / ``get_verified_chain`` (public only from 3.13) are read-only
    accessors of ``SSL_get_peer_cert_chain`` / ``SSL_get0_verified_chain``; on a server socket Python puts the leaf
    in front of the former (OpenSSL leaves it out there).  Checked in tests/test_tls.py.
    """
    tls = getattr(sock, "_sslobj", None)
    sent_fn = getattr(tls, "get_unverified_chain", None)
    verified_fn = getattr(tls, "get_verified_chain", None)
    if sent_fn is None or verified_fn is None:
        return None, None
    sent, verified = sent_fn(), verified_fn()
    if sent is None or verified is None:
        return None, None
    der = _ssl.ENCODING_DER
    return [c.public_bytes(der) for c in sent], [c.public_bytes(der) for c in verified]
