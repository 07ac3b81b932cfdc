"""proxy.errors: every ProxyError carries the status and machine code its answer uses, and the upstream kinds are
exactly the metric's label set."""

from __future__ import annotations

import pytest

from proxy import errors


def proxy_errors() -> list[type[errors.ProxyError]]:
    out, todo = [], [errors.ProxyError]
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo += cls.__subclasses__()
    return out


def test_codes_are_unique_and_statuses_are_client_or_gateway_errors() -> None:
    classes = proxy_errors()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), codes
    assert all(cls.status == 500 or 400 <= cls.status < 600 for cls in classes)


@pytest.mark.parametrize(("cls", "status", "code"), [
    (errors.BadRequest, 400, "bad_request"), (errors.RequestTimeout, 408, "request_timeout"),
    (errors.PayloadTooLarge, 413, "payload_too_large"), (errors.UriTooLong, 414, "uri_too_long"),
    (errors.ExpectationFailed, 417, "expectation_failed"), (errors.HeadersTooLarge, 431, "headers_too_large"),
    (errors.NotImplementedCoding, 501, "unsupported_transfer_coding"),
    (errors.VersionNotSupported, 505, "http_version_not_supported"),
    (errors.UpstreamConnectError, 502, "upstream_unreachable"), (errors.UpstreamTLSError, 502, "upstream_tls_error"),
    (errors.UpstreamProtocolError, 502, "upstream_bad_response"), (errors.UpstreamClosed, 502, "upstream_closed"),
    (errors.UpstreamTimeout, 504, "upstream_timeout"),
])
def test_status_and_code(cls: type[errors.ProxyError], status: int, code: str) -> None:
    exc = cls("why")
    assert (exc.status, exc.code, exc.detail, str(exc)) == (status, code, "why", "why")
    assert cls().detail == code  # no detail: the code says it


def test_forbidden_carries_the_policy_reason() -> None:
    exc = errors.Forbidden("no rule", "no_rule_for_client")
    assert (exc.status, exc.code, exc.reason, exc.detail) == (403, "forbidden", "no_rule_for_client", "no rule")


def test_upstream_error_kinds_are_every_kind_a_class_carries() -> None:
    kinds = {cls.kind for cls in proxy_errors() if issubclass(cls, errors.UpstreamError)}
    assert set(errors.UPSTREAM_ERROR_KINDS) == kinds
    assert len(errors.UPSTREAM_ERROR_KINDS) == len(kinds)


def test_config_errors_are_one_line_each_naming_the_key() -> None:
    one = errors.ConfigError("server.listen", "bad port")
    both = errors.ConfigErrors([one, errors.ConfigError("allow[0].name", "required")])
    assert (one.key, one.message, str(one)) == ("server.listen", "bad port", "server.listen: bad port")
    assert str(both) == "server.listen: bad port\nallow[0].name: required"
