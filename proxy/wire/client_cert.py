"""The client certificate as header values: RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain`` and RFC 8705 ``x5t#S256``.

Owns: the RFC 8941 serialisation these fields use (Byte Sequence, List of Byte Sequences), the RFC 8705 §3.1
certificate thumbprint, and the choice of which certificates go into ``Client-Cert-Chain``.
Must not: touch ssl objects or sockets (the caller hands over DER bytes), parse certificates (identity.py), or
decide whether the fields are sent (configuration, headers.py).

Which certificates ``Client-Cert-Chain`` carries (RFC 9440 §2.3 calls it "the certificate chain used for
validation of the end-entity certificate", in TLS order): the intermediates *the client sent* that OpenSSL's
verified chain actually used, nearest the leaf first. So:

* never the leaf (it is ``Client-Cert``);
* never the trust anchor, even when the client sent it: the upstream knows its anchors from configuration, and
  every byte counts against API Gateway's 10,240-byte limit on the request line and headers;
* never an intermediate the proxy took from its own ``client_ca`` file rather than from the client;
* never a certificate the client sent that played no part in validation (an unrelated or duplicate certificate):
  forwarding it would let a client place arbitrary certificates in a field the upstream trusts.

With none left (a leaf issued directly by the anchor, a self-signed partner certificate) the field is omitted:
RFC 8941 §4.1 does not serialise an empty List.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence

__all__ = ["CLIENT_CERT_NAMES", "byte_sequence", "byte_sequence_list", "rfc9440_lines", "sent_intermediates",
           "x5t_s256", "x5t_s256_of_digest"]

# Lowercase names of the fields this module produces: a client-sent copy of any of them is removed (RFC 9440 §2.4
# item 3; the thumbprint because an authorizer trusts it as much as the certificate).
CLIENT_CERT_NAMES = frozenset({b"client-cert", b"client-cert-chain", b"x-client-cert-thumbprint"})


def byte_sequence(data: bytes) -> bytes:
    """RFC 8941 §4.1.8: ``:`` + base64 (RFC 4648 §4, with padding, no line breaks) + ``:``."""
    return b":" + base64.b64encode(data) + b":"


def byte_sequence_list(items: Iterable[bytes]) -> bytes:
    """RFC 8941 §4.1.1 List of Byte Sequences: members joined by ``,`` and one SP; empty input gives ``b""``
    (RFC 8941 §4.1: an empty List is not serialised, so the caller omits the field)."""
    return b", ".join(byte_sequence(item) for item in items)


def x5t_s256_of_digest(digest: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256`` from the SHA-256 digest of the DER: base64url (RFC 4648 §5) without padding."""
    if len(digest) != 32:
        raise ValueError("x5t#S256 needs a 32-byte SHA-256 digest")
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def x5t_s256(der: bytes) -> str:
    """RFC 8705 §3.1 certificate thumbprint of a DER certificate."""
    return x5t_s256_of_digest(hashlib.sha256(der).digest())


def sent_intermediates(sent: Sequence[bytes] | None, verified: Sequence[bytes] | None) -> tuple[bytes, ...] | None:
    """The certificates for ``Client-Cert-Chain`` (see the module docstring), or None when unknown.

    ``sent``: the chain the client sent, leaf first (on a server, Python's ``get_unverified_chain()`` puts the
    leaf in front of what OpenSSL's ``SSL_get_peer_cert_chain`` returns).  ``verified``: the chain OpenSSL built,
    leaf first, trust anchor last.  Both are None on a resumed TLS session (OpenSSL keeps neither in the session),
    and then so is the result: the caller must not pass "unknown" off as "no intermediates".
    """
    if sent is None or verified is None:
        return None
    offered = frozenset(sent[1:])
    return tuple(cert for cert in verified[1:-1] if cert in offered)


def rfc9440_lines(leaf: bytes, chain: Sequence[bytes]) -> bytes:
    """``Client-Cert`` and, when ``chain`` is not empty, ``Client-Cert-Chain`` as CRLF-terminated header lines.

    One field line each (RFC 9440 §2.3 allows splitting the List; one line keeps the count of lines and bytes
    the upstream sees as small as it can be)."""
    out = b"Client-Cert: " + byte_sequence(leaf) + b"\r\n"
    if chain:
        out += b"Client-Cert-Chain: " + byte_sequence_list(chain) + b"\r\n"
    return out
