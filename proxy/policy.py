"""The ``[[allow]]`` policy: rules compiled once, identity matched once per connection, requests per request.

Owns: validating and compiling allow rules (PolicyError at start-up, naming rule and field), deciding
whether a verified client may send a request, and request-path normalisation (RFC 3986 §6.2.2.2, §5.2.4).
Must not: do IO, parse certificates (identity.py), or map decisions to HTTP responses (the caller does).

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

Globs: ``*`` matches zero or more characters inside one segment (it never crosses the separator: ``.``
for DNS, ``/`` for URIs and paths). ``**`` must be a whole segment and matches zero or more whole segments:
``/v1/**`` matches ``/v1``, ``/v1/`` and ``/v1/a/b``; ``**.example.com`` matches ``example.com`` and
``a.b.example.com``; ``*.example.com`` matches ``a.example.com`` only. A ``*`` is always a wildcard.
Matching is done segment by segment with plain string operations (no regex backtracking), so a hostile
path costs O(len(path) x len(pattern)) at worst.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.identity import Identity

__all__ = ["ALLOW_ALL_RULE", "REASONS", "AllowRuleLike", "ConnectionPolicy", "Decision", "Policy", "PolicyError",
           "normalize_path"]

ALLOW_ALL_RULE = "allow_all_verified"
REASONS = ("allowed", "no_rule_for_client", "method_not_allowed", "path_not_allowed")
_IDENTITY_FIELDS = ("subject_cn", "san_dns", "san_uri", "fingerprint_sha256")


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


# --- path normalisation -----------------------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")  # RFC 3986 §2.3
_HEX = frozenset("0123456789ABCDEFabcdef")
_PCT_TRIPLET = re.compile(r"%[0-9A-Fa-f]{2}")


def _decode_unreserved(path: str) -> str:
    """Decode %XX triplets that encode unreserved characters, leave every other one as it was (§6.2.2.2).

    A decoded hex digit stays encoded when the output so far ends in a stray "%" or "%h": decoding it would
    create a *new* triplet ("%%34%31" must not become "%41"), changing what the upstream decodes and making
    normalisation non-idempotent.
    """
    out: list[str] = []
    tail = ""  # the last two characters of "".join(out)
    i = 0
    while (j := path.find("%", i)) >= 0:
        if j > i:
            out.append(path[i:j])
            tail = (tail + path[i:j])[-2:]
        triplet = path[j : j + 3]
        if len(triplet) == 3 and triplet[1] in _HEX and triplet[2] in _HEX:
            char = chr(int(triplet[1:], 16))
            stray = tail[-1:] == "%" or (len(tail) == 2 and tail[0] == "%" and tail[1] in _HEX)
            token = char if char in _UNRESERVED and not (char in _HEX and stray) else triplet
            i = j + 3
        else:
            token = "%"  # a stray '%' (not a triplet) is kept as is
            i = j + 1
        out.append(token)
        tail = (tail + token)[-2:]
    out.append(path[i:])
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path, segment-wise: "." is dropped, ".." drops the previous segment;
    a dot segment at the end leaves a trailing "/" ("/a/b/.." -> "/a/")."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
            continue
        if index == last:
            out.append("")
    return "/" + "/".join(out)


def normalize_path(path: str) -> str:
    """Normalise an origin-form path (no query): decode %-encoded unreserved characters, remove dot segments.

    ``%2F`` stays encoded and is not a separator; ``%25`` stays. Raises ValueError if ``path`` does not
    start with "/". Returns ``path`` itself when there is nothing to do (no "%" and no "/.").
    """
    if not path.startswith("/"):
        raise ValueError("path must start with '/'")
    if "%" not in path and "/." not in path:
        return path
    if "%" in path:
        path = _decode_unreserved(path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _upper_match(match: re.Match[str]) -> str:
    return match.group().upper()


def _upper_percent(path: str) -> str:
    return _PCT_TRIPLET.sub(_upper_match, path)


# --- globs ------------------------------------------------------------------------------------------------

_SegmentPattern = str | tuple[str, ...]  # a literal segment, or the pieces of a '*' glob ("a*b" -> ("a","b"))


def _segment_matches(pattern: _SegmentPattern, segment: str) -> bool:
    if type(pattern) is str:
        return pattern == segment
    # Classic wildcard matching for one wildcard kind: anchored first and last pieces, middle pieces found
    # leftmost-first (earliest placement leaves the most room, so it is complete); no backtracking.
    first, last = pattern[0], pattern[-1]
    if len(segment) < len(first) + len(last) or not segment.startswith(first) or not segment.endswith(last):
        return False
    pos, end = len(first), len(segment) - len(last)
    for piece in pattern[1:-1]:
        found = segment.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def _run_matches(run: tuple[_SegmentPattern, ...], segments: list[str], start: int) -> bool:
    return all(_segment_matches(p, segments[start + k]) for k, p in enumerate(run))


@dataclass(frozen=True, slots=True)
class _Glob:
    """A pattern with '*' inside segments and/or '**' segments, split at the '**' segments into runs."""

    runs: tuple[tuple[_SegmentPattern, ...], ...]  # len(runs) == number of '**' + 1

    def matches(self, segments: list[str]) -> bool:
        runs, n = self.runs, len(segments)
        head = runs[0]
        if len(runs) == 1:
            return n == len(head) and _run_matches(head, segments, 0)
        tail = runs[-1]
        if len(head) + len(tail) > n:
            return False
        if not _run_matches(head, segments, 0) or not _run_matches(tail, segments, n - len(tail)):
            return False
        # '**' absorbs anything, so placing each middle run at its leftmost fit is complete.
        pos, end = len(head), n - len(tail)
        for run in runs[1:-1]:
            for start in range(pos, end - len(run) + 1):
                if _run_matches(run, segments, start):
                    pos = start + len(run)
                    break
            else:
                return False
        return True


@dataclass(frozen=True, slots=True)
class _GlobSet:
    """All patterns of one field, sorted into the cheapest test each needs."""

    sep: str
    exact: frozenset[str]  # no wildcard (plus the "zero segments" case of prefix/suffix patterns)
    prefixes: tuple[str, ...]  # "<literal>/**" -> "<literal>/"
    suffixes: tuple[str, ...]  # "**.<literal>" -> ".<literal>"
    globs: tuple[_Glob, ...]

    def matches(self, text: str) -> bool:
        if text in self.exact:
            return True
        if self.prefixes and text.startswith(self.prefixes):
            return True
        if self.suffixes and text.endswith(self.suffixes):
            return True
        if self.globs:
            segments = text.split(self.sep)
            return any(glob.matches(segments) for glob in self.globs)
        return False


def _compile_globs(patterns: Iterable[str], sep: str) -> _GlobSet:
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    globs: list[_Glob] = []
    for pattern in patterns:
        segments = pattern.split(sep)
        if "*" not in pattern:
            exact.add(pattern)
        elif len(segments) > 1 and segments[-1] == "**" and "*" not in pattern[:-2]:
            exact.add(pattern[:-3])
            prefixes.append(pattern[:-2])
        elif len(segments) > 1 and segments[0] == "**" and "*" not in pattern[2:]:
            exact.add(pattern[3:])
            suffixes.append(pattern[2:])
        else:
            runs: list[list[_SegmentPattern]] = [[]]
            for segment in segments:
                if segment == "**":
                    runs.append([])
                else:
                    runs[-1].append(tuple(segment.split("*")) if "*" in segment else segment)
            globs.append(_Glob(tuple(tuple(run) for run in runs)))
    return _GlobSet(sep, frozenset(exact), tuple(prefixes), tuple(suffixes), tuple(globs))


# --- validation -------------------------------------------------------------------------------------------

_DNS_CHARS = re.compile(r"[a-z0-9_*-]+")  # LDH (RFC 1123 §2.1) plus '_' seen in service names, plus '*'
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")  # RFC 3986 §2: reserved + unreserved + %
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # RFC 3986 §3.1
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]+")  # RFC 3986 §3.3 pchar and "/"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_VPCE = re.compile(r"vpce-[0-9a-f]+")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


def _check_percent(pattern: str) -> str | None:
    for part in pattern.split("%")[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            return f"'%' must start a %XX escape in {pattern!r}"
    return None


def _check_wildcards(pattern: str, sep: str, unit: str) -> str | None:
    for segment in pattern.split(sep):
        if "**" in segment and segment != "**":
            return f"'**' must be a whole {unit} in {pattern!r}"
    return None


# Each check returns (problem or None, the value to compile).


def _check_cn(value: str) -> tuple[str | None, str]:
    return None, value  # any text can be a CN; emptiness is checked for every field


def _check_dns(pattern: str) -> tuple[str | None, str]:
    lowered = pattern.lower()
    if any(not label for label in lowered.split(".")):
        return f"empty label in {pattern!r}", lowered
    if not _DNS_CHARS.fullmatch(lowered.replace(".", "a")):
        return f"invalid character in {pattern!r} (letters, digits, '-', '_', '.', '*')", lowered
    return _check_wildcards(lowered, ".", "label"), lowered


def _check_uri(pattern: str) -> tuple[str | None, str]:
    if not _URI_SCHEME.match(pattern):
        return f"must start with a URI scheme such as 'spiffe:' in {pattern!r}", pattern
    if not _URI_CHARS.fullmatch(pattern):
        return f"invalid character in {pattern!r} (RFC 3986 characters only)", pattern
    return _check_percent(pattern) or _check_wildcards(pattern, "/", "segment"), pattern


def _check_path(pattern: str) -> tuple[str | None, str]:
    if not pattern.startswith("/"):
        return "must start with '/'", pattern
    if "?" in pattern or "#" in pattern:
        return f"paths are matched without query or fragment: {pattern!r}", pattern
    if not _PATH_CHARS.fullmatch(pattern):
        return f"invalid character in {pattern!r} (RFC 3986 path characters only)", pattern
    problem = _check_percent(pattern)
    if problem is not None:
        return problem, pattern
    for triplet in _PCT_TRIPLET.findall(pattern):
        char = chr(int(triplet[1:], 16))
        if char in _UNRESERVED:
            return f"{triplet!r} never occurs in a normalised path, write {char!r} in {pattern!r}", pattern
    if any(segment in (".", "..") for segment in pattern.split("/")):
        return f"'.' and '..' segments never occur in a normalised path: {pattern!r}", pattern
    return _check_wildcards(pattern, "/", "segment"), _upper_percent(pattern)


def _check_fingerprint(value: str) -> tuple[str | None, str]:
    normalised = value.lower().replace(":", "")
    if not _FINGERPRINT.fullmatch(normalised):
        return f"must be 64 hex digits (SHA-256), colons allowed, got {value!r}", normalised
    return None, normalised


def _must_match(regex: re.Pattern[str], hint: str) -> Callable[[str], tuple[str | None, str]]:
    def check(value: str) -> tuple[str | None, str]:
        return (None if regex.fullmatch(value) else f"{hint}, got {value!r}"), value

    return check


_check_vpce = _must_match(_VPCE, "must look like 'vpce-0123456789abcdef0'")
_check_method = _must_match(_METHOD, "must be an uppercase HTTP method such as 'GET'")


# --- compiled rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    subject_cn: frozenset[str]
    fingerprints: frozenset[str]
    san_dns: _GlobSet | None
    san_uri: _GlobSet | None
    source_vpce: frozenset[str]
    methods: frozenset[str]
    paths: _GlobSet | None
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
        if not isinstance(name, str) or not name:
            raise self.fail("name: must not be empty")
        if name == ALLOW_ALL_RULE:
            raise self.fail(f"name: {ALLOW_ALL_RULE!r} is reserved")
        if not any(getattr(self.rule, field) for field in _IDENTITY_FIELDS):
            raise self.fail(f"needs at least one identity field ({', '.join(_IDENTITY_FIELDS)})")
        cns = self.checked("subject_cn", _check_cn)
        dns = self.checked("san_dns", _check_dns)
        uris = self.checked("san_uri", _check_uri)
        fingerprints = self.checked("fingerprint_sha256", _check_fingerprint)
        vpces = self.checked("source_vpce", _check_vpce)
        methods = self.checked("methods", _check_method)
        paths = self.checked("paths", _check_path)
        return _Rule(
            name=name,
            subject_cn=frozenset(cns),
            fingerprints=frozenset(fingerprints),
            san_dns=_compile_globs(dns, ".") if dns else None,
            san_uri=_compile_globs(uris, "/") if uris else None,
            source_vpce=frozenset(vpces),
            methods=frozenset(methods),
            paths=_compile_globs(paths, "/") if paths else None,
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
        match_path = _upper_percent(path) if "%" in path else path
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
