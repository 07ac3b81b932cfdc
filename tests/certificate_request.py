"""The server's CertificateRequest as a client saw it: ``openssl s_client -msg`` output -> parsed message.

Owns: finding the CertificateRequest handshake message in s_client's ``-msg`` dump (OpenSSL prints every handshake
message it receives, TLS 1.3's after decryption, as hex lines under a ``<<< TLS 1.x, Handshake [...]`` header),
and parsing its bytes for both protocol versions:

* TLS 1.2 (RFC 5246 section 7.4.4): ``certificate_types<1..2^8-1>``, ``supported_signature_algorithms<2..2^16-2>``,
  ``certificate_authorities<0..2^16-1>`` of ``DistinguishedName<1..2^16-1>`` (DER X.501 names);
* TLS 1.3 (RFC 8446 section 4.3.2): ``certificate_request_context<0..2^8-1>`` and extensions, of which
  ``signature_algorithms`` (13, section 4.2.3) and ``certificate_authorities`` (47, section 4.2.4) matter here.

Sans-IO: the functions take text or bytes and return values or raise ValueError; the caller runs s_client.
Must not: accept trailing or missing bytes silently (a truncated message is an error, not an empty list).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# IANA TLS SignatureScheme values (RFC 8446 section 4.2.3 and the TLS registry): the names OpenSSL also accepts.
SIGNATURE_SCHEMES = {
    "rsa_pkcs1_sha1": 0x0201, "ecdsa_sha1": 0x0203,
    "rsa_pkcs1_sha224": 0x0301, "dsa_sha224": 0x0302, "ecdsa_sha224": 0x0303,
    "rsa_pkcs1_sha256": 0x0401, "dsa_sha256": 0x0402, "ecdsa_secp256r1_sha256": 0x0403,
    "rsa_pkcs1_sha384": 0x0501, "dsa_sha384": 0x0502, "ecdsa_secp384r1_sha384": 0x0503,
    "rsa_pkcs1_sha512": 0x0601, "dsa_sha512": 0x0602, "ecdsa_secp521r1_sha512": 0x0603,
    "dsa_sha1": 0x0202,
    "rsa_pss_rsae_sha256": 0x0804, "rsa_pss_rsae_sha384": 0x0805, "rsa_pss_rsae_sha512": 0x0806,
    "ed25519": 0x0807, "ed448": 0x0808,
    "rsa_pss_pss_sha256": 0x0809, "rsa_pss_pss_sha384": 0x080A, "rsa_pss_pss_sha512": 0x080B,
}
SCHEME_NAMES = {v: k for k, v in SIGNATURE_SCHEMES.items()}

_HANDSHAKE_CERTIFICATE_REQUEST = 13
_EXT_SIGNATURE_ALGORITHMS = 13
_EXT_CERTIFICATE_AUTHORITIES = 47

_HEADER = re.compile(r"^<<< TLS (1\.[0-3]), Handshake \[length ([0-9a-f]+)\], CertificateRequest$", re.M)
_HEX_LINE = re.compile(r"^    ((?:[0-9a-f]{2} ?)+)$")


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    version: str  # "1.2" or "1.3"
    raw: bytes  # the whole handshake message: type, 3-byte length, body
    certificate_types: tuple[int, ...]  # TLS 1.2 only (ClientCertificateType values); () for TLS 1.3
    signature_algorithms: tuple[int, ...]  # SignatureScheme code points, in the order the server sent them
    authorities: tuple[bytes, ...]  # DER-encoded distinguished names, in the order the server sent them

    @property
    def signature_names(self) -> tuple[str, ...]:
        return tuple(SCHEME_NAMES.get(c, f"0x{c:04x}") for c in self.signature_algorithms)


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.what}: needs {n} bytes at offset {self.pos}, has {len(self.data) - self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int, what: str) -> _Reader:
        return _Reader(self.take(self.uint(length_bytes)), what)

    def done(self) -> bool:
        return self.pos == len(self.data)

    def end(self) -> None:
        if not self.done():
            raise ValueError(f"{self.what}: {len(self.data) - self.pos} trailing bytes")


def _names(r: _Reader) -> tuple[bytes, ...]:
    out = []
    while not r.done():
        name = r.vector(2, "DistinguishedName").data
        if not name:
            raise ValueError("empty DistinguishedName")
        out.append(name)
    return tuple(out)


def _schemes(r: _Reader) -> tuple[int, ...]:
    if len(r.data) % 2:
        raise ValueError("signature_algorithms: odd length")
    return tuple(r.uint(2) for _ in range(len(r.data) // 2))


def parse(message: bytes, version: str) -> CertificateRequest:
    """Parse one CertificateRequest handshake message (with its 4-byte handshake header)."""
    r = _Reader(message, "CertificateRequest")
    if r.uint(1) != _HANDSHAKE_CERTIFICATE_REQUEST:
        raise ValueError(f"not a CertificateRequest (handshake type {message[0]})")
    body = r.vector(3, "CertificateRequest body")
    r.end()
    if version == "1.2":
        types = tuple(body.vector(1, "certificate_types").data)
        schemes = _schemes(body.vector(2, "supported_signature_algorithms"))
        authorities = _names(body.vector(2, "certificate_authorities"))
        body.end()
        return CertificateRequest(version, message, types, schemes, authorities)
    if version != "1.3":
        raise ValueError(f"unsupported TLS version {version}")
    body.vector(1, "certificate_request_context")
    exts = body.vector(2, "extensions")
    body.end()
    schemes: tuple[int, ...] = ()
    authorities: tuple[bytes, ...] = ()
    seen = set()
    while not exts.done():
        kind = exts.uint(2)
        data = exts.vector(2, f"extension {kind}")
        if kind in seen:
            raise ValueError(f"extension {kind} appears twice")  # RFC 8446 section 4.2
        seen.add(kind)
        if kind == _EXT_SIGNATURE_ALGORITHMS:
            schemes = _schemes(data.vector(2, "supported_signature_algorithms"))
            data.end()
        elif kind == _EXT_CERTIFICATE_AUTHORITIES:
            authorities = _names(data.vector(2, "authorities"))
            data.end()
    return CertificateRequest(version, message, (), schemes, authorities)


def from_s_client(text: str) -> CertificateRequest:
    """The one CertificateRequest in an ``openssl s_client -msg`` transcript; ValueError if there is not exactly one."""
    headers = list(_HEADER.finditer(text))
    if len(headers) != 1:
        raise ValueError(f"expected one CertificateRequest in the s_client transcript, found {len(headers)}")
    head = headers[0]
    length = int(head.group(2), 16)
    data = bytearray()
    for line in text[head.end() + 1:].splitlines():
        m = _HEX_LINE.match(line)
        if not m:
            break
        data += bytes.fromhex(m.group(1))
    if len(data) != length:
        raise ValueError(f"CertificateRequest dump holds {len(data)} bytes, its header says {length}")
    return parse(bytes(data), head.group(1))
