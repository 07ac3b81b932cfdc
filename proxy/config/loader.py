"""Loading a configuration: the TOML file, the ``MTLS_PROXY_*`` environment overrides, and validation.

Owns: the schema tables (every key and its raw type), turning TOML values and environment strings into the
dataclasses of ``model.py``, and collecting every problem as a ``ConfigError`` naming its key (``server.listen``,
``MTLS_PROXY_SERVER_LISTEN``, ``allow[2].paths[0]``), reported together.  ``load()`` is the only place in the
package that reads the environment; the ``check`` and ``serve`` commands share it.

Environment overrides: ``MTLS_PROXY_<SECTION>_<KEY>`` (``MTLS_PROXY_UPSTREAM_READ_TIMEOUT=45``), top-level keys as
``MTLS_PROXY_<KEY>``, lists as JSON arrays, the whole rule list as JSON in ``MTLS_PROXY_ALLOW``.  An unknown
``MTLS_PROXY_*`` variable is an error, so a typo cannot silently leave a default in place.

PEM sources (``cert``, ``key``, ``client_ca``, ``crl``, ``ca_bundle``) are file paths, ``env:NAME`` (the PEM text of
environment variable NAME, how ECS injects secrets), or remote sources: ``s3://bucket/key``,
``secretsmanager:NAME_OR_ARN``, ``ssm:/parameter/name``; ``https://`` for CA bundles and the CRL, ``http://`` for
the CRL only (``proxy.sources.location`` owns the grammar; this module decides which key takes which kind).  Relative paths in the file
are relative to the file's directory; relative paths from the environment are relative to the working directory.

Must not: open certificates or sockets (``proxy.tls`` loads and checks the PEM files), or exit the process.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import cpus
from ..errors import ConfigError, ConfigErrors
from ..sources import location
from . import rules as rules_doc
from . import values
from .model import (
    DEFAULTS,
    ENV_PREFIX,
    ENVIRONMENT,
    AdminConfig,
    AllowRule,
    Config,
    IdentityConfig,
    LogConfig,
    MetricsConfig,
    PemSource,
    ServerConfig,
    UpstreamConfig,
)

# --- schema --------------------------------------------------------------------------------------------------
# Raw key types; the section tables below drive both TOML and environment parsing.
_STR, _BOOL, _INT, _FLOAT, _LIST, _PEM, _ADDR = "str", "bool", "int", "float", "list", "pem", "address"
_WORKERS = "workers"  # an integer, or "auto": the CPUs this process may use (proxy.cpus), resolved at load
# PEM keys by what they may hold: a certificate or private key never comes over a plain URL; CA bundles may come
# from https:// (verified with the system trust store); a CRL (signed by its CA) also from an http:// distribution
# point.  A CA bundle over plain http:// would let anyone on the path choose the proxy's trust anchors.
_PEM_PUBLIC, _PEM_CRL, _RULES_SRC = "pem-public", "pem-crl", "rules-source"
_PEM_KINDS = {_PEM: location.KINDS_FOR_SECRETS, _PEM_PUBLIC: location.KINDS_FOR_PUBLIC,
              _PEM_CRL: location.KINDS_FOR_CRL, _RULES_SRC: location.KINDS_FOR_PUBLIC}

_SERVER_KEYS = {
    "listen": _ADDR, "cert": _PEM, "key": _PEM, "client_ca": _PEM_PUBLIC, "crl": _PEM_CRL, "tls_versions": _LIST,
    "ciphers": _STR, "verify_depth": _INT, "send_client_ca_names": _BOOL, "client_sigalgs": _STR, "max_body_bytes": _INT, "proxy_protocol": _BOOL,
    "proxy_protocol_timeout": _FLOAT, "handshake_timeout": _FLOAT, "header_timeout": _FLOAT,
    "idle_timeout": _FLOAT, "max_connections": _INT, "workers": _WORKERS, "shutdown_timeout": _FLOAT,
    "reload_interval": _FLOAT, "crl_warn_days": _FLOAT,
}
_UPSTREAM_KEYS = {
    "url": _STR, "connect_to": _ADDR, "api_id": _STR, "ca_bundle": _PEM_PUBLIC, "verify": _BOOL,
    "connect_timeout": _FLOAT, "read_timeout": _FLOAT, "pool_max_idle": _INT, "pool_idle_timeout": _FLOAT,
}
_ADMIN_KEYS = {"listen": _ADDR}
_LOG_KEYS = {"access": _BOOL, "level": _STR}
_METRICS_KEYS = {"emf": _BOOL, "namespace": _STR, "interval": _FLOAT}
_IDENTITY_KEYS = {"client_cert_header": _BOOL}
_RULE_KEYS = {
    "name": _STR, "subject_cn": _LIST, "san_dns": _LIST, "san_uri": _LIST, "fingerprint_sha256": _LIST,
    "source_vpce": _LIST, "methods": _LIST, "paths": _LIST, "rate_limit": _FLOAT, "burst": _INT,
}
_SECTIONS = {"server": _SERVER_KEYS, "upstream": _UPSTREAM_KEYS, "admin": _ADMIN_KEYS, "log": _LOG_KEYS,
             "identity": _IDENTITY_KEYS, "metrics": _METRICS_KEYS}
_TOP_KEYS = {"allow_all_verified": _BOOL, "allow_from": _RULES_SRC}
_REQUIRED = {"server": ("cert", "key", "client_ca"), "upstream": ("url",)}

_PLACEHOLDERS: dict[str, Any] = {"cert": PemSource(Path("-")), "key": PemSource(Path("-")),
                                 "client_ca": PemSource(Path("-")), "url": "https://invalid"}
_LEVELS = ("debug", "info", "warning", "error")


class _Collector:
    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def add(self, key: str, message: str) -> None:
        self.errors.append(ConfigError(key, message))

    def named(self, *keys: str) -> bool:
        return any(e.key in keys for e in self.errors)


def _printable(key: str) -> str:
    # TOML allows any quoted key ("a\nb"); echoed raw it would break "one line per problem".
    return key if key.isprintable() else repr(key)


def _convert(kind: str, value: Any, base_dir: Path | None, from_env: bool) -> Any:
    """Turn a TOML value (or an environment string) into the schema type, or raise ValueError."""
    if from_env and kind in (_BOOL, _INT, _FLOAT, _LIST):
        value = _env_scalar(kind, value)
    if kind == _STR:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return value
    if kind == _BOOL:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind == _INT:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if kind == _FLOAT:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if kind == _WORKERS:
        if from_env:
            value = value.strip()
            value = int(value) if re.fullmatch(r"[+-]?[0-9]+", value) else value
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer or \"auto\", got {value!r}")
        return value
    if kind == _LIST:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError("expected a list of strings")
        return tuple(value)
    if kind == _ADDR:
        if not isinstance(value, str):
            raise ValueError("expected a \"host:port\" string")
        return values.parse_address(value)
    if kind in _PEM_KINDS:
        loc = location.parse_location(value, base_dir)
        if loc.kind not in _PEM_KINDS[kind]:
            if kind == _PEM:
                raise ValueError(f"{loc}: a certificate or private key cannot come from an {loc.kind}:// URL "
                                 "(use a file, env:, s3://, secretsmanager: or ssm:)")
            raise ValueError(f"{loc}: plain http:// is accepted only for server.crl (a signed CRL); "
                             "use https://")
        return PemSource(path=loc.path, env=loc.env, uri=loc.uri)
    raise AssertionError(kind)


def _env_scalar(kind: str, text: str) -> Any:
    if kind == _BOOL:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind == _INT:
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if kind == _FLOAT:
        try:
            return float(text.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"expected a JSON array: {exc.msg}") from None


def _read_section(
    raw: Mapping[str, Any], schema: Mapping[str, str], prefix: str, base_dir: Path | None, c: _Collector
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = prefix + _printable(key)
        kind = schema.get(key)
        if kind is None:
            c.add(name, "unknown key")
            continue
        try:
            out[key] = _convert(kind, value, base_dir, from_env=False)
        except ValueError as exc:
            c.add(name, str(exc))
    return out


def _apply_env(environ: Mapping[str, str], values: dict[str, dict[str, Any]], top: dict[str, Any],
               rules_raw: list[Any] | None, c: _Collector) -> tuple[list[Any] | None, bool]:
    """Apply overrides in place; returns the raw rule list and whether it came from ``MTLS_PROXY_ALLOW``."""
    from_env = False
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        text = environ[var]
        rest = var[len(ENV_PREFIX):].lower()
        if rest == "allow":
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                c.add(var, f"expected a JSON array of rule objects: {exc.msg}")
                continue
            rules_raw, from_env = parsed, True
            continue
        if rest in _TOP_KEYS:
            try:
                top[rest] = _convert(_TOP_KEYS[rest], text, None, from_env=True)
            except ValueError as exc:
                c.add(var, str(exc))
            continue
        section, _, key = rest.partition("_")
        schema = _SECTIONS.get(section)
        if schema is None or key not in schema:
            c.add(var, "unknown setting (expected MTLS_PROXY_<SECTION>_<KEY> naming a known key)")
            continue
        try:
            values[section][key] = _convert(schema[key], text, Path.cwd(), from_env=True)
        except ValueError as exc:
            c.add(var, str(exc))
    return rules_raw, from_env


def load(path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (TOML; may be None for environment-only configuration), apply overrides, validate.

    Raises ConfigErrors listing every problem, each naming its key or file.
    """
    environ = os.environ if environ is None else environ
    c = _Collector()
    doc: dict[str, Any] = {}
    base_dir: Path | None = None
    source = ENVIRONMENT
    if path is not None:
        p = Path(path)
        source = str(p)
        base_dir = p.resolve().parent
        try:
            with p.open("rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigErrors([ConfigError(str(p), "config file not found")]) from None
        except OSError as exc:
            raise ConfigErrors([ConfigError(str(p), f"cannot read: {exc.strerror}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigErrors([ConfigError(str(p), f"invalid TOML: {exc}")]) from None

    values: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    top: dict[str, Any] = {}
    rules_raw: list[Any] | None = None
    for key, value in doc.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                c.add(key, "expected a table")
                continue
            values[key] = _read_section(value, _SECTIONS[key], f"{key}.", base_dir, c)
        elif key == "allow":
            rules_raw = value
        elif key in _TOP_KEYS:
            try:
                top[key] = _convert(_TOP_KEYS[key], value, base_dir, from_env=False)
            except ValueError as exc:
                c.add(key, str(exc))
        else:
            c.add(_printable(key), "unknown key")
    rules_raw, rules_from_env = _apply_env(environ, values, top, rules_raw, c)
    rules_key = f"{ENV_PREFIX}ALLOW" if rules_from_env else "allow"
    allow_from: PemSource | None = top.pop("allow_from", None)
    if allow_from is not None:
        if rules_raw is not None:
            c.add("allow_from", f"{rules_key} rules and allow_from together: give the rules in one place")
        else:
            rules_raw, rules_key = rules_doc.read_rules_document(allow_from, environ, c), "allow_from.allow"

    for section, keys in _REQUIRED.items():
        for key in keys:
            if key not in values[section]:
                # A key that is present but wrong already has its line; "required" would be a second one.
                if not c.named(section, f"{section}.{key}", f"{ENV_PREFIX}{section.upper()}_{key.upper()}"):
                    c.add(f"{section}.{key}", "required")
                # A stand-in (never used: there is an error) lets the other values be checked in the same run.
                values[section][key] = _PLACEHOLDERS[key]
    rules = _rules(rules_raw, base_dir, c, rules_key)
    cfg = _build(values, top, rules, rules_key, source, environ, c, allow_from)
    if c.errors or cfg is None:
        raise ConfigErrors(c.errors)
    return cfg


def _rules(raw: Any, base_dir: Path | None, c: _Collector, where: str) -> tuple[AllowRule, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.add(where, "expected a list of rules ([[allow]] tables)")
        return ()
    rules = []
    for i, item in enumerate(raw):
        key = f"{where}[{i}]"
        if not isinstance(item, dict):
            c.add(key, "expected a table")
            continue
        vals = _read_section(item, _RULE_KEYS, f"{key}.", base_dir, c)
        if "name" not in vals:
            c.add(f"{key}.name", "required")
            continue
        rules.append(AllowRule(**vals))
    return tuple(rules)


def _check_range(c: _Collector, key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        c.add(key, f"must be between {low:g} and {high:g}, got {value:g}")


def _build(values: dict[str, dict[str, Any]], top: dict[str, Any], rules: tuple[AllowRule, ...], rules_key: str,
           source: str, environ: Mapping[str, str], c: _Collector,
           allow_from: PemSource | None = None) -> Config | None:
    s, u = values["server"], values["upstream"]
    if s.get("workers") == "auto":
        s["workers"] = cpus.available()
    server = ServerConfig(**s)
    versions = server.tls_versions
    if not versions or any(v not in ("1.2", "1.3") for v in versions):
        c.add("server.tls_versions", f"only \"1.2\" and \"1.3\" are supported, got {list(versions)}")
    if not server.ciphers.strip():
        c.add("server.ciphers", "must not be empty")
    _check_range(c, "server.verify_depth", server.verify_depth, 0, 16)
    _check_range(c, "server.max_body_bytes", server.max_body_bytes, 0, 2**40)
    _check_range(c, "server.workers", server.workers, 1, 256)
    _check_range(c, "server.max_connections", server.max_connections, 1, 10**7)
    for key in ("proxy_protocol_timeout", "handshake_timeout", "header_timeout", "idle_timeout",
                "shutdown_timeout"):
        _check_range(c, f"server.{key}", getattr(server, key), 0.01, 86400)
    _check_range(c, "server.reload_interval", server.reload_interval, 0, 86400)
    _check_range(c, "server.crl_warn_days", server.crl_warn_days, 0, 3650)

    upstream = _build_upstream(u, c)
    admin = AdminConfig(**values["admin"])
    log = LogConfig(**values["log"])
    if log.level not in _LEVELS:
        c.add("log.level", f"must be one of {', '.join(_LEVELS)}")
    metrics = _build_metrics(values["metrics"], c)
    if admin.listen == server.listen and server.listen.port != 0:  # port 0: each gets its own free port
        c.add("admin.listen", "must differ from server.listen")

    for src_key, src in (("server.cert", server.cert), ("server.key", server.key),
                         ("server.client_ca", server.client_ca), ("server.crl", server.crl),
                         ("upstream.ca_bundle", u.get("ca_bundle"))):
        if src is not None and src.env and src.env not in environ:
            c.add(src_key, f"environment variable {src.env} is not set")

    allow_all = top.get("allow_all_verified", False)
    names: set[str] = set()
    for i, rule in enumerate(rules):
        rules_doc.check_rule(c, f"{rules_key}[{i}]", rule, names, server.proxy_protocol)
        rules_doc.check_limit(c, f"{rules_key}[{i}]", rule)
    # Rules that were given but are broken already have their lines; "no rules" would be a second one.
    broken = any(e.key.split("[")[0] in (rules_key, f"{ENV_PREFIX}ALLOW", "allow_from") for e in c.errors)
    if not rules and not allow_all and not broken:
        c.add("allow", "no [[allow]] rules: every request would be refused "
                       "(add a rule, or set allow_all_verified = true to admit any verified client)")
    if c.errors or upstream is None:
        return None
    watched = tuple(sorted({src.path for src in (server.cert, server.key, server.client_ca, server.crl,
                                                upstream.ca_bundle, allow_from)
                            if src is not None and src.path is not None}))
    if source not in (ENVIRONMENT, DEFAULTS):
        watched = (Path(source).resolve(), *watched)
    return Config(server=server, upstream=upstream, admin=admin, log=log, metrics=metrics,
                  identity=IdentityConfig(**values["identity"]), allow=rules,
                  allow_all_verified=allow_all, allow_from=allow_from, source=source, watched_files=watched)


def _build_upstream(u: dict[str, Any], c: _Collector) -> UpstreamConfig | None:
    url = u.pop("url")
    try:
        target: tuple[str, int, str] | None = values.parse_url(url)
    except ValueError as exc:
        c.add("upstream.url", str(exc))
        target = None
    host, port, base_path = target or ("invalid", 443, "")  # placeholder: still check the other upstream keys
    up = UpstreamConfig(url=url, scheme="https", host=host, port=port, base_path=base_path, **u)
    if up.api_id is not None and not values.API_ID.fullmatch(up.api_id):
        c.add("upstream.api_id", f"not an API Gateway id (lowercase letters and digits): {up.api_id!r}")
    _check_range(c, "upstream.connect_timeout", up.connect_timeout, 0.01, 3600)
    _check_range(c, "upstream.read_timeout", up.read_timeout, 0.01, 86400)
    _check_range(c, "upstream.pool_max_idle", up.pool_max_idle, 0, 100000)
    _check_range(c, "upstream.pool_idle_timeout", up.pool_idle_timeout, 0.01, 86400)
    return up if target else None


def _build_metrics(m: dict[str, Any], c: _Collector) -> MetricsConfig:
    metrics = MetricsConfig(**m)
    problem = values.check_namespace(metrics.namespace)
    if problem is not None:
        c.add("metrics.namespace", problem)
    _check_range(c, "metrics.interval", metrics.interval, 0.1, 3600)
    return metrics
