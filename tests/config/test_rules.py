"""proxy.config.rules: the ``allow_from`` document format (JSON or TOML) and the checks every ``AllowRule`` passes,
each problem under the rule's own key.  The checks are called with a tiny collector, the way the loader calls them;
the last test goes through ``config.load`` to show an external document is checked exactly like inline rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from proxy import config
from proxy.config import AllowRule
from proxy.config.rules import MAX_BURST, MAX_RATE, check_limit, check_rule, parse_rules_document
from proxy.config.values import RULE_FIELDS
from proxy.errors import ConfigError, ConfigErrors


class Collector:
    """What the loader's collector offers the checks: ``errors`` and ``add``."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, key: str, message: str) -> None:
        self.errors.append(ConfigError(key, message))

    @property
    def lines(self) -> list[tuple[str, str]]:
        return [(e.key, e.message) for e in self.errors]


# ---- parse_rules_document ------------------------------------------------------------------------------------

RULE = {"name": "partner-a", "subject_cn": ["client-a"], "methods": ["GET"]}


@pytest.mark.parametrize("data", [
    json.dumps([RULE]).encode(),
    json.dumps({"allow": [RULE]}).encode(),
    b'\n  [\n  {"name": "partner-a", "subject_cn": ["client-a"], "methods": ["GET"]}]\n',  # leading whitespace
    b'[[allow]]\nname = "partner-a"\nsubject_cn = ["client-a"]\nmethods = ["GET"]\n',
    b'# partners\n\n[[allow]]\nname = "partner-a"\nsubject_cn = ["client-a"]\nmethods = ["GET"]\n',
], ids=["json-list", "json-object", "json-indented", "toml", "toml-comment-first"])
def test_a_document_gives_the_raw_rule_list(data: bytes) -> None:
    assert parse_rules_document(data) == [RULE]


def test_toml_array_of_tables_is_not_taken_for_json() -> None:
    # "[[allow]]" starts with "[" too; only "[{" or "[]" (after whitespace) is JSON.
    assert parse_rules_document(b'[[allow]]\nname = "a"\n[[allow]]\nname = "b"\n') == [{"name": "a"}, {"name": "b"}]


@pytest.mark.parametrize("data", [b"[]", b" [ ] ", b"{}", b'{"allow": []}', b"", b"# no partners yet\n"])
def test_an_empty_document_is_an_empty_list(data: bytes) -> None:
    assert parse_rules_document(data) == []


def test_items_are_not_checked_here() -> None:
    # The loader reports "expected a table" under the item's own key; the document format only wants a list.
    assert parse_rules_document(b'[{"name": "a"}, 5, "x"]') == [{"name": "a"}, 5, "x"]


@pytest.mark.parametrize("data", [b"[5]", b'["a"]', b"[5, {}]"])
def test_a_json_list_of_non_objects_is_read_as_json(data: bytes) -> None:
    # Not as TOML (where "[5]" would be a table header and the message would be about TOML): the items reach the
    # loader, which reports "expected a table" under the item's own key.
    assert parse_rules_document(data) == json.loads(data)


def test_a_toml_table_that_is_not_an_array_of_tables_is_refused_as_toml() -> None:
    with pytest.raises(ValueError) as info:
        parse_rules_document(b'[allow]\nname = "x"\n')
    assert str(info.value) == "expected a list of rules ([[allow]] tables)"


@pytest.mark.parametrize("data", [b"5", b'"rules"'])
def test_a_bare_scalar_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="invalid TOML"):
        parse_rules_document(data)


def test_not_utf8() -> None:
    with pytest.raises(ValueError) as info:
        parse_rules_document(b'[{"name": "caf\xe9"}]')
    assert str(info.value) == "not UTF-8 text"
    assert info.value.__suppress_context__  # the UnicodeDecodeError is not chained into the report


def test_invalid_json_names_the_line() -> None:
    with pytest.raises(ValueError) as info:
        parse_rules_document(b'[\n  {"name": "a"},\n  {"name": }\n]')
    assert str(info.value) == "invalid JSON: Expecting value (line 3)"


def test_invalid_toml() -> None:
    with pytest.raises(ValueError) as info:
        parse_rules_document(b'[[allow]\nname = "a"\n')
    message = str(info.value)
    assert message.startswith("invalid TOML: ") and "line 1" in message and "\n" not in message


@pytest.mark.parametrize(("data", "key"), [
    (b'{"rules": []}', "rules"),
    (b'{"allow": [], "zeta": 1, "beta": 2}', "beta"),  # the first in sorted order, so the report is stable
    (b'[server]\nlisten = "0.0.0.0:8443"\n', "server"),
    (b'allow_all_verified = true\n[[allow]]\nname = "a"\n', "allow_all_verified"),
])
def test_an_unknown_top_level_key(data: bytes, key: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rules_document(data)
    assert str(info.value) == f"unknown key {key!r} (a rules document holds only [[allow]] rules)"


@pytest.mark.parametrize("data", [b'{"allow": 5}', b'{"allow": {"name": "a"}}', b"allow = 5\n",
                                  b'[allow]\nname = "a"\n', b'{"allow": "partner-a"}'])
def test_not_a_list(data: bytes) -> None:
    with pytest.raises(ValueError) as info:
        parse_rules_document(data)
    assert str(info.value) == "expected a list of rules ([[allow]] tables)"


# ---- check_limit ---------------------------------------------------------------------------------------------


def limit_problems(rate: float | None, burst: int | None) -> list[tuple[str, str]]:
    c = Collector()
    check_limit(c, "allow[3]", AllowRule(name="p", subject_cn=("c",), rate_limit=rate, burst=burst))
    return c.lines


@pytest.mark.parametrize(("rate", "burst"), [
    (None, None), (5.0, None), (0.001, None), (MAX_RATE, None), (1.0, 1), (0.5, 4), (1.0, MAX_BURST),
])
def test_a_valid_limit(rate: float | None, burst: int | None) -> None:
    assert limit_problems(rate, burst) == []


@pytest.mark.parametrize("burst", [3, 0])
def test_burst_without_rate_limit(burst: int) -> None:
    assert limit_problems(None, burst) == [
        ("allow[3].burst", "needs rate_limit in the same rule (burst is how many requests may come at once)")]


@pytest.mark.parametrize(("rate", "shown"), [
    (0.0, "0"), (-2.0, "-2"), (math.nan, "nan"), (math.inf, "inf"), (MAX_RATE * 2, "2e+06"),
    (math.nextafter(MAX_RATE, math.inf), "1e+06"),
])
def test_a_rate_out_of_range(rate: float, shown: str) -> None:
    assert limit_problems(rate, None) == [
        ("allow[3].rate_limit", f"must be more than 0 and at most 1e+06 requests per second, got {shown}")]


@pytest.mark.parametrize("burst", [0, -1, MAX_BURST + 1])
def test_a_burst_out_of_range(burst: int) -> None:
    assert limit_problems(1.0, burst) == [("allow[3].burst", f"must be between 1 and {MAX_BURST}, got {burst}")]


def test_a_bad_rate_and_a_bad_burst_are_both_reported() -> None:
    assert [key for key, _ in limit_problems(0.0, 0)] == ["allow[3].rate_limit", "allow[3].burst"]


# ---- check_rule ----------------------------------------------------------------------------------------------


def rule_problems(*rules: AllowRule, proxy_protocol: bool = False) -> list[tuple[str, str]]:
    c, names = Collector(), set[str]()
    for i, rule in enumerate(rules):
        check_rule(c, f"allow[{i}]", rule, names, proxy_protocol)
    return c.lines


def test_a_valid_rule() -> None:
    rule = AllowRule(name="p", subject_cn=("client-a",), san_dns=("*.partner.example",), san_uri=("spiffe://p/*",),
                     fingerprint_sha256=(":".join(["AB"] * 32),), source_vpce=("vpce-0abc",), methods=("GET",),
                     paths=("/orders/**",))
    assert rule_problems(rule, proxy_protocol=True) == []


def test_duplicate_names() -> None:
    a, b = AllowRule(name="a", subject_cn=("x",)), AllowRule(name="b", subject_cn=("y",))
    assert rule_problems(a, b, AllowRule(name="a", san_dns=("z",)), b) == [
        ("allow[2].name", "duplicate rule name 'a'"), ("allow[3].name", "duplicate rule name 'b'")]


def test_names_seen_are_collected_for_the_next_rule() -> None:
    c, names = Collector(), {"already"}
    check_rule(c, "allow[0]", AllowRule(name="p", subject_cn=("x",)), names, False)
    assert names == {"already", "p"} and c.lines == []
    check_rule(c, "allow[1]", AllowRule(name="already", subject_cn=("x",)), names, False)
    assert c.lines == [("allow[1].name", "duplicate rule name 'already'")]


@pytest.mark.parametrize(("name", "problem"), [
    ("", "must not be empty"), ("allow_all_verified", "'allow_all_verified' is reserved")])
def test_a_bad_name(name: str, problem: str) -> None:
    assert rule_problems(AllowRule(name=name, subject_cn=("x",))) == [("allow[0].name", problem)]


@pytest.mark.parametrize("rule", [
    AllowRule(name="p"),
    AllowRule(name="p", methods=("GET",), paths=("/x",)),
    AllowRule(name="p", source_vpce=("vpce-0abc",)),  # where a request comes from is not who sends it
], ids=["bare", "methods-and-paths", "vpce-only"])
def test_a_rule_without_an_identity_field(rule: AllowRule) -> None:
    assert rule_problems(rule, proxy_protocol=True) == [
        ("allow[0]", "needs at least one identity field (subject_cn, san_dns, san_uri, fingerprint_sha256)")]


def test_source_vpce_needs_the_proxy_protocol() -> None:
    rule = AllowRule(name="p", subject_cn=("x",), source_vpce=("vpce-0abc",))
    assert rule_problems(rule) == [
        ("allow[0].source_vpce", "needs server.proxy_protocol = true (the id arrives in PROXY v2)")]
    assert rule_problems(rule, proxy_protocol=True) == []


@pytest.mark.parametrize("field", sorted(RULE_FIELDS))
def test_an_empty_value_in_any_field(field: str) -> None:
    values = {"subject_cn": "c", "san_dns": "d.example", "san_uri": "spiffe://p", "fingerprint_sha256": "ab" * 32,
              "source_vpce": "vpce-0abc", "methods": "GET", "paths": "/x"}
    rule = AllowRule(**{"name": "p", "subject_cn": ("x",), field: (values[field], "")})  # type: ignore[arg-type]
    assert rule_problems(rule, proxy_protocol=True) == [(f"allow[0].{field}[1]", "must not be empty")]


@pytest.mark.parametrize(("field", "items", "key", "problem"), [
    ("methods", ("GET", "get"), "methods[1]", "must be an uppercase HTTP method such as 'GET', got 'get'"),
    ("methods", ("PO ST",), "methods[0]", "must be an uppercase HTTP method such as 'GET', got 'PO ST'"),
    ("paths", ("/a/**x",), "paths[0]", "'**' must be a whole segment in '/a/**x'"),
    ("paths", ("/ok", "orders/*"), "paths[1]", "must start with '/'"),
    ("paths", ("/a/../b",), "paths[0]", "'.' and '..' segments never occur in a normalised path: '/a/../b'"),
    ("san_dns", ("a.**b.example",), "san_dns[0]", "'**' must be a whole label in 'a.**b.example'"),
    ("fingerprint_sha256", ("ab",), "fingerprint_sha256[0]", "must be 64 hex digits (SHA-256), colons allowed, "
                                                             "got 'ab'"),
])
def test_a_bad_field_value_is_named_by_its_index(field: str, items: tuple[str, ...], key: str,
                                                 problem: str) -> None:
    rule = AllowRule(**{"name": "p", "san_uri": ("spiffe://p",), field: items})  # type: ignore[arg-type]
    assert rule_problems(rule) == [(f"allow[0].{key}", problem)]


def test_every_problem_of_one_rule_is_reported() -> None:
    rule = AllowRule(name="", source_vpce=("vpc-1",), methods=("get",), paths=("x",))
    assert [key for key, _ in rule_problems(rule)] == [
        "allow[0].name", "allow[0]", "allow[0].source_vpce", "allow[0].source_vpce[0]", "allow[0].methods[0]",
        "allow[0].paths[0]"]


# ---- through config.load: an allow_from document is checked like inline rules -----------------------------------

BASE = """\
[server]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"

[upstream]
url = "https://abc123.execute-api.us-east-1.amazonaws.com/prod"
"""

BROKEN_RULES = [
    {"name": "a", "subject_cn": ["x"], "burst": 2},
    {"name": "a", "san_dns": ["y..example"], "source_vpce": ["vpce-0abc"]},
    {"name": "c", "methods": ["GET"], "rate_limit": 0},
]


def load_errors(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        config.load(path, {})
    return [str(e) for e in info.value.errors]


def test_an_external_document_is_checked_with_the_same_keys_as_inline_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.json").write_text(json.dumps(BROKEN_RULES))
    (tmp_path / "external.toml").write_text('allow_from = "rules.json"\n' + BASE)
    inline = "".join("[[allow]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())
                     for rule in BROKEN_RULES)
    (tmp_path / "inline.toml").write_text(BASE + inline)

    external = load_errors(tmp_path / "external.toml")
    expected = [
        "allow[0].burst: needs rate_limit in the same rule (burst is how many requests may come at once)",
        "allow[1].name: duplicate rule name 'a'",
        "allow[1].source_vpce: needs server.proxy_protocol = true (the id arrives in PROXY v2)",
        "allow[1].san_dns[0]: empty label in 'y..example'",
        "allow[2]: needs at least one identity field (subject_cn, san_dns, san_uri, fingerprint_sha256)",
        "allow[2].rate_limit: must be more than 0 and at most 1e+06 requests per second, got 0",
    ]
    assert load_errors(tmp_path / "inline.toml") == expected
    assert external == ["allow_from." + line for line in expected]


def test_a_json_list_of_non_objects_is_refused_under_the_item_key(tmp_path: Path) -> None:
    (tmp_path / "rules.json").write_bytes(b"[5]")
    (tmp_path / "proxy.toml").write_text('allow_from = "rules.json"\n' + BASE)
    assert load_errors(tmp_path / "proxy.toml") == ["allow_from.allow[0]: expected a table"]
