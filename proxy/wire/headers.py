"""Header rewriting for both directions, as pure functions on bytes.

Owns: the list of identity headers a client must never be able to set (removed from every request before the
proxy adds its own), the per-connection block of identity and forwarding headers (with the RFC 8705 thumbprint and,
when configured, the RFC 9440 lines ``proxy.wire.client_cert`` formats), and assembling request and response heads from
the parser's raw lines.

Per-connection work happens once: ``connection_block`` is built when the TLS handshake completes and reused for
every request on that connection; per request only the request line and the kept lines are joined.

Must not: parse (that is ``proxy.wire.http1``), decide policy, or format values that were not made header-safe by
``proxy.identity`` (identity values) or validated by the config / PROXY parser (API id, VPC endpoint id).
"""

from __future__ import annotations

from typing import Protocol

from .client_cert import CLIENT_CERT_NAMES

class Upstream(Protocol):
    """What the upstream block needs of ``proxy.config.UpstreamConfig``."""

    @property
    def host_header(self) -> str: ...
    @property
    def api_id(self) -> str | None: ...


class CertIdentity(Protocol):
    """What the identity headers need of ``proxy.identity.Identity`` (each value already header-safe)."""

    @property
    def subject(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def thumbprint(self) -> str: ...
    @property
    def serial(self) -> str: ...
    @property
    def xfcc(self) -> str: ...

# Headers that carry identity or forwarding facts the upstream trusts.  Any client-sent copy is dropped, also
# when spelled with "_" for "-" (http1.parse_request_head applies that folding).  x-apigw-api-id is here because
# a client-chosen value could route the request to another private API behind the same execute-api endpoint.
SPOOFABLE = frozenset({
    b"x-client-cert-subject", b"x-client-cert-fingerprint", b"x-client-cert-serial",
    b"x-forwarded-client-cert", b"x-forwarded-for", b"x-forwarded-proto", b"x-client-vpce-id",
    b"x-apigw-api-id", b"forwarded", b"x-real-ip", b"x-forwarded-host", b"x-forwarded-port",
}) | CLIENT_CERT_NAMES  # RFC 9440 Client-Cert, Client-Cert-Chain and the RFC 8705 thumbprint: removed whatever
#                        the configuration (RFC 9440 §2.4: a client must never be able to supply them)


def upstream_block(upstream: Upstream) -> bytes:
    """Host (always the API's name, even when ``connect_to`` dials elsewhere) and x-apigw-api-id."""
    out = b"Host: " + upstream.host_header.encode("ascii") + b"\r\n"
    if upstream.api_id:
        out += b"x-apigw-api-id: " + upstream.api_id.encode("ascii") + b"\r\n"
    return out


def connection_block(upstream: bytes, identity: CertIdentity, client_addr: str, vpce_id: str | None,
                     cert_lines: bytes = b"") -> bytes:
    """Every header the proxy adds to each request of one connection, as one CRLF-terminated block.

    ``cert_lines``: the RFC 9440 lines (``client_cert.rfc9440_lines``) when ``identity.client_cert_header`` is on.
    """
    lines = [
        upstream,
        b"X-Client-Cert-Subject: ", identity.subject.encode("ascii"), b"\r\n",
        b"X-Client-Cert-Fingerprint: ", identity.fingerprint.encode("ascii"), b"\r\n",
        b"X-Client-Cert-Thumbprint: ", identity.thumbprint.encode("ascii"), b"\r\n",
        b"X-Client-Cert-Serial: ", identity.serial.encode("ascii"), b"\r\n",
        b"X-Forwarded-Client-Cert: ", identity.xfcc.encode("ascii"), b"\r\n",
        b"X-Forwarded-For: ", client_addr.encode("ascii"), b"\r\n",
        b"X-Forwarded-Proto: https\r\n",
    ]
    if vpce_id:
        lines += [b"X-Client-Vpce-Id: ", vpce_id.encode("ascii"), b"\r\n"]
    lines.append(cert_lines)
    return b"".join(lines)


def request_head(method: str, target: bytes, fields: bytes, block: bytes, chunked: bool) -> bytes:
    """The head sent upstream: HTTP/1.1 always, the client's end-to-end lines, then the proxy's block."""
    return b"".join((method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", fields, block,
                     CHUNKED_LINE if chunked else b"", b"\r\n"))


CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"
CLOSE_LINE = b"Connection: close\r\n"
KEEP_ALIVE_LINE = b"Connection: keep-alive\r\n"


def response_head(status: int, reason: bytes, fields: bytes, extra: bytes) -> bytes:
    """The head sent to the client: the upstream's end-to-end lines plus framing/connection lines."""
    return b"".join((_STATUS_LINES.get(status) or b"HTTP/1.1 %d " % status, reason, b"\r\n", fields, extra,
                     b"\r\n"))


_STATUS_LINES = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}
