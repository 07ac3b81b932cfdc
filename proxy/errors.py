"""The proxy's error vocabulary.

Owns: one small hierarchy of exceptions that carry the HTTP status and a stable machine code, plus the
configuration errors that name the offending key.  Library exceptions (ssl, OSError, cryptography) are
translated into these where the library is called; ``proxy.wire.responses.error_response`` is the single place
that turns a ``ProxyError`` into response bytes (called from ``Exchange._refuse`` in ``proxy.exchange``).

Must not: format responses, log, or know about connections.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A request could not be served; ``status`` and ``code`` say how the client is answered."""

    status = 500
    code = "internal_error"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code


class BadRequest(ProxyError):
    status, code = 400, "bad_request"


class Forbidden(ProxyError):
    status, code = 403, "forbidden"

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason


class TooManyRequests(ProxyError):
    """A partner's ``[[allow]] rate_limit`` is used up; ``retry_after`` is whole seconds (RFC 9110 §10.2.3)."""

    status, code, reason = 429, "too_many_requests", "rate_limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class IdentityTooLarge(ProxyError):
    """The headers the proxy adds (the client certificate above all) would push the request past API Gateway's
    limit on the request line plus headers: refused here, with a reason, instead of by the gateway."""

    status, code = 431, "identity_too_large"


class RequestTimeout(ProxyError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(ProxyError):
    status, code = 413, "payload_too_large"


class UriTooLong(ProxyError):
    status, code = 414, "uri_too_long"


class ExpectationFailed(ProxyError):
    status, code = 417, "expectation_failed"


class HeadersTooLarge(ProxyError):
    status, code = 431, "headers_too_large"


class NotImplementedCoding(ProxyError):
    status, code = 501, "unsupported_transfer_coding"


class VersionNotSupported(ProxyError):
    status, code = 505, "http_version_not_supported"


class UpstreamError(ProxyError):
    """The upstream could not produce a usable response; ``kind`` is the metric label."""

    status, code, kind = 502, "upstream_error", "other"


class UpstreamConnectError(UpstreamError):
    code, kind = "upstream_unreachable", "connect"


class UpstreamTLSError(UpstreamError):
    code, kind = "upstream_tls_error", "tls"


class UpstreamProtocolError(UpstreamError):
    code, kind = "upstream_bad_response", "protocol"


class UpstreamClosed(UpstreamError):
    """The upstream closed or reset the connection before a complete response."""

    code, kind = "upstream_closed", "closed"


class UpstreamTimeout(UpstreamError):
    status, code, kind = 504, "upstream_timeout", "timeout"


# Every UpstreamError.kind (metric labels of mtls_proxy_upstream_errors; each exists from the start).
UPSTREAM_ERROR_KINDS = tuple(dict.fromkeys(
    cls.kind for cls in (UpstreamConnectError, UpstreamTLSError, UpstreamProtocolError, UpstreamClosed,
                         UpstreamTimeout, UpstreamError)))


class ConfigError(Exception):
    """One configuration problem: ``key`` is the dotted key, env var or file that is wrong."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ConfigErrors(Exception):
    """Every problem found while loading a configuration (one line each)."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors
