"""Tests for proxy.policy: every rule field (glob tables through real rules), bypass attempts after path
normalisation, the combination rules, allow_all_verified, decision reuse, and every PolicyError message."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from proxy.identity import Identity
from proxy.policy import REASONS, Decision, Policy, PolicyError
from proxy.wire.paths import normalize_path

FP = "ab" * 32


@dataclass(frozen=True, slots=True)
class Rule:
    """Same fields as proxy.config.AllowRule."""

    name: str = "r"
    subject_cn: tuple[str, ...] = ()
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    fingerprint_sha256: tuple[str, ...] = ()
    source_vpce: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


def ident(cn: tuple[str, ...] = ("client",), dns: tuple[str, ...] = (), uri: tuple[str, ...] = (),
          fp: str = FP) -> Identity:
    return Identity(subject="CN=client", common_names=cn, san_dns=dns, san_uri=uri, serial="1",
                    fingerprint=fp, not_after=0.0, xfcc=f'Hash={fp};Subject="CN=client"')


def decide(rules: list[Rule], identity: Identity | None = None, method: str = "GET", path: str = "/",
           vpce: str | None = None, allow_all: bool = False) -> Decision:
    policy = Policy.compile(rules, allow_all_verified=allow_all)
    return policy.for_connection(identity or ident(), vpce).decide(method, path)


def allowed(rules: list[Rule], **kwargs: object) -> bool:
    return decide(rules, **kwargs).allowed  # type: ignore[arg-type]


# --- identity fields --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule_cns", "cert_cns", "ok"),
    [
        (("partner-a",), ("partner-a",), True),
        (("partner-a",), ("Partner-A",), False),  # exact, case-sensitive
        (("partner-a",), ("partner-a ",), False),
        (("partner-a",), ("other", "partner-a"), True),  # any CN of the certificate
        (("x", "partner-a"), ("partner-a",), True),  # any entry of the rule
        (("partner-a",), (), False),
        (("partner-*",), ("partner-a",), False),  # CNs are never globs
    ],
)
def test_subject_cn(rule_cns: tuple[str, ...], cert_cns: tuple[str, ...], ok: bool) -> None:
    assert allowed([Rule(subject_cn=rule_cns)], identity=ident(cn=cert_cns)) is ok


@pytest.mark.parametrize(
    ("pattern", "san", "ok"),
    [
        ("a.example.com", "a.example.com", True),
        ("a.example.com", "b.example.com", False),
        ("a.example.com", "a.example.com.evil", False),
        ("A.Example.COM", "a.example.com", True),  # case-insensitive both ways
        ("a.example.com", "A.EXAMPLE.COM", True),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a.b.example.com", False),  # '*' never crosses '.'
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("**.example.com", "a.example.com", True),
        ("**.example.com", "a.b.example.com", True),  # '**' crosses labels
        ("**.example.com", "example.com", True),  # zero labels
        ("**.example.com", "badexample.com", False),
        ("api-*.example.com", "api-eu.example.com", True),
        ("api-*.example.com", "api-.example.com", True),
        ("api-*.example.com", "api-eu.x.example.com", False),
        ("*.*.example.com", "x.y.example.com", True),
        ("*", "localhost", True),
        ("*", "a.b", False),
        ("**", "a.b.c", True),
        ("a.**", "a", True),
        ("a.**", "a.b.c", True),
        ("a.**", "ab.c", False),
        ("a.**.z", "a.z", True),
        ("a.**.z", "a.b.c.z", True),
        ("a.**.z", "a.b.c", False),
        ("**.b.**", "a.b.c", True),
        ("**.b.**", "a.c", False),
        ("x.**.m*.**.z", "x.1.m2.3.z", True),
        ("x.**.m*.**.z", "x.1.2.3.z", False),
        ("k.example.com", "\u212a.example.com", False),  # KELVIN SIGN lowercases to 'k': never matches
        ("*.example.com", "\u00e9.example.com", False),  # non-ASCII SANs never match
        ("xn--caf-dma.example", "xn--caf-dma.example", True),
    ],
)
def test_san_dns_glob(pattern: str, san: str, ok: bool) -> None:
    assert allowed([Rule(san_dns=(pattern,))], identity=ident(dns=(san,))) is ok


def test_san_dns_any_of_many_sans() -> None:
    identity = ident(dns=tuple(f"h{i}.example" for i in range(5000)) + ("api.partner.example",))
    assert allowed([Rule(san_dns=("*.partner.example",))], identity=identity)
    assert not allowed([Rule(san_dns=("*.nobody.example",))], identity=identity)


@pytest.mark.parametrize(
    ("pattern", "san", "ok"),
    [
        ("spiffe://td/ns/prod/sa/api", "spiffe://td/ns/prod/sa/api", True),
        ("spiffe://td/ns/*/sa/*", "spiffe://td/ns/prod/sa/api", True),
        ("spiffe://td/ns/*", "spiffe://td/ns/a/b", False),  # '*' never crosses '/'
        ("spiffe://td/**", "spiffe://td/ns/a/b", True),
        ("spiffe://td/**", "spiffe://td", True),
        ("spiffe://td/**", "spiffe://td2/x", False),
        ("spiffe://td/a*c", "spiffe://td/abc", True),
        ("spiffe://td/a*c", "spiffe://td/ab/c", False),
        ("spiffe://TD/x", "spiffe://td/x", False),  # case-sensitive
        ("spiffe://*/x", "spiffe://any.domain/x", True),
        ("urn:uuid:*", "urn:uuid:1234", True),
    ],
)
def test_san_uri_glob(pattern: str, san: str, ok: bool) -> None:
    assert allowed([Rule(san_uri=(pattern,))], identity=ident(uri=(san,))) is ok


@pytest.mark.parametrize(
    "written",
    [FP, FP.upper(), ":".join(FP[i : i + 2] for i in range(0, 64, 2)),
     ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper()],
)
def test_fingerprint_formats(written: str) -> None:
    assert allowed([Rule(fingerprint_sha256=(written,))], identity=ident(fp=FP))
    assert not allowed([Rule(fingerprint_sha256=(written,))], identity=ident(fp="cd" * 32))


@pytest.mark.parametrize(
    ("rule_vpces", "vpce", "ok"),
    [
        (("vpce-0a1b2c3d4e5f60718",), "vpce-0a1b2c3d4e5f60718", True),
        (("vpce-0a1b2c3d4e5f60718",), "vpce-0000000000000000f", False),
        (("vpce-0a1b2c3d4e5f60718",), None, False),  # None never matches
        (("vpce-0000000000000000f", "vpce-0a1b2c3d4e5f60718"), "vpce-0a1b2c3d4e5f60718", True),
        ((), None, True),  # no source_vpce: any connection
        ((), "vpce-0a1b2c3d4e5f60718", True),
    ],
)
def test_source_vpce(rule_vpces: tuple[str, ...], vpce: str | None, ok: bool) -> None:
    assert allowed([Rule(subject_cn=("client",), source_vpce=rule_vpces)], vpce=vpce) is ok


def test_wrong_vpce_is_explained() -> None:
    decision = decide([Rule(subject_cn=("client",), source_vpce=("vpce-0a1b",))], vpce="vpce-ffff")
    assert (decision.allowed, decision.reason) == (False, "no_rule_for_client")
    assert "VPC endpoint" in decision.detail
    nobody = decide([Rule(subject_cn=("other",))], vpce="vpce-ffff")
    assert nobody.detail == "no allow rule matches this client certificate"


# --- request fields ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "method", "reason"),
    [
        (("GET",), "GET", "allowed"),
        (("GET", "HEAD"), "HEAD", "allowed"),
        (("GET",), "get", "method_not_allowed"),  # methods are case-sensitive (RFC 9110 §9.1)
        (("GET",), "POST", "method_not_allowed"),
        ((), "PURGE", "allowed"),  # no methods: any
    ],
)
def test_methods(methods: tuple[str, ...], method: str, reason: str) -> None:
    decision = decide([Rule(subject_cn=("client",), methods=methods)], method=method)
    assert decision.reason == reason
    assert decision.allowed is (reason == "allowed") and (decision.rule is None) is (reason != "allowed")


@pytest.mark.parametrize(
    ("pattern", "path", "ok"),
    [
        ("/v1/items", "/v1/items", True),
        ("/v1/items", "/v1/items/", False),
        ("/v1/items", "/V1/items", False),
        ("/v1/*", "/v1/x", True),
        ("/v1/*", "/v1/", True),  # '*' matches zero characters
        ("/v1/*", "/v1", False),
        ("/v1/*", "/v1/x/y", False),  # '*' never crosses '/'
        ("/v1/*", "/v1/x%2Fy", True),  # an encoded slash is not a separator
        ("/v1/**", "/v1", True),
        ("/v1/**", "/v1/", True),
        ("/v1/**", "/v1/a/b/c", True),
        ("/v1/**", "/v1x", False),
        ("/v1/**", "/v2/a", False),
        ("/v1/*/items", "/v1/7/items", True),
        ("/v1/*/items", "/v1/7/8/items", False),
        ("/v1/**/items", "/v1/items", True),
        ("/v1/**/items", "/v1/a/b/items", True),
        ("/v1/**/items", "/v1/a/b", False),
        ("/files/*.json", "/files/a.json", True),
        ("/files/*.json", "/files/.json", True),
        ("/files/*.json", "/files/a.json/x", False),
        ("/files/*.json", "/files/a.jso", False),
        ("/a/*b*c", "/a/xbyc", True),
        ("/a/*b*c", "/a/bc", True),
        ("/a/*b*c", "/a/cb", False),
        ("/a/*a*a", "/a/aa", True),
        ("/a/*a*a", "/a/a", False),  # pieces may not overlap
        ("/a/x*b*b*y", "/a/xby", False),
        ("/a/x*b*b*y", "/a/xbby", True),
        ("/**/a/**/a/**", "/a", False),  # '**'-separated runs may not overlap either
        ("/**/a/**/a/**", "/x/a/y/a", True),
        ("/a%2Fb", "/a%2fb", True),  # remaining %XX compare with case-insensitive hex (RFC 3986 §6.2.2.1)
        ("/a%2fb", "/a%2Fb", True),
        ("/a%2Fb", "/a/b", False),
        ("/a%2Fb", "/a%3Fb", False),  # a different escape is a different path
        ("/a%2Fb", "/ab", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/", "/", True),
        ("/", "/x", False),
        ("/*", "//", False),
        ("/x/**/y/**/z", "/x/y/z", True),
        ("/x/**/y/**/z", "/x/1/y/2/3/z", True),
        ("/x/**/y/**/z", "/x/1/2/3/z", False),
        ("/x/**/y/*/**", "/x/y", False),
        ("/x/**/y/*/**", "/x/q/y/r", True),
    ],
)
def test_path_glob(pattern: str, path: str, ok: bool) -> None:
    decision = decide([Rule(subject_cn=("client",), paths=(pattern,))], path=path)
    assert decision.allowed is ok
    assert decision.reason == ("allowed" if ok else "path_not_allowed")


def test_bypass_attempts_are_matched_after_normalisation() -> None:
    rules = [Rule(subject_cn=("client",), paths=("/public/**",))]
    for raw in ["/public/../admin", "/public/%2e%2e/admin", "/public/%2E%2e/admin", "/public/.%2e/admin"]:
        assert not allowed(rules, path=normalize_path(raw)), raw
    # stays one segment below /public: allowed, and forwarded exactly like that
    assert allowed(rules, path=normalize_path("/public/..%2fadmin"))
    assert allowed(rules, path=normalize_path("/public/%252e%252e/admin"))
    assert not allowed(rules, path=normalize_path("//public/x"))


# --- combinations -----------------------------------------------------------------------------------------


def test_and_within_a_rule() -> None:
    rule = Rule(subject_cn=("client",), san_dns=("api.partner.example",), methods=("GET",), paths=("/v1/**",))
    both = ident(cn=("client",), dns=("api.partner.example",))
    assert allowed([rule], identity=both, path="/v1/x")
    assert decide([rule], identity=ident(cn=("client",)), path="/v1/x").reason == "no_rule_for_client"
    assert decide([rule], identity=ident(cn=("x",), dns=("api.partner.example",))).reason == "no_rule_for_client"
    assert decide([rule], identity=both, method="POST", path="/v1/x").reason == "method_not_allowed"
    assert decide([rule], identity=both, path="/v2").reason == "path_not_allowed"


def test_or_across_rules_first_match_names_the_decision() -> None:
    rules = [
        Rule("reader", subject_cn=("client",), methods=("GET",), paths=("/r/**",)),
        Rule("writer", subject_cn=("client",), methods=("POST",), paths=("/w/**",)),
        Rule("stranger", subject_cn=("someone-else",)),
        Rule("broad", subject_cn=("client",), methods=("GET",)),
    ]
    assert decide(rules, method="GET", path="/r/1").rule == "reader"
    assert decide(rules, method="POST", path="/w/1").rule == "writer"
    assert decide(rules, method="GET", path="/w/1").rule == "broad"
    assert decide(rules, method="POST", path="/r/1").reason == "path_not_allowed"
    assert decide(rules, method="DELETE", path="/r/1").reason == "method_not_allowed"
    policy = Policy.compile(rules, allow_all_verified=False)
    assert policy.rule_names == ("reader", "writer", "stranger", "broad")
    assert policy.for_connection(ident(), None).rule_names == ("reader", "writer", "broad")


def test_deny_by_default() -> None:
    decision = decide([])
    assert decision == Decision(False, None, "no_rule_for_client", "no allow rule matches this client certificate")
    assert decide([Rule(subject_cn=("someone-else",))]).reason == "no_rule_for_client"


def test_allow_all_verified() -> None:
    assert decide([], allow_all=True) == Decision(
        True, "allow_all_verified", "allowed", "allowed: any verified client (allow_all_verified)"
    )
    rules = [Rule("partner", subject_cn=("client",), paths=("/p/**",)), Rule("other", subject_cn=("x",))]
    assert decide(rules, path="/p/1", allow_all=True).rule == "partner"  # explicit rules first, for the logs
    assert decide(rules, path="/elsewhere", allow_all=True).rule == "allow_all_verified"
    assert decide(rules, identity=ident(cn=("nobody",)), allow_all=True).rule == "allow_all_verified"
    assert decide(rules, identity=ident(cn=("nobody",)), allow_all=False).allowed is False


def test_decisions_are_preallocated() -> None:
    rules = [Rule("a", subject_cn=("client",), methods=("GET",), paths=("/v1/*",))]
    policy = Policy.compile(rules, allow_all_verified=False)
    first, second = policy.for_connection(ident(), None), policy.for_connection(ident(), "vpce-1")
    assert first.decide("GET", "/v1/x") is second.decide("GET", "/v1/y")
    stranger = ident(cn=("nobody",))
    assert policy.for_connection(stranger, None) is policy.for_connection(stranger, None)
    assert policy.for_connection(stranger, None).decide("GET", "/") is policy.for_connection(
        stranger, None).decide("POST", "/x")
    everyone = Policy.compile([], allow_all_verified=True).for_connection(stranger, None)
    assert everyone.decide("GET", "/a") is everyone.decide("PUT", "/b")


def test_denial_detail_echoes_only_escaped_bounded_method_and_path() -> None:
    rules = [Rule(subject_cn=("client",), methods=("GET",), paths=("/ok",))]
    detail = decide(rules, path="/x\r\nSet-Cookie: a\x00").detail
    assert detail == "GET /x\\x0d\\x0aSet-Cookie: a\\x00 is not allowed for this client certificate"
    long = decide(rules, path="/" + "a" * 5000).detail
    assert len(long) < 300 and "..." in long
    assert decide(rules, method="PO\nST").detail == "method PO\\x0aST is not allowed for this client certificate"
    for decision in (decide(rules, path="/x"), decide(rules, method="PUT"), decide([])):
        assert decision.reason in REASONS


# --- PolicyError ------------------------------------------------------------------------------------------

NEEDS = "needs at least one identity field (subject_cn, san_dns, san_uri, fingerprint_sha256)"
CN = ("client",)


POLICY_ERRORS = [
        (Rule("p", source_vpce=("vpce-1",), methods=("GET",)), f"allow[0] (p): {NEEDS}"),
        (Rule(""), "allow[0] (): name: must not be empty"),
        (Rule("allow_all_verified", subject_cn=CN), "allow[0] (allow_all_verified): name: 'allow_all_verified' is reserved"),
        (Rule("p", subject_cn=("",)), "allow[0] (p): subject_cn[0]: must not be empty"),
        (Rule("p", subject_cn="client"), "allow[0] (p): subject_cn: must be a list of strings"),  # type: ignore[arg-type]
        (Rule("p", subject_cn=(1,)), "allow[0] (p): subject_cn[0]: must be a string"),  # type: ignore[arg-type]
        (Rule("p", san_dns=("a..b",)), "allow[0] (p): san_dns[0]: empty label in 'a..b'"),
        (Rule("p", san_dns=(".example.com",)), "allow[0] (p): san_dns[0]: empty label in '.example.com'"),
        (Rule("p", san_dns=("example.com.",)), "allow[0] (p): san_dns[0]: empty label in 'example.com.'"),
        (Rule("p", san_dns=("a b.com",)),
         "allow[0] (p): san_dns[0]: invalid character in 'a b.com' (letters, digits, '-', '_', '.', '*')"),
        (Rule("p", san_dns=("a/b.com",)),
         "allow[0] (p): san_dns[0]: invalid character in 'a/b.com' (letters, digits, '-', '_', '.', '*')"),
        (Rule("p", san_dns=("a**.com",)), "allow[0] (p): san_dns[0]: '**' must be a whole label in 'a**.com'"),
        (Rule("p", san_dns=("***.com",)), "allow[0] (p): san_dns[0]: '**' must be a whole label in '***.com'"),
        (Rule("p", san_uri=("td/x",)), "allow[0] (p): san_uri[0]: must start with a URI scheme such as 'spiffe:' in 'td/x'"),
        (Rule("p", san_uri=("spiffe://td/a b",)),
         "allow[0] (p): san_uri[0]: invalid character in 'spiffe://td/a b' (RFC 3986 characters only)"),
        (Rule("p", san_uri=("spiffe://td/%zz",)), "allow[0] (p): san_uri[0]: '%' must start a %XX escape in 'spiffe://td/%zz'"),
        (Rule("p", san_uri=("spiffe://td/a**",)),
         "allow[0] (p): san_uri[0]: '**' must be a whole segment in 'spiffe://td/a**'"),
        (Rule("p", fingerprint_sha256=("abc",)),
         "allow[0] (p): fingerprint_sha256[0]: must be 64 hex digits (SHA-256), colons allowed, got 'abc'"),
        (Rule("p", fingerprint_sha256=(FP + "0",)),
         f"allow[0] (p): fingerprint_sha256[0]: must be 64 hex digits (SHA-256), colons allowed, got '{FP}0'"),
        (Rule("p", fingerprint_sha256=("g" * 64,)),
         f"allow[0] (p): fingerprint_sha256[0]: must be 64 hex digits (SHA-256), colons allowed, got '{'g' * 64}'"),
        (Rule("p", subject_cn=CN, source_vpce=("vpc-123",)),
         "allow[0] (p): source_vpce[0]: must look like 'vpce-0123456789abcdef0', got 'vpc-123'"),
        (Rule("p", subject_cn=CN, source_vpce=("VPCE-12AB",)),
         "allow[0] (p): source_vpce[0]: must look like 'vpce-0123456789abcdef0', got 'VPCE-12AB'"),
        (Rule("p", subject_cn=CN, methods=("get",)),
         "allow[0] (p): methods[0]: must be an uppercase HTTP method such as 'GET', got 'get'"),
        (Rule("p", subject_cn=CN, methods=("G ET",)),
         "allow[0] (p): methods[0]: must be an uppercase HTTP method such as 'GET', got 'G ET'"),
        (Rule("p", subject_cn=CN, methods=("GET", "")), "allow[0] (p): methods[1]: must not be empty"),
        (Rule("p", subject_cn=CN, paths=("v1",)), "allow[0] (p): paths[0]: must start with '/'"),
        (Rule("p", subject_cn=CN, paths=("",)), "allow[0] (p): paths[0]: must not be empty"),
        (Rule("p", subject_cn=CN, paths=("/a?b=1",)),
         "allow[0] (p): paths[0]: paths are matched without query or fragment: '/a?b=1'"),
        (Rule("p", subject_cn=CN, paths=("/a#b",)),
         "allow[0] (p): paths[0]: paths are matched without query or fragment: '/a#b'"),
        (Rule("p", subject_cn=CN, paths=("/a b",)),
         "allow[0] (p): paths[0]: invalid character in '/a b' (RFC 3986 path characters only)"),
        (Rule("p", subject_cn=CN, paths=("/caf\u00e9",)),
         "allow[0] (p): paths[0]: invalid character in '/caf\u00e9' (RFC 3986 path characters only)"),
        (Rule("p", subject_cn=CN, paths=("/a/%4",)), "allow[0] (p): paths[0]: '%' must start a %XX escape in '/a/%4'"),
        (Rule("p", subject_cn=CN, paths=("/a/%g1",)), "allow[0] (p): paths[0]: '%' must start a %XX escape in '/a/%g1'"),
        (Rule("p", subject_cn=CN, paths=("/a/%1g",)), "allow[0] (p): paths[0]: '%' must start a %XX escape in '/a/%1g'"),
        (Rule("p", subject_cn=CN, paths=("/%41",)),
         "allow[0] (p): paths[0]: '%41' never occurs in a normalised path, write 'A' in '/%41'"),
        (Rule("p", subject_cn=CN, paths=("/a/%2e%2e/b",)),
         "allow[0] (p): paths[0]: '%2e' never occurs in a normalised path, write '.' in '/a/%2e%2e/b'"),
        (Rule("p", subject_cn=CN, paths=("/a/../b",)),
         "allow[0] (p): paths[0]: '.' and '..' segments never occur in a normalised path: '/a/../b'"),
        (Rule("p", subject_cn=CN, paths=("/a/.",)),
         "allow[0] (p): paths[0]: '.' and '..' segments never occur in a normalised path: '/a/.'"),
        (Rule("p", subject_cn=CN, paths=("/a**",)), "allow[0] (p): paths[0]: '**' must be a whole segment in '/a**'"),
        (Rule("p", subject_cn=CN, paths=("/***",)), "allow[0] (p): paths[0]: '**' must be a whole segment in '/***'"),
]


@pytest.mark.parametrize(("rule", "message"), POLICY_ERRORS)
def test_policy_error_messages(rule: Rule, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.compile([rule], allow_all_verified=False)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_policy_error_names_the_rule_index() -> None:
    rules = [Rule("partner-a", subject_cn=CN), Rule("partner-b", subject_cn=CN, paths=("v1",))]
    with pytest.raises(PolicyError, match=re.escape("allow[1] (partner-b): paths[0]: must start with '/'")):
        Policy.compile(rules, allow_all_verified=False)


def test_duplicate_rule_names() -> None:
    rules = [Rule("a", subject_cn=CN), Rule("b", subject_cn=CN), Rule("a", subject_cn=("x",))]
    with pytest.raises(PolicyError) as info:
        Policy.compile(rules, allow_all_verified=True)
    assert str(info.value) == "allow[2] (a): name: duplicate rule name (also allow[0])"


def test_valid_patterns_compile() -> None:
    Policy.compile(
        [Rule("ok", subject_cn=("Any text, even = and ,",), san_dns=("_svc.*.example.com", "**"),
              san_uri=("spiffe://td/**", "https://x.example/a;b=c?d#e", "urn:x:%2F"),
              fingerprint_sha256=(FP.upper(),), source_vpce=("vpce-0a1b2c3d4e5f60718",),
              methods=("GET", "M-SEARCH"), paths=("/", "/**", "/a%2Fb/*", "/~user/@me:x/*.json"))],
        allow_all_verified=False,
    )
