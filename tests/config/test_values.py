"""proxy.config.values: the grammar of single configured values, called directly.

The loader's tests (test_loader.py) keep one row per key to show a problem is reported under that key; the grammar
itself (which addresses, URLs, ids and namespaces are accepted, and what each rule-field check hands the policy to
compile) is tested here.  The policy's own table of refused rule fields is in tests/test_policy.py.
"""

from __future__ import annotations

import pytest

from proxy.config import Address
from proxy.config import values
from proxy.config.values import (
    ALLOW_ALL_RULE,
    API_ID,
    IDENTITY_FIELDS,
    RULE_FIELDS,
    check_cn,
    check_dns,
    check_fingerprint,
    check_method,
    check_namespace,
    check_path,
    check_rule_name,
    check_uri,
    check_vpce,
    missing_identity,
    parse_address,
    parse_url,
)

# ---- addresses -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("0.0.0.0:8443", Address("0.0.0.0", 8443)),
    ("127.0.0.1:0", Address("127.0.0.1", 0)),
    ("localhost:65535", Address("localhost", 65535)),
    ("vpce-0abc-xyz.execute-api.us-east-1.vpce.amazonaws.com:443",
     Address("vpce-0abc-xyz.execute-api.us-east-1.vpce.amazonaws.com", 443)),
    ("[::1]:9443", Address("::1", 9443)),
    ("[::]:80", Address("::", 80)),
    ("[2001:db8::1]:443", Address("2001:db8::1", 443)),
    ("[::ffff:10.0.0.1]:443", Address("::ffff:10.0.0.1", 443)),
    ("host:00080", Address("host", 80)),
])
def test_parse_address(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert type(parse_address(text).port) is int


@pytest.mark.parametrize(("text", "fragment"), [
    ("8443", "expected host:port or [ipv6]:port, got '8443'"),
    (":8443", "expected host:port"),
    ("host:", "expected host:port"),
    ("host:123456", "expected host:port"),  # more than five digits never reaches the range check
    ("::1:8443", "expected host:port"),  # an IPv6 literal needs its brackets
    ("[::1:8443", "expected host:port"),
    ("[::1]8443", "expected host:port"),
    ("[host]:80", "expected host:port"),  # brackets only around an IPv6 literal
    ("a b:80", "expected host:port"),
    ("host:80 ", "expected host:port"),
    ("host:-1", "expected host:port"),
    ("", "expected host:port"),
    ("host:99999", "port 99999 out of range"),
    ("host:65536", "port 65536 out of range"),
    ("[1::2::3]:80", "'::'"),  # ipaddress says at most one '::'
    ("[1:2:3:4:5:6:7:8:9]:80", "Exactly 8 parts expected"),
])
def test_a_bad_address(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert fragment in str(info.value), info.value


# ---- the upstream URL ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("https://api.example.com", ("api.example.com", 443, "")),
    ("https://API.Example.com:443/prod/", ("api.example.com", 443, "/prod")),  # the host compares lowercase
    ("https://api.example.com:8443/a/b", ("api.example.com", 8443, "/a/b")),
    ("https://api.example.com/a/b///", ("api.example.com", 443, "/a/b")),
    ("https://api.example.com/v1/%7Euser:x@y", ("api.example.com", 443, "/v1/%7Euser:x@y")),
    ("https://10.1.2.3/prod", ("10.1.2.3", 443, "/prod")),
    ("https://[::1]:8443/prod", ("::1", 8443, "/prod")),
    ("https://[2001:db8::1]/", ("2001:db8::1", 443, "")),
    ("https://abc123.execute-api.us-east-1.amazonaws.com/prod",
     ("abc123.execute-api.us-east-1.amazonaws.com", 443, "/prod")),
])
def test_parse_url(url: str, expected: tuple[str, int, str]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(("url", "fragment"), [
    ("http://api.example.com/prod", "must be an https:// URL"),
    ("ftp://api.example.com/prod", "must be an https:// URL"),
    ("HTTPS-ish://api.example.com/prod", "must be an https:// URL"),
    ("api.example.com/prod", "must be an https:// URL"),
    ("https://user:secret@api.example.com/prod", "without credentials, query or fragment"),
    ("https://@api.example.com/prod", "without credentials, query or fragment"),
    ("https://api.example.com/prod?stage=1", "without credentials, query or fragment"),
    ("https://api.example.com/prod?", "without credentials, query or fragment"),
    ("https://api.example.com/prod#frag", "without credentials, query or fragment"),
    ("https:///prod", "without credentials, query or fragment"),
    ("https://api.example.com:99999/prod", "out of range"),
    ("https://api.example.com:x/prod", "in 'https://api.example.com:x/prod'"),
    ("https://[::1/prod", "Invalid IPv6 URL"),  # urlsplit raises ValueError; the loader turns it into a line
    ("https://bücher.example/prod", "not an ASCII DNS name"),  # would crash encoding the Host header
    ("https://api example.com/prod", "not an ASCII DNS name"),
    ("https://api_x.example.com/prod", "not an ASCII DNS name"),
    ("https://-api.example.com/prod", "not an ASCII DNS name"),
    (f"https://{'a' * 64}.example.com/prod", "not an ASCII DNS name"),  # a label is at most 63 characters
    ("https://api.example.com/pr od", "bad base path"),
    ("https://api.example.com/prod/\u00e9", "bad base path"),
    ("https://api.example.com/a//b", "bad base path"),  # an empty segment inside the base path
])
def test_a_bad_upstream_url(url: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert fragment in str(info.value), info.value
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("url", ["https://user:secret@api.example.com/prod", "http://user:secret@api.example.com/",
                                 "https://user:secret@api.example.com:99999/", "https://user:secret@api.example.com:x/",
                                 "ftp://secret@api.example.com/"])
def test_a_password_in_the_url_is_never_echoed(url: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_url(url)
    assert "secret" not in str(info.value), info.value


def test_the_url_shown_masks_only_the_userinfo() -> None:
    with pytest.raises(ValueError) as info:
        parse_url("http://user:secret@api.example.com/prod")
    assert str(info.value) == ("must be an https:// URL (upstream TLS is always used), "
                               "got 'http://***@api.example.com/prod'")


# ---- API Gateway ids and CloudWatch namespaces --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "ok"), [
    ("abc123", True), ("x", True), ("a" * 64, True), ("0123456789", True),
    ("", False), ("ABC123", False), ("abc-123", False), ("abc_123", False), ("a" * 65, False), ("abc 1", False),
])
def test_api_id(text: str, ok: bool) -> None:
    assert bool(API_ID.fullmatch(text)) is ok


@pytest.mark.parametrize("namespace", ["mtls-proxy", "mtls-proxy/prod-stack", "A.b_c#d:e/f-g", "n" * 255, "aws/x",
                                       "MyAWS/x"])
def test_a_good_namespace(namespace: str) -> None:
    assert check_namespace(namespace) is None


@pytest.mark.parametrize(("namespace", "problem"), [
    ("AWS/ApplicationELB", "'AWS/ApplicationELB': the AWS/ prefix is reserved for AWS services"),
    ("AWS/", "'AWS/': the AWS/ prefix is reserved for AWS services"),
    ("has space", "not a CloudWatch namespace: 'has space' (1-255 characters: letters, digits and . _ # : / -)"),
    ("", "not a CloudWatch namespace: '' (1-255 characters: letters, digits and . _ # : / -)"),
    ("n" * 256, f"not a CloudWatch namespace: '{'n' * 256}' (1-255 characters: letters, digits and . _ # : / -)"),
    ("caf\u00e9", "not a CloudWatch namespace: 'caf\u00e9' (1-255 characters: letters, digits and . _ # : / -)"),
])
def test_a_bad_namespace(namespace: str, problem: str) -> None:
    assert check_namespace(namespace) == problem


# ---- [[allow]] fields: what each check accepts and the value the policy compiles ----------------------------------


def test_rule_fields_are_every_list_field_of_a_rule() -> None:
    assert RULE_FIELDS == {"subject_cn": check_cn, "san_dns": check_dns, "san_uri": check_uri,
                           "fingerprint_sha256": check_fingerprint, "source_vpce": check_vpce,
                           "methods": check_method, "paths": check_path}
    assert set(IDENTITY_FIELDS) < set(RULE_FIELDS) and "source_vpce" not in IDENTITY_FIELDS


@pytest.mark.parametrize(("check", "value", "compiled"), [
    (check_cn, "Client A, Inc. / ünïcode", "Client A, Inc. / ünïcode"),  # any text is a CN
    (check_dns, "API.Partner.Example", "api.partner.example"),  # DNS names compare lowercase
    (check_dns, "*.partner.example", "*.partner.example"),
    (check_dns, "**.partner.example", "**.partner.example"),
    (check_dns, "_svc.p-1.example", "_svc.p-1.example"),
    (check_uri, "spiffe://td/ns/Prod/*", "spiffe://td/ns/Prod/*"),  # URIs are case-sensitive: unchanged
    (check_uri, "spiffe://td/**", "spiffe://td/**"),
    (check_uri, "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66", "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66"),
    (check_uri, "spiffe://td/a%2fb", "spiffe://td/a%2fb"),
    (check_path, "/orders/*", "/orders/*"),
    (check_path, "/orders/**", "/orders/**"),
    (check_path, "/", "/"),
    (check_path, "/a%2fb/%c3%a9", "/a%2Fb/%C3%A9"),  # compared with normalised request paths: uppercase hex
    (check_fingerprint, ":".join(["AB"] * 32), "ab" * 32),
    (check_fingerprint, "0F" * 32, "0f" * 32),
    (check_vpce, "vpce-0123456789abcdef0", "vpce-0123456789abcdef0"),
    (check_method, "GET", "GET"),
    (check_method, "M-SEARCH", "M-SEARCH"),
    (check_method, "X_CUSTOM2", "X_CUSTOM2"),
])
def test_an_accepted_field_value_and_what_is_compiled(check: values.Check, value: str, compiled: str) -> None:
    assert check(value) == (None, compiled)


@pytest.mark.parametrize(("check", "value", "problem"), [
    (check_dns, "a..b", "empty label in 'a..b'"),
    (check_dns, "a.*b*.example", None),  # a single '*' may sit anywhere in a label
    (check_uri, "td/x", "must start with a URI scheme such as 'spiffe:' in 'td/x'"),
    (check_uri, "spiffe://td/%2", "'%' must start a %XX escape in 'spiffe://td/%2'"),
    (check_path, "/a/%7e", "'%7e' never occurs in a normalised path, write '~' in '/a/%7e'"),
    (check_path, "/a/%41", "'%41' never occurs in a normalised path, write 'A' in '/a/%41'"),
    (check_path, "/a/%zz", "'%' must start a %XX escape in '/a/%zz'"),
    (check_path, "/a/.", "'.' and '..' segments never occur in a normalised path: '/a/.'"),
    (check_path, "/a/**b", "'**' must be a whole segment in '/a/**b'"),
    (check_path, "/caf\u00e9", "invalid character in '/caf\u00e9' (RFC 3986 path characters only)"),
    (check_fingerprint, "ab" * 31, f"must be 64 hex digits (SHA-256), colons allowed, got '{'ab' * 31}'"),
    (check_vpce, "vpce-", "must look like 'vpce-0123456789abcdef0', got 'vpce-'"),
    (check_vpce, "vpce-0ABC", "must look like 'vpce-0123456789abcdef0', got 'vpce-0ABC'"),
    (check_vpce, "vpce-" + "a" * 33, f"must look like 'vpce-0123456789abcdef0', got 'vpce-{'a' * 33}'"),
    (check_vpce, " vpce-0abc", "must look like 'vpce-0123456789abcdef0', got ' vpce-0abc'"),
    (check_method, "get", "must be an uppercase HTTP method such as 'GET', got 'get'"),
    (check_method, "M.X", "must be an uppercase HTTP method such as 'GET', got 'M.X'"),
    (check_method, "1GET", "must be an uppercase HTTP method such as 'GET', got '1GET'"),
    (check_method, "GET ", "must be an uppercase HTTP method such as 'GET', got 'GET '"),
])
def test_a_field_value_and_its_problem(check: values.Check, value: str, problem: str | None) -> None:
    assert check(value)[0] == problem


# ---- rule names and identity ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "problem"), [
    ("partner-a", None), ("Allow_All_Verified", None), (" ", None),
    ("", "must not be empty"), (ALLOW_ALL_RULE, "'allow_all_verified' is reserved"),
])
def test_check_rule_name(name: str, problem: str | None) -> None:
    assert check_rule_name(name) == problem
    assert ALLOW_ALL_RULE == "allow_all_verified"  # the name the access log and metrics carry for that decision


@pytest.mark.parametrize("field", IDENTITY_FIELDS)
def test_any_one_identity_field_is_enough(field: str) -> None:
    assert missing_identity({field: ("x",)}) is None


@pytest.mark.parametrize("fields", [{}, {f: () for f in IDENTITY_FIELDS}, {"source_vpce": ("vpce-1",)},
                                    {"methods": ("GET",), "paths": ("/",)}])
def test_no_identity_field(fields: dict[str, object]) -> None:
    assert missing_identity(fields) == (
        "needs at least one identity field (subject_cn, san_dns, san_uri, fingerprint_sha256)")
