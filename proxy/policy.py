"""The ``[[allow]]`` policy: rules compiled once, identity matched once per connection, requests per request.

Owns: compiling allow rules (PolicyError at start-up, naming rule and field, with the same value checks the config
loader runs: ``proxy.config.values``), pre-selecting once per connection the rules a certificate can use, and
deciding each request on it.
Must not: do IO, parse certificates (identity.py), normalise paths (``proxy.wire.paths``; ``decide`` takes a
normalised path), or map decisions to HTTP responses (the caller does).

Semantics (deny by default): a rule allows a request when every non-empty field of the rule matches (AND);
a list field matches when any of its entries matches; rules are OR-ed and tried in configuration order, the
first match names the decision. ``allow_all_verified`` allows any verified client as rule
``"allow_all_verified"``, after the explicit rules (so their names still show up in logs).

Field matching:
* ``subject_cn``: exact, case-sensitive equality with any CN of the certificate subject.
* ``fingerprint_sha256``: 64 hex digits, compared after lowercasing and removing ``:``.
* ``source_vpce``: exact equality with the connection's VPC endpoint id; a connection without one
  (``None``) never matches a rule that lists endpoints.
* ``san_dns``: glob over labels, ASCII case-insensitive; a SAN with non-ASCII characters never matches
  (IDNs must be A-labels, ``xn--...``, in the certificate and in the rule).
* ``san_uri``: glob over ``/``-separated segments, case-sensitive; must start with a literal scheme.
* ``methods``: exact, case-sensitive (RFC 9110 §9.1: methods are case-sensitive; write ``GET``).
* ``paths``: glob over ``/``-separated segments of the normalised path (no query); percent-encodings that
  remain after normalisation compare with case-insensitive hex digits (RFC 3986 §6.2.2.1).

Globs (``*`` within one segment, ``**`` across whole segments) are ``proxy.globs``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .config.values import (
    ALLOW_ALL_RULE,
    IDENTITY_FIELDS,
    check_cn,
    check_dns,
    check_fingerprint,
    check_method,
    check_path,
    check_rule_name,
    check_uri,
    check_vpce,
    missing_identity,
)
from .globs import GlobSet, compile_globs
from .identity import Identity
from .wire.paths import normalize_path, upper_percent  # normalize_path: still imported from here by connection.py

__all__ = ["ALLOW_ALL_RULE", "DENIED_REASONS", "REASONS", "AllowRuleLike", "ConnectionPolicy", "Decision", "Policy",
           "PolicyError", "normalize_path"]

# Every Decision.reason (metric labels of mtls_proxy_denied: DENIED_REASONS; the first one is never a denial).
REASONS = ("allowed", "no_rule_for_client", "method_not_allowed", "path_not_allowed")
DENIED_REASONS = REASONS[1:]


class PolicyError(ValueError):
    """An allow rule is invalid; the message names the rule and the field."""


class AllowRuleLike(Protocol):
    """The shape of ``proxy.config.AllowRule`` that the policy reads."""

    name: str
    subject_cn: Sequence[str]
    san_dns: Sequence[str]
    san_uri: Sequence[str]
    fingerprint_sha256: Sequence[str]
    source_vpce: Sequence[str]
    methods: Sequence[str]
    paths: Sequence[str]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str | None  # the matching rule's name
    reason: str  # one of REASONS (a metric label)
    detail: str  # a sentence for the 403 body and the log


# --- compiled rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    subject_cn: frozenset[str]
    fingerprints: frozenset[str]
    san_dns: GlobSet | None
    san_uri: GlobSet | None
    source_vpce: frozenset[str]
    methods: frozenset[str]
    paths: GlobSet | None
    decision: Decision  # preallocated: "allowed by this rule" never depends on the request

    def matches_identity(self, identity: Identity, dns_lower: tuple[str, ...]) -> bool:
        if self.fingerprints and identity.fingerprint not in self.fingerprints:
            return False
        if self.subject_cn and self.subject_cn.isdisjoint(identity.common_names):
            return False
        if self.san_dns is not None and not any(map(self.san_dns.matches, dns_lower)):
            return False
        if self.san_uri is not None and not any(map(self.san_uri.matches, identity.san_uri)):
            return False
        return True


class _RuleCompiler:
    def __init__(self, index: int, rule: AllowRuleLike) -> None:
        self.rule = rule
        self.where = f"allow[{index}] ({rule.name})"

    def fail(self, message: str) -> PolicyError:
        return PolicyError(f"{self.where}: {message}")

    def checked(self, field: str, check: Callable[[str], tuple[str | None, str]]) -> list[str]:
        """The values of a list field, each a non-empty string passed through ``check``."""
        raw = getattr(self.rule, field)
        if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
            raise self.fail(f"{field}: must be a list of strings")
        out = []
        for i, value in enumerate(raw):
            where = f"{field}[{i}]"
            if not isinstance(value, str):
                raise self.fail(f"{where}: must be a string")
            if not value:
                raise self.fail(f"{where}: must not be empty")
            problem, value = check(value)
            if problem is not None:
                raise self.fail(f"{where}: {problem}")
            out.append(value)
        return out

    def compile(self) -> _Rule:
        name = self.rule.name
        problem = check_rule_name(name) if isinstance(name, str) else "must not be empty"
        if problem is not None:
            raise self.fail(f"name: {problem}")
        problem = missing_identity({field: getattr(self.rule, field) for field in IDENTITY_FIELDS})
        if problem is not None:
            raise self.fail(problem)
        cns = self.checked("subject_cn", check_cn)
        dns = self.checked("san_dns", check_dns)
        uris = self.checked("san_uri", check_uri)
        fingerprints = self.checked("fingerprint_sha256", check_fingerprint)
        vpces = self.checked("source_vpce", check_vpce)
        methods = self.checked("methods", check_method)
        paths = self.checked("paths", check_path)
        return _Rule(
            name=name,
            subject_cn=frozenset(cns),
            fingerprints=frozenset(fingerprints),
            san_dns=compile_globs(dns, ".") if dns else None,
            san_uri=compile_globs(uris, "/") if uris else None,
            source_vpce=frozenset(vpces),
            methods=frozenset(methods),
            paths=compile_globs(paths, "/") if paths else None,
            decision=Decision(True, name, "allowed", f"allowed by rule {name!r}"),
        )


# --- decisions --------------------------------------------------------------------------------------------

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_ECHO_LIMIT = 200


def _echo(text: str) -> str:
    """Method/path for a human sentence: printable ASCII only (the parser already ensures it), bounded."""
    if len(text) > _ECHO_LIMIT:
        text = text[:_ECHO_LIMIT] + "..."
    return _NOT_PRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else "?", text)


_NO_RULE = Decision(False, None, "no_rule_for_client", "no allow rule matches this client certificate")
_WRONG_VPCE = Decision(
    False, None, "no_rule_for_client",
    "allow rules match this client certificate, but not from the VPC endpoint it connected through",
)
_ALLOW_ALL = Decision(True, ALLOW_ALL_RULE, "allowed", "allowed: any verified client (allow_all_verified)")


class ConnectionPolicy:
    """The rules that apply to one connection's client; decides each request on it."""

    __slots__ = ("_rules", "_fallback", "_no_rule")

    def __init__(self, rules: tuple[_Rule, ...], fallback: Decision | None, no_rule: Decision) -> None:
        self._rules = rules
        self._fallback = fallback  # allow_all_verified, after the explicit rules
        self._no_rule = no_rule

    @property
    def rule_names(self) -> tuple[str, ...]:
        """Names of the rules whose identity (and source_vpce) fields matched this connection."""
        return tuple(rule.name for rule in self._rules)

    def decide(self, method: str, path: str) -> Decision:
        """Decide one request; ``path`` must already be normalised (normalize_path), without the query."""
        match_path = upper_percent(path) if "%" in path else path
        method_allowed = False
        for rule in self._rules:
            if rule.methods and method not in rule.methods:
                continue
            method_allowed = True
            if rule.paths is None or rule.paths.matches(match_path):
                return rule.decision
        if self._fallback is not None:
            return self._fallback
        if not self._rules:
            return self._no_rule
        if not method_allowed:
            return Decision(False, None, "method_not_allowed",
                            f"method {_echo(method)} is not allowed for this client certificate")
        return Decision(False, None, "path_not_allowed",
                        f"{_echo(method)} {_echo(path)} is not allowed for this client certificate")


class Policy:
    """Compiled allow rules; immutable, shared by all connections."""

    __slots__ = ("_rules", "_uses_dns", "_fallback", "_nobody", "_wrong_vpce")

    def __init__(self, rules: tuple[_Rule, ...], allow_all_verified: bool) -> None:
        self._rules = rules
        self._uses_dns = any(rule.san_dns is not None for rule in rules)
        self._fallback = _ALLOW_ALL if allow_all_verified else None
        # Connections no rule applies to share one ConnectionPolicy each: nothing to allocate per connection.
        self._nobody = ConnectionPolicy((), self._fallback, _NO_RULE)
        self._wrong_vpce = ConnectionPolicy((), self._fallback, _WRONG_VPCE)

    @classmethod
    def compile(cls, rules: Iterable[AllowRuleLike], allow_all_verified: bool) -> Policy:
        compiled: list[_Rule] = []
        seen: dict[str, int] = {}
        for index, rule in enumerate(rules):
            compiler = _RuleCompiler(index, rule)
            compiled.append(compiler.compile())  # validates the name first
            if rule.name in seen:
                raise compiler.fail(f"name: duplicate rule name (also allow[{seen[rule.name]}])")
            seen[rule.name] = index
        return cls(tuple(compiled), bool(allow_all_verified))

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self._rules)

    def for_connection(self, identity: Identity, vpce_id: str | None) -> ConnectionPolicy:
        """Pre-select, once per connection, the rules whose identity and source_vpce fields match."""
        # ASCII-only lowercasing: str.lower() would map e.g. KELVIN SIGN (U+212A) to "k".
        dns_lower = tuple(name.lower() for name in identity.san_dns if name.isascii()) if self._uses_dns else ()
        selected: list[_Rule] = []
        identity_matched = False
        for rule in self._rules:
            if not rule.matches_identity(identity, dns_lower):
                continue
            identity_matched = True
            if rule.source_vpce and (vpce_id is None or vpce_id not in rule.source_vpce):
                continue
            selected.append(rule)
        if selected:
            return ConnectionPolicy(tuple(selected), self._fallback, _NO_RULE)
        return self._wrong_vpce if identity_matched else self._nobody
