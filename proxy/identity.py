"""Client certificate -> frozen :class:`Identity` (parsed once per TLS connection).

Owns: turning the DER bytes of an already *verified* client certificate into the values the policy matches
on (CNs, DNS/URI SANs, SHA-256 fingerprint), the RFC 8705 thumbprint, and the two strings that leave the process
(``subject`` and ``xfcc``), made safe for HTTP header values and JSON logs.
Must not: do IO, verify chains or dates (OpenSSL did that in the handshake), or decide access (policy.py).

Certificates come from partners and may be hostile, so every string that can leave the process is reduced to
printable ASCII (0x20-0x7E) here, once, by these exact rules:

``subject``
    cryptography's ``Name.rfc4514_string()`` (RFC 4514 order: last RDN first). cryptography already escapes
    ``\\ " + , ; < >`` with a backslash, NUL as ``\\00``, a leading ``#`` or space and a trailing space
    (RFC 4514 §2.4). On top of that every character outside 0x20-0x7E (controls, CR, LF, DEL, all non-ASCII)
    is replaced by ``\\XX`` hexpairs of its UTF-8 bytes, uppercase hex (§2.4 allows a hexpair escape for any
    octet), so ``CN=caf\\C3\\A9`` reads back as ``CN=café`` with any RFC 4514 parser.

``xfcc`` (Envoy ``x-forwarded-client-cert`` element, one certificate, no ``By``/``Cert``/``Chain``)
    ``Hash=<sha256 lowercase hex>;Subject="<subject>"`` then ``;URI=<v>`` for each URI SAN and ``;DNS=<v>``
    for each DNS SAN, each in certificate order.
    * URI and DNS values: every character outside 0x20-0x7E is percent-encoded as ``%XX`` of its UTF-8
      bytes, uppercase hex (the IRI-to-URI mapping of RFC 3987 §3.1). An existing ``%`` is left alone, so a
      URI keeps its meaning (this is not reversible for values that were already ambiguous).
    * A value is double-quoted when it is empty or contains ``,`` ``;`` ``=`` ``"`` ``\\`` or a space; inside
      quotes ``"`` and ``\\`` are escaped with a backslash. (Envoy quotes on ``, ; =``; the extra triggers
      keep a lenient parser from ever seeing a bare quote or backslash.)
    * ``Subject`` is always double-quoted with the same inner escaping; ``Hash`` never needs quoting.

``common_names``, ``san_dns``, ``san_uri`` hold the decoded text *raw* (for exact matching): they are NOT
header-safe and must never be put into a header or log line unescaped.

Odd certificates (decided here, tested in tests/test_identity.py):
* bytes that are not one DER X.509 certificate -> IdentityError;
* a serial number that is zero or negative (RFC 5280 §4.1.2.2) -> IdentityError (cryptography only warns
  today and will refuse such certificates in a future release);
* a subject cryptography cannot decode (invalid UTF-8/BMPString/UniversalString, a CN that is not a string)
  -> IdentityError: we will not forward or log an identity we cannot render truthfully;
* empty subject -> ``subject == ""``, no CNs; duplicate CNs -> all of them, in certificate order;
* the extensions cannot be parsed (malformed or duplicate extension, undecodable SAN) -> no SANs and
  ``san_parse_failed=True``: this only removes ways to match a rule, so it fails closed, and the flag lets
  the caller log why a SAN rule did not match;
* SAN types other than DNS and URI (IP, email, otherName, ...) are ignored.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from .wire.client_cert import x5t_s256_of_digest

__all__ = ["Identity", "IdentityError", "escape_rfc4514", "parse_identity"]


class IdentityError(ValueError):
    """The client certificate cannot be turned into an Identity (message is short and fixed)."""


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str  # RFC 4514, header-safe (see module docstring)
    common_names: tuple[str, ...]  # raw decoded text, for matching only
    san_dns: tuple[str, ...]  # raw decoded text, for matching only
    san_uri: tuple[str, ...]  # raw decoded text, for matching only
    serial: str  # uppercase hex, no 0x, no leading zeros
    fingerprint: str  # lowercase hex SHA-256 of the DER
    not_after: float  # POSIX timestamp
    xfcc: str  # Envoy x-forwarded-client-cert element, header-safe
    san_parse_failed: bool = False  # extensions unparseable: SANs dropped (fails closed)
    thumbprint: str = ""  # RFC 8705 x5t#S256: base64url SHA-256 of the DER, no padding (header-safe)


# Anything outside printable ASCII (0x20-0x7E). Compiled patterns are immutable, not mutable global state.
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_XFCC_NEEDS_QUOTES = re.compile(r'[,;="\\ ]')


def _utf8(char: str) -> bytes:
    # surrogatepass: cryptography never returns lone surrogates today, but an escape must never raise.
    return char.encode("utf-8", "surrogatepass")


def _hexpair(match: re.Match[str]) -> str:
    return "".join(f"\\{b:02X}" for b in _utf8(match.group()))


def _percent(match: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in _utf8(match.group()))


def escape_rfc4514(rfc4514: str) -> str:
    """Hexpair-escape (RFC 4514 §2.4) every character outside 0x20-0x7E of an RFC 4514 string."""
    # Attribute types are ASCII keywords or dotted OIDs, so anything non-printable is inside a value.
    return _NOT_PRINTABLE.sub(_hexpair, rfc4514)


def _xfcc_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _xfcc_value(value: str) -> str:
    value = _NOT_PRINTABLE.sub(_percent, value)
    if not value or _XFCC_NEEDS_QUOTES.search(value):
        return _xfcc_quote(value)
    return value


def _xfcc(fingerprint: str, subject: str, uris: tuple[str, ...], dns: tuple[str, ...]) -> str:
    parts = [f"Hash={fingerprint}", f"Subject={_xfcc_quote(subject)}"]
    parts.extend(f"URI={_xfcc_value(uri)}" for uri in uris)
    parts.extend(f"DNS={_xfcc_value(name)}" for name in dns)
    return ";".join(parts)


def _sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), (), False
    except Exception:  # noqa: BLE001 - cryptography raises ValueError/TypeError/DuplicateExtension here
        # Degrade, do not fail: dropping SANs only removes ways to be allowed (fails closed); flagged.
        return (), (), True
    dns = tuple(n.value for n in san if isinstance(n, x509.DNSName))
    uris = tuple(n.value for n in san if isinstance(n, x509.UniformResourceIdentifier))
    return dns, uris, False


def parse_identity(der: bytes) -> Identity:
    """Parse a verified client certificate (DER) into an Identity; raise IdentityError if it is unusable."""
    if not isinstance(der, (bytes, bytearray, memoryview)) or not der:
        raise IdentityError("no client certificate")
    der = bytes(der)
    try:
        # cryptography *warns* (UserWarning) while parsing names whose attributes exceed the X.520 upper
        # bounds (CN > 64 characters, empty CN, 3-letter C) and on non-positive serials. Partners send such
        # certificates; under `-W error` (and pytest's filterwarnings=error) the warning would become an
        # exception from inside cryptography. Silence it for this synchronous block only. catch_warnings
        # touches interpreter-wide filter state: acceptable because identities are parsed on the event loop
        # thread, without awaiting, and nothing else here runs in between.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # CryptographyDeprecationWarning is one too
            cert = x509.load_der_x509_certificate(der)
            serial_number = cert.serial_number
            name = cert.subject
    except Exception as exc:  # noqa: BLE001 - ValueError, TypeError, InvalidVersion: all mean "bad DER"
        raise IdentityError("client certificate is not a valid X.509 certificate") from exc
    if serial_number <= 0:
        raise IdentityError("client certificate serial number is not positive (RFC 5280 4.1.2.2)")
    try:
        raw_subject = name.rfc4514_string()
        common_names = tuple(a.value for a in name.get_attributes_for_oid(NameOID.COMMON_NAME))
        not_after = cert.not_valid_after_utc.timestamp()
    except Exception as exc:  # noqa: BLE001 - library boundary: translate, never leak
        raise IdentityError("client certificate subject or validity cannot be decoded") from exc
    if not all(isinstance(cn, str) for cn in common_names):
        raise IdentityError("client certificate CN is not a string")
    san_dns, san_uri, san_parse_failed = _sans(cert)
    digest = hashlib.sha256(der).digest()
    fingerprint = digest.hex()
    subject = escape_rfc4514(raw_subject)
    return Identity(
        subject=subject,
        common_names=common_names,  # type: ignore[arg-type]  # checked above
        san_dns=san_dns,
        san_uri=san_uri,
        serial=format(serial_number, "X"),
        fingerprint=fingerprint,
        not_after=not_after,
        xfcc=_xfcc(fingerprint, subject, san_uri, san_dns),
        san_parse_failed=san_parse_failed,
        thumbprint=x5t_s256_of_digest(digest),
    )
