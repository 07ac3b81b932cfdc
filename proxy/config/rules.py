"""Partner rules as the loader checks them: the ``allow_from`` document format and every per-rule check.

Owns: parsing a rules document (TOML ``[[allow]]`` tables or JSON) into the raw rule list, reading it once from its
source, and the checks each ``AllowRule`` must pass (name, identity, fields, rate limits), each problem reported
under the rule's own key.  The loader calls these for inline and external rules alike, so an external document is
validated exactly like rules in the config file; the reload path calls ``parse_rules_document`` to refuse a
malformed document before anything is rebuilt.

Must not: read the environment itself (the loader passes it in), or exit the process.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping
from typing import Any, Protocol

from ..errors import ConfigError, ConfigErrors
from . import values
from .model import AllowRule, PemSource


class Problems(Protocol):
    """Where problems go: the loader's collector (one ``ConfigError`` per problem, reported together)."""

    errors: list[ConfigError]

    def add(self, key: str, message: str) -> None: ...


def parse_rules_document(data: bytes) -> list[Any]:
    """The raw rule list of an ``allow_from`` document: JSON (a list of rule objects, or ``{"allow": [...]}``) or
    TOML (``[[allow]]`` tables and nothing else).  ValueError with a one-line reason."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    # JSON is an object or a list; TOML starts with a table header, and ``[[allow]]`` also starts with "[".  A
    # document starting with "[[" is TOML; one starting with "{" or "[" otherwise is JSON, so a JSON list of
    # non-objects (``[5]``) reaches the loader, which names the item (``allow_from.allow[0]: expected a table``).
    stripped = text.lstrip()
    if stripped.startswith("{") or (stripped.startswith("[") and not re.match(r"\[\s*\[", stripped)):
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            doc = _toml_table(text) if stripped.startswith("[") else None  # ``[allow]``: a TOML table, not JSON
            if doc is None:
                raise ValueError(f"invalid JSON: {exc.msg} (line {exc.lineno})") from None
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"invalid TOML: {exc}") from None
    if isinstance(doc, dict):
        extra = sorted(set(doc) - {"allow"})
        if extra:
            raise ValueError(f"unknown key {extra[0]!r} (a rules document holds only [[allow]] rules)")
        doc = doc.get("allow", [])
    if not isinstance(doc, list):
        raise ValueError("expected a list of rules ([[allow]] tables)")
    return doc


def _toml_table(text: str) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return None


def read_rules_document(src: PemSource, environ: Mapping[str, str], c: Problems) -> list[Any] | None:
    """Read the ``allow_from`` document once (remote kinds through ``proxy.sources``; boto3 only for AWS)."""
    from ..sources.material import Material

    material = Material({"allow_from": src.location}, environ=environ)
    try:
        material.load()
        return parse_rules_document(material["allow_from"])
    except ConfigErrors as exc:
        c.errors.extend(exc.errors)
    except ValueError as exc:
        c.add("allow_from", f"{src}: {exc}")
    return None


MAX_RATE = 1e6  # requests per second: beyond this a limit is no limit (the bucket works in whole nanoseconds)
MAX_BURST = 10**6


def check_limit(c: Problems, where: str, rule: AllowRule) -> None:
    if rule.rate_limit is None:
        if rule.burst is not None:
            c.add(f"{where}.burst", "needs rate_limit in the same rule (burst is how many requests may come at once)")
        return
    if not 0 < rule.rate_limit <= MAX_RATE:  # also false for NaN
        c.add(f"{where}.rate_limit", f"must be more than 0 and at most {MAX_RATE:g} requests per second, "
                                     f"got {rule.rate_limit:g}")
    if rule.burst is not None and not 1 <= rule.burst <= MAX_BURST:
        c.add(f"{where}.burst", f"must be between 1 and {MAX_BURST}, got {rule.burst}")



def check_rule(c: Problems, key: str, rule: AllowRule, names: set[str], proxy_protocol: bool) -> None:
    """Everything the policy would refuse, each under its own key (the policy compiles with the same checks)."""
    problem = values.check_rule_name(rule.name)
    if problem is not None:
        c.add(f"{key}.name", problem)
    elif rule.name in names:
        c.add(f"{key}.name", f"duplicate rule name {rule.name!r}")
    names.add(rule.name)
    problem = values.missing_identity({f: getattr(rule, f) for f in values.IDENTITY_FIELDS})
    if problem is not None:
        c.add(key, problem)
    if rule.source_vpce and not proxy_protocol:
        c.add(f"{key}.source_vpce", "needs server.proxy_protocol = true (the id arrives in PROXY v2)")
    for name, check in values.RULE_FIELDS.items():
        for j, value in enumerate(getattr(rule, name)):
            problem = "must not be empty" if not value else check(value)[0]
            if problem is not None:
                c.add(f"{key}.{name}[{j}]", problem)
