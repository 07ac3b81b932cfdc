"""proxy.config.loader (config.load): the TOML schema, MTLS_PROXY_* overrides, and one ConfigError line per problem.

Every test passes an explicit ``environ`` mapping, so nothing here depends on (or changes) the process environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from proxy import config, cpus
from proxy.config import Address, AllowRule, PemSource
from proxy.errors import ConfigErrors
from proxy.sources.location import SYNTAX
from proxy.policy import Policy, PolicyError

FINGERPRINT = ":".join(["AB"] * 32)

MINIMAL = """\
[server]
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"

[upstream]
url = "https://abc123.execute-api.us-east-1.amazonaws.com/prod"

[[allow]]
name = "partner-a"
subject_cn = ["client-a"]
"""

# The issue's example, key for key (``san_dns = []; san_uri = []`` split onto two lines: ";" is not TOML).
ISSUE_EXAMPLE = """\
allow_all_verified = false
[server]
listen = "0.0.0.0:8443"
cert = "server.crt"
key = "server.key"
client_ca = "ca.crt"
crl = "crl.pem"
tls_versions = ["1.2", "1.3"]
ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
verify_depth = 2
max_body_bytes = 10485760
[upstream]
url = "https://abc123.execute-api.us-east-1.amazonaws.com/prod"
connect_to = "vpce-0abc-xyz.execute-api.us-east-1.vpce.amazonaws.com:443"
api_id = "abc123"
ca_bundle = "path"
verify = true
connect_timeout = 5.0
read_timeout = 30.0
[[allow]]
name = "partner-a"
subject_cn = ["client-a"]
san_dns = []
san_uri = []
fingerprint_sha256 = []
methods = ["GET", "POST"]
paths = ["/orders/*"]
[admin]
listen = "127.0.0.1:9100"
"""


def write(directory: Path, text: str, name: str = "proxy.toml") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(path: Path | None, env: dict[str, str] | None = None) -> config.Config:
    return config.load(path, env or {})


def errors(path: Path | None, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        config.load(path, env or {})
    lines = [str(e) for e in info.value.errors]
    # One line per problem: the exception text is exactly those lines, none of them spans two.
    assert str(info.value).split("\n") == lines
    assert all("\n" not in line and "\r" not in line for line in lines)
    return lines


def edit(text: str, section: str, line: str) -> str:
    """Insert ``line`` right after the ``[section]`` header (``""`` = top of the file)."""
    if not section:
        return line + "\n" + text
    header = f"[{section}]\n"
    assert header in text
    return text.replace(header, header + line + "\n", 1)


# ---- defaults and the documented example ---------------------------------------------------------------


DEFAULTS = [
    ("server.listen", Address("0.0.0.0", 8443)),
    ("server.crl", None),
    ("server.tls_versions", ("1.2", "1.3")),
    ("server.ciphers", config.DEFAULT_CIPHERS),
    ("server.verify_depth", 2),
    ("server.max_body_bytes", 10 * 1024 * 1024),
    ("server.proxy_protocol", False),
    ("server.proxy_protocol_timeout", 3.0),
    ("server.handshake_timeout", 10.0),
    ("server.header_timeout", 10.0),
    ("server.idle_timeout", 60.0),
    ("server.max_connections", 10000),
    ("server.workers", 1),
    ("server.shutdown_timeout", 25.0),
    ("server.reload_interval", 30.0),
    ("upstream.connect_to", None),
    ("upstream.api_id", None),
    ("upstream.ca_bundle", None),
    ("upstream.verify", True),
    ("upstream.connect_timeout", 5.0),
    ("upstream.read_timeout", 30.0),
    ("upstream.pool_max_idle", 64),
    ("upstream.pool_idle_timeout", 30.0),
    ("admin.listen", Address("127.0.0.1", 9100)),
    ("log.access", True),
    ("log.level", "info"),
    ("metrics.emf", False),
    ("metrics.namespace", "mtls-proxy"),
    ("metrics.interval", 60.0),
    ("allow_all_verified", False),
]


def attr(cfg: config.Config, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize(("key", "expected"), DEFAULTS, ids=[k for k, _ in DEFAULTS])
def test_defaults(tmp_path: Path, key: str, expected: Any) -> None:
    assert attr(load(write(tmp_path, MINIMAL)), key) == expected


def test_issue_example_parses_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, ISSUE_EXAMPLE)
    cfg = load(path)
    s, u = cfg.server, cfg.upstream
    assert cfg.allow_all_verified is False
    assert s.listen == Address("0.0.0.0", 8443)
    assert (s.cert, s.key, s.client_ca, s.crl) == tuple(
        PemSource(path=tmp_path / n) for n in ("server.crt", "server.key", "ca.crt", "crl.pem"))
    assert s.tls_versions == ("1.2", "1.3")
    assert s.ciphers == "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
    assert (s.verify_depth, s.max_body_bytes) == (2, 10485760)
    assert u.url == "https://abc123.execute-api.us-east-1.amazonaws.com/prod"
    assert (u.scheme, u.host, u.port, u.base_path) == ("https", "abc123.execute-api.us-east-1.amazonaws.com", 443,
                                                       "/prod")
    assert u.host_header == "abc123.execute-api.us-east-1.amazonaws.com"
    assert u.connect_to == Address("vpce-0abc-xyz.execute-api.us-east-1.vpce.amazonaws.com", 443)
    assert u.dial == u.connect_to
    assert (u.api_id, u.ca_bundle, u.verify) == ("abc123", PemSource(path=tmp_path / "path"), True)
    assert (u.connect_timeout, u.read_timeout) == (5.0, 30.0)
    assert cfg.allow == (AllowRule(name="partner-a", subject_cn=("client-a",), methods=("GET", "POST"),
                                   paths=("/orders/*",)),)
    assert cfg.admin.listen == Address("127.0.0.1", 9100)
    assert cfg.source == str(path)
    assert cfg.watched_files == (path.resolve(), *sorted(
        tmp_path / n for n in ("server.crt", "server.key", "ca.crt", "crl.pem", "path")))


def test_keys_not_in_the_example_parse(tmp_path: Path) -> None:
    text = MINIMAL.replace("[upstream]\n", "[upstream]\npool_max_idle = 0\npool_idle_timeout = 2.5\n")
    text = edit(text, "server", "proxy_protocol = true\nproxy_protocol_timeout = 1\nhandshake_timeout = 2\n"
                                "header_timeout = 3\nidle_timeout = 4\nmax_connections = 5\nworkers = 6\n"
                                "shutdown_timeout = 7\nreload_interval = 0")
    text += '\n[log]\naccess = false\nlevel = "debug"\n'
    text += '[[allow]]\nname = "b"\nsan_uri = ["spiffe://b/*"]\nsource_vpce = ["vpce-0a1b"]\n'
    cfg = load(write(tmp_path, text))
    s = cfg.server
    assert (s.proxy_protocol, s.proxy_protocol_timeout, s.handshake_timeout, s.header_timeout) == (True, 1, 2, 3)
    assert (s.idle_timeout, s.max_connections, s.workers, s.shutdown_timeout) == (4, 5, 6, 7)
    assert isinstance(s.proxy_protocol_timeout, float) and s.reload_interval == 0
    assert (cfg.upstream.pool_max_idle, cfg.upstream.pool_idle_timeout) == (0, 2.5)
    assert (cfg.log.access, cfg.log.level) == (False, "debug")
    assert cfg.allow[1] == AllowRule(name="b", san_uri=("spiffe://b/*",), source_vpce=("vpce-0a1b",))


# ---- paths and PEM sources ----------------------------------------------------------------------------


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = MINIMAL.replace('"server.crt"', '"certs/server.crt"').replace('"ca.crt"', '"/etc/pki/ca.crt"')
    cfg = load(write(tmp_path / "conf", text))
    assert cfg.server.cert == PemSource(path=tmp_path / "conf" / "certs" / "server.crt")
    assert cfg.server.key == PemSource(path=tmp_path / "conf" / "server.key")
    assert cfg.server.client_ca == PemSource(path=Path("/etc/pki/ca.crt"))


def test_relative_paths_from_the_environment_are_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load(write(tmp_path / "conf", MINIMAL), {"MTLS_PROXY_SERVER_KEY": "keys/k.pem"})
    assert cfg.server.key == PemSource(path=tmp_path / "keys" / "k.pem")


@pytest.mark.parametrize("key", ["cert", "key", "client_ca", "crl"])
def test_env_pem_source(tmp_path: Path, key: str) -> None:
    text = MINIMAL if key == "crl" else MINIMAL.replace(f"\n{key} = ", "\n# ")
    text = edit(text, "server", f'{key} = "env:PEM_{key.upper()}"')
    cfg = load(write(tmp_path, text), {f"PEM_{key.upper()}": "-----BEGIN X-----"})
    assert getattr(cfg.server, key) == PemSource(env=f"PEM_{key.upper()}")
    assert str(getattr(cfg.server, key)) == f"env:PEM_{key.upper()}"
    assert all(p.name != f"PEM_{key.upper()}" for p in cfg.watched_files)  # an env source is never watched


@pytest.mark.parametrize("key, section", [("cert", "server"), ("key", "server"), ("client_ca", "server"),
                                          ("crl", "server"), ("ca_bundle", "upstream")])
@pytest.mark.parametrize("text", ["s3://pki-bucket/proxy/material.pem", "secretsmanager:proxy/server",
                                  "secretsmanager:arn:aws:secretsmanager:eu-west-1:123456789012:secret:p-AbCdEf",
                                  "ssm:/proxy/material"])
def test_aws_pem_sources_for_every_key(tmp_path: Path, key: str, section: str, text: str) -> None:
    base = MINIMAL if key in ("crl", "ca_bundle") else MINIMAL.replace(f"\n{key} = ", "\n# ")
    cfg = load(write(tmp_path, edit(base, section, f'{key} = "{text}"')))
    src = getattr(getattr(cfg, section), key)
    assert src == PemSource(uri=text) and src.remote and str(src) == text
    assert src.location.kind == text.split(":", 1)[0]
    assert all(p.name != text.rsplit("/", 1)[-1] for p in cfg.watched_files)  # polled, not watched


@pytest.mark.parametrize("key, section, allowed", [
    ("cert", "server", ()), ("key", "server", ()), ("client_ca", "server", ("https",)),
    ("crl", "server", ("https", "http")), ("ca_bundle", "upstream", ("https",))])
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_urls_only_for_public_material(tmp_path: Path, key: str, section: str, allowed: tuple[str, ...],
                                       scheme: str) -> None:
    base = MINIMAL if key in ("crl", "ca_bundle") else MINIMAL.replace(f"\n{key} = ", "\n# ")
    url = f"{scheme}://pki.example.com/ca/current.pem?token=s3cret"
    path = write(tmp_path, edit(base, section, f'{key} = "{url}"'))
    if scheme in allowed:
        assert getattr(getattr(load(path), section), key) == PemSource(uri=url)
        assert "s3cret" not in str(getattr(getattr(load(path), section), key))
        return
    lines = errors(path)
    assert len(lines) == 1 and lines[0].startswith(f"{section}.{key}: {scheme}://pki.example.com/"), lines
    assert "s3cret" not in lines[0]


@pytest.mark.parametrize("text, fragment", [
    ("s3://Bad_Bucket/key", "not an S3 bucket name"), ("s3://bucket", "object key is missing"),
    ("s3:bucket/key", "expected s3://bucket/key"), ("ssm://x", "expected ssm:/parameter/name"),
    ("secretsmanager:", "expected secretsmanager:NAME_OR_ARN"), ("ftp://host/x", "unknown source scheme")])
def test_bad_remote_source_is_one_line_naming_the_key(tmp_path: Path, text: str, fragment: str) -> None:
    lines = errors(write(tmp_path, edit(MINIMAL, "server", f'crl = "{text}"')))
    assert len(lines) == 1 and lines[0].startswith("server.crl: ") and fragment in lines[0], lines


def test_remote_source_from_the_environment(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, MINIMAL), {"MTLS_PROXY_SERVER_CRL": "s3://pki-bucket/crl.der"})
    assert cfg.server.crl == PemSource(uri="s3://pki-bucket/crl.der")
    assert errors(write(tmp_path, MINIMAL), {"MTLS_PROXY_SERVER_KEY": "https://h/k.pem"})[0].startswith(
        "MTLS_PROXY_SERVER_KEY: https://h/k.pem: a certificate or private key cannot come from")


def test_env_pem_source_for_upstream_ca_bundle(tmp_path: Path) -> None:
    text = edit(MINIMAL, "upstream", 'ca_bundle = "env:API_CA"')
    assert load(write(tmp_path, text), {"API_CA": "pem"}).upstream.ca_bundle == PemSource(env="API_CA")
    assert errors(write(tmp_path, text)) == ["upstream.ca_bundle: environment variable API_CA is not set"]


def test_env_pem_source_unset_variable_is_named(tmp_path: Path) -> None:
    text = MINIMAL.replace('key = "server.key"', 'key = "env:TLS_KEY"')
    assert errors(write(tmp_path, text)) == ["server.key: environment variable TLS_KEY is not set"]


# ---- environment overrides ----------------------------------------------------------------------------

# (variable, text, dotted attribute, expected value): one row per schema key.
ENV_TABLE: list[tuple[str, str, str, Any]] = [
    ("MTLS_PROXY_SERVER_LISTEN", "[::1]:9443", "server.listen", Address("::1", 9443)),
    ("MTLS_PROXY_SERVER_CERT", "/run/s.crt", "server.cert", PemSource(path=Path("/run/s.crt"))),
    ("MTLS_PROXY_SERVER_KEY", "env:KEY_PEM", "server.key", PemSource(env="KEY_PEM")),
    ("MTLS_PROXY_SERVER_CLIENT_CA", "/run/ca.crt", "server.client_ca", PemSource(path=Path("/run/ca.crt"))),
    ("MTLS_PROXY_SERVER_CRL", "/run/crl.pem", "server.crl", PemSource(path=Path("/run/crl.pem"))),
    ("MTLS_PROXY_SERVER_TLS_VERSIONS", '["1.2"]', "server.tls_versions", ("1.2",)),
    ("MTLS_PROXY_SERVER_CIPHERS", "ECDHE+AESGCM", "server.ciphers", "ECDHE+AESGCM"),
    ("MTLS_PROXY_SERVER_VERIFY_DEPTH", "3", "server.verify_depth", 3),
    ("MTLS_PROXY_SERVER_SEND_CLIENT_CA_NAMES", "false", "server.send_client_ca_names", False),
    ("MTLS_PROXY_SERVER_CLIENT_SIGALGS", "ECDSA+SHA256", "server.client_sigalgs", "ECDSA+SHA256"),
    ("MTLS_PROXY_SERVER_MAX_BODY_BYTES", " 1024 ", "server.max_body_bytes", 1024),
    ("MTLS_PROXY_SERVER_PROXY_PROTOCOL", "true", "server.proxy_protocol", True),
    ("MTLS_PROXY_SERVER_PROXY_PROTOCOL_TIMEOUT", "1.5", "server.proxy_protocol_timeout", 1.5),
    ("MTLS_PROXY_SERVER_HANDSHAKE_TIMEOUT", "4", "server.handshake_timeout", 4.0),
    ("MTLS_PROXY_SERVER_HEADER_TIMEOUT", "2.5", "server.header_timeout", 2.5),
    ("MTLS_PROXY_SERVER_IDLE_TIMEOUT", "90", "server.idle_timeout", 90.0),
    ("MTLS_PROXY_SERVER_MAX_CONNECTIONS", "50", "server.max_connections", 50),
    ("MTLS_PROXY_SERVER_WORKERS", "4", "server.workers", 4),
    ("MTLS_PROXY_SERVER_SHUTDOWN_TIMEOUT", "100", "server.shutdown_timeout", 100.0),
    ("MTLS_PROXY_SERVER_RELOAD_INTERVAL", "0", "server.reload_interval", 0.0),
    ("MTLS_PROXY_SERVER_CRL_WARN_DAYS", "2", "server.crl_warn_days", 2.0),
    ("MTLS_PROXY_UPSTREAM_URL", "https://x1.execute-api.eu-west-1.amazonaws.com:8443/v1/",
     "upstream.url", "https://x1.execute-api.eu-west-1.amazonaws.com:8443/v1/"),
    ("MTLS_PROXY_UPSTREAM_CONNECT_TO", "10.0.0.5:443", "upstream.connect_to", Address("10.0.0.5", 443)),
    ("MTLS_PROXY_UPSTREAM_API_ID", "x1", "upstream.api_id", "x1"),
    ("MTLS_PROXY_UPSTREAM_CA_BUNDLE", "/run/api-ca.pem", "upstream.ca_bundle", PemSource(path=Path("/run/api-ca.pem"))),
    ("MTLS_PROXY_UPSTREAM_VERIFY", "off", "upstream.verify", False),
    ("MTLS_PROXY_UPSTREAM_CONNECT_TIMEOUT", "0.5", "upstream.connect_timeout", 0.5),
    ("MTLS_PROXY_UPSTREAM_READ_TIMEOUT", "45", "upstream.read_timeout", 45.0),
    ("MTLS_PROXY_UPSTREAM_POOL_MAX_IDLE", "0", "upstream.pool_max_idle", 0),
    ("MTLS_PROXY_UPSTREAM_POOL_IDLE_TIMEOUT", "5", "upstream.pool_idle_timeout", 5.0),
    ("MTLS_PROXY_ADMIN_LISTEN", "0.0.0.0:9200", "admin.listen", Address("0.0.0.0", 9200)),
    ("MTLS_PROXY_LOG_ACCESS", "0", "log.access", False),
    ("MTLS_PROXY_LOG_LEVEL", "warning", "log.level", "warning"),
    ("MTLS_PROXY_METRICS_EMF", "true", "metrics.emf", True),
    ("MTLS_PROXY_METRICS_NAMESPACE", "mtls-proxy/prod-stack", "metrics.namespace", "mtls-proxy/prod-stack"),
    ("MTLS_PROXY_METRICS_INTERVAL", "30", "metrics.interval", 30.0),
    ("MTLS_PROXY_ALLOW_ALL_VERIFIED", "yes", "allow_all_verified", True),
    ("MTLS_PROXY_IDENTITY_CLIENT_CERT_HEADER", "true", "identity.client_cert_header", True),
]


def test_env_table_covers_every_schema_key() -> None:
    expected = {f"MTLS_PROXY_{section.upper()}_{key.upper()}"
                for section, keys in config.loader._SECTIONS.items() for key in keys}
    # MTLS_PROXY_ALLOW_FROM replaces the inline rules MINIMAL has: test_allow_from_the_environment covers it.
    expected |= {f"MTLS_PROXY_{key.upper()}" for key in config.loader._TOP_KEYS if key != "allow_from"}
    assert {row[0] for row in ENV_TABLE} == expected


@pytest.mark.parametrize(("var", "text", "key", "expected"), ENV_TABLE, ids=[r[0] for r in ENV_TABLE])
def test_env_override(tmp_path: Path, var: str, text: str, key: str, expected: Any) -> None:
    cfg = load(write(tmp_path, MINIMAL), {var: text, "KEY_PEM": "x"})
    value = attr(cfg, key)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
    ("0", False), ("false", False), ("No", False), ("off", False),
])
def test_env_bool_spellings(tmp_path: Path, text: str, expected: bool) -> None:
    assert load(write(tmp_path, MINIMAL), {"MTLS_PROXY_UPSTREAM_VERIFY": text}).upstream.verify is expected


def test_env_beats_the_file(tmp_path: Path) -> None:
    text = edit(edit(MINIMAL, "upstream", "read_timeout = 10.0"), "server", 'listen = "127.0.0.1:1000"')
    cfg = load(write(tmp_path, text), {"MTLS_PROXY_UPSTREAM_READ_TIMEOUT": "45",
                                       "MTLS_PROXY_SERVER_LISTEN": "127.0.0.1:2000"})
    assert cfg.upstream.read_timeout == 45.0
    assert cfg.server.listen == Address("127.0.0.1", 2000)


def test_env_allow_replaces_the_whole_rule_list(tmp_path: Path) -> None:
    rules = ('[{"name": "env-a", "subject_cn": ["a"], "methods": ["GET"]},'
             ' {"name": "env-b", "fingerprint_sha256": ["%s"], "paths": ["/x/**"]}]' % FINGERPRINT)
    cfg = load(write(tmp_path, MINIMAL), {"MTLS_PROXY_ALLOW": rules})
    assert cfg.allow == (AllowRule(name="env-a", subject_cn=("a",), methods=("GET",)),
                         AllowRule(name="env-b", fingerprint_sha256=(FINGERPRINT,), paths=("/x/**",)))


def test_env_allow_all_verified_needs_no_rules(tmp_path: Path) -> None:
    text = MINIMAL.split("[[allow]]")[0]
    cfg = load(write(tmp_path, text), {"MTLS_PROXY_ALLOW_ALL_VERIFIED": "true"})
    assert cfg.allow_all_verified is True and cfg.allow == ()
    assert errors(write(tmp_path, text)) == [
        "allow: no [[allow]] rules: every request would be refused (add a rule, or set allow_all_verified = true "
        "to admit any verified client)"]


def test_environment_only_configuration() -> None:
    env = {"MTLS_PROXY_SERVER_CERT": "/c", "MTLS_PROXY_SERVER_KEY": "/k", "MTLS_PROXY_SERVER_CLIENT_CA": "/ca",
           "MTLS_PROXY_UPSTREAM_URL": "https://api.example.com", "MTLS_PROXY_ALLOW": '[{"name":"a","san_dns":["*"]}]',
           "UNRELATED": "ignored"}
    cfg = load(None, env)
    assert cfg.source == "<environment>" and cfg.upstream.base_path == "" and cfg.watched_files == tuple(
        sorted(Path(p) for p in ("/c", "/k", "/ca")))
    # a relative path in a variable is taken from the working directory at start (not at each reload)
    cfg = load(None, {**env, "MTLS_PROXY_SERVER_CERT": "certs/server.crt"})
    assert cfg.server.cert == PemSource(path=Path.cwd() / "certs/server.crt")


# ---- errors: each problem is one line naming the key, variable or file ------------------------------

# (where to insert: section or "" for top level, the line, the key the error must name, a message fragment)
FILE_ERRORS: list[tuple[str, str, str, str]] = [
    ("", "bogus = 1", "bogus", "unknown key"),
    ("", "[bogus]\nx = 1", "bogus", "unknown key"),
    ("", '"a\\nb" = 1', "'a\\nb'", "unknown key"),
    ("server", "bogus = 1", "server.bogus", "unknown key"),
    ("server", "Listen = \"1.2.3.4:5\"", "server.Listen", "unknown key"),
    ("upstream", "bogus = 1", "upstream.bogus", "unknown key"),
    ("allow", "bogus = 1", "allow[0].bogus", "unknown key"),
    ("", "[admin]\nbogus = 1", "admin.bogus", "unknown key"),
    ("", "[log]\nbogus = 1", "log.bogus", "unknown key"),
    # wrong types
    ("server", 'verify_depth = "2"', "server.verify_depth", "expected an integer"),
    ("server", "verify_depth = true", "server.verify_depth", "expected an integer"),
    ("server", "max_body_bytes = 1.5", "server.max_body_bytes", "expected an integer"),
    ("server", 'proxy_protocol = "yes"', "server.proxy_protocol", "expected true or false"),
    ("server", 'tls_versions = "1.2"', "server.tls_versions", "expected a list of strings"),
    ("server", "tls_versions = [1.2]", "server.tls_versions", "expected a list of strings"),
    ("server", "ciphers = 5", "server.ciphers", "expected a string"),
    ("server", "listen = 8443", "server.listen", "host:port"),
    ("server", 'crl = ""', "server.crl", "expected a file path, env:NAME, s3://bucket/key"),
    ("server", 'crl = "env:1BAD"', "server.crl", "bad environment variable name"),
    ("upstream", 'read_timeout = "30"', "upstream.read_timeout", "expected a number"),
    ("upstream", "verify = 1", "upstream.verify", "expected true or false"),
    ("", 'allow_all_verified = "true"', "allow_all_verified", "expected true or false"),
    ("", "[log]\nlevel = \"loud\"", "log.level", "must be one of"),
    ("allow", "san_dns = \"client-a\"", "allow[0].san_dns", "expected a list of strings"),
    # addresses
    ("server", 'listen = "host:99999"', "server.listen", "out of range"),
    ("upstream", 'connect_to = "vpce-1.example.com"', "upstream.connect_to", "host:port"),
    ("", '[admin]\nlisten = "nope"', "admin.listen", "host:port"),
    ("", '[admin]\nlisten = "0.0.0.0:8443"', "admin.listen", "must differ from server.listen"),
    # upstream URL, API id
    ("upstream", 'api_id = "ABC123"', "upstream.api_id", "not an API Gateway id"),
    # TLS and ranges
    ("server", 'tls_versions = ["1.1", "1.2"]', "server.tls_versions", 'only "1.2" and "1.3"'),
    ("server", 'tls_versions = ["1.0"]', "server.tls_versions", 'only "1.2" and "1.3"'),
    ("server", "tls_versions = []", "server.tls_versions", 'only "1.2" and "1.3"'),
    ("server", 'ciphers = "  "', "server.ciphers", "must not be empty"),
    ("server", "verify_depth = 17", "server.verify_depth", "between 0 and 16"),
    ("server", "verify_depth = -1", "server.verify_depth", "between 0 and 16"),
    ("server", "workers = 0", "server.workers", "between 1 and 256"),
    ("server", "max_connections = 0", "server.max_connections", "between 1"),
    ("server", "handshake_timeout = 0", "server.handshake_timeout", "between 0.01"),
    ("server", "idle_timeout = inf", "server.idle_timeout", "between 0.01"),
    ("server", "shutdown_timeout = nan", "server.shutdown_timeout", "between 0.01"),
    ("upstream", "read_timeout = 0", "upstream.read_timeout", "between 0.01"),
    ("upstream", "connect_timeout = -1", "upstream.connect_timeout", "between 0.01"),
    ("upstream", "pool_max_idle = -1", "upstream.pool_max_idle", "between 0"),
    # rules
    ("allow", 'methods = ["get"]', "allow[0].methods[0]", "must be an uppercase HTTP method"),
    ("allow", 'methods = ["GET", "PO ST"]', "allow[0].methods[1]", "must be an uppercase HTTP method"),
    ("allow", 'paths = ["/a/../b"]', "allow[0].paths[0]", "never occur in a normalised path"),
    ("allow", 'san_dns = ["a..b"]', "allow[0].san_dns[0]", "empty label"),
    ("allow", 'san_uri = ["spiffe://a", ""]', "allow[0].san_uri[1]", "must not be empty"),
    ("allow", 'source_vpce = ["vpce-0abc"]', "allow[0].source_vpce", "needs server.proxy_protocol = true"),
]


@pytest.mark.parametrize(("section", "line", "key", "fragment"), FILE_ERRORS,
                         ids=[f"{k}:{line}" for _, line, k, _ in FILE_ERRORS])
def test_file_error_is_one_line_naming_the_key(tmp_path: Path, section: str, line: str, key: str,
                                               fragment: str) -> None:
    if section == "allow":
        text = MINIMAL + line + "\n"
    elif section == "":
        text = MINIMAL + line + "\n" if line.startswith("[") else edit(MINIMAL, "", line)
    else:
        text = edit(MINIMAL, section, line)
    lines = errors(write(tmp_path, text))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{key}: ") and fragment in lines[0], lines[0]


# ---- server.workers = "auto" and the [metrics] section ---------------------------------------------------


def test_workers_auto_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    usable = cpus.available()
    assert 1 <= usable <= len(os.sched_getaffinity(0))
    assert load(write(tmp_path, edit(MINIMAL, "server", 'workers = "auto"'))).server.workers == usable
    assert load(write(tmp_path, MINIMAL), {"MTLS_PROXY_SERVER_WORKERS": " auto "}).server.workers == usable
    assert load(write(tmp_path, MINIMAL), {"MTLS_PROXY_SERVER_WORKERS": "3"}).server.workers == 3


@pytest.mark.parametrize("value", ['"two"', '"Auto"', "1.5", "true", '""', "[2]"])
def test_a_bad_workers_value_is_one_line_naming_the_key(tmp_path: Path, value: str) -> None:
    lines = errors(write(tmp_path, edit(MINIMAL, "server", f"workers = {value}")))
    assert lines == [lines[0]] and lines[0].startswith("server.workers: ") and '"auto"' in lines[0], lines


@pytest.mark.parametrize("text", ["two", "1.5", "", "auto2"])
def test_a_bad_workers_variable_is_one_line_naming_it(tmp_path: Path, text: str) -> None:
    lines = errors(write(tmp_path, MINIMAL), {"MTLS_PROXY_SERVER_WORKERS": text})
    assert len(lines) == 1 and lines[0].startswith("MTLS_PROXY_SERVER_WORKERS: "), lines


def test_the_metrics_section(tmp_path: Path) -> None:
    text = MINIMAL + '[metrics]\nemf = true\nnamespace = "mtls-proxy/stack-1"\ninterval = 10\n'
    m = load(write(tmp_path, text)).metrics
    assert (m.emf, m.namespace, m.interval) == (True, "mtls-proxy/stack-1", 10.0)


@pytest.mark.parametrize(("line", "key", "fragment"), [
    ('emf = "yes"', "metrics.emf", "expected true or false"),
    ('namespace = "AWS/ApplicationELB"', "metrics.namespace", "reserved for AWS"),
    ("interval = 0", "metrics.interval", "between 0.1 and 3600"),
    ("interval = 7200", "metrics.interval", "between 0.1 and 3600"),
    ("every = 60", "metrics.every", "unknown key"),
])
def test_a_bad_metrics_value_is_one_line_naming_the_key(tmp_path: Path, line: str, key: str, fragment: str) -> None:
    lines = errors(write(tmp_path, MINIMAL + f"[metrics]\n{line}\n"))
    assert len(lines) == 1 and lines[0].startswith(f"{key}: ") and fragment in lines[0], lines


# The URL grammar is tested on parse_url itself (test_values.py); these show its problems reach upstream.url,
# including the ValueError urlsplit raises on its own.
@pytest.mark.parametrize(("url", "fragment"), [
    ("http://api.example.com/prod", "must be an https:// URL"),
    ("https://[::1/prod", "Invalid IPv6 URL"),
    ("https://api.example.com/pr od", "bad base path"),
])
def test_bad_upstream_url(tmp_path: Path, url: str, fragment: str) -> None:
    text = MINIMAL.replace("https://abc123.execute-api.us-east-1.amazonaws.com/prod", url)
    lines = errors(write(tmp_path, text))
    assert len(lines) == 1 and lines[0].startswith("upstream.url: ") and fragment in lines[0], lines


@pytest.mark.parametrize("url", ["https://user:secret@api.example.com/prod", "http://user:secret@api.example.com/",
                                 "https://user:secret@api.example.com:99999/", "ftp://secret@api.example.com/"])
def test_url_credentials_are_never_echoed(tmp_path: Path, url: str) -> None:
    text = MINIMAL.replace("https://abc123.execute-api.us-east-1.amazonaws.com/prod", url)
    (line,) = errors(write(tmp_path, text))
    assert line.startswith("upstream.url: ") and "secret" not in line


def test_bad_source_vpce_id(tmp_path: Path) -> None:
    text = edit(MINIMAL, "server", "proxy_protocol = true") + 'source_vpce = ["vpce-0abc", "vpc-123", "VPCE-1"]\n'
    assert errors(write(tmp_path, text)) == [
        "allow[0].source_vpce[1]: must look like 'vpce-0123456789abcdef0', got 'vpc-123'",
        "allow[0].source_vpce[2]: must look like 'vpce-0123456789abcdef0', got 'VPCE-1'",
    ]


def policy_refusals() -> list[tuple[AllowRule, str]]:
    """The policy's own table of refused rules (tests/test_policy.py), as AllowRules and the problem text."""
    from tests.test_policy import POLICY_ERRORS

    out = []
    for rule, message in POLICY_ERRORS:
        fields = {f: getattr(rule, f) for f in AllowRule.__dataclass_fields__ if hasattr(rule, f)}
        if any(isinstance(v, str) for k, v in fields.items() if k != "name") or any(
                not isinstance(x, str) for k, v in fields.items() if k != "name" for x in v):
            continue  # a wrong type: the loader's type check answers those, before any value check
        out.append((AllowRule(**fields), message))
    return out


@pytest.mark.parametrize(("rule", "message"), policy_refusals(), ids=lambda x: x if isinstance(x, str) else "")
def test_config_refuses_what_the_policy_refuses_under_the_fields_key(tmp_path: Path, rule: AllowRule,
                                                                      message: str) -> None:
    with pytest.raises(PolicyError):
        Policy.compile([rule], allow_all_verified=False)
    problem = message.split(": ", 1)[1]  # after "allow[0] (name)": "methods[0]: must be ..." or a rule-wide text
    field, sep, text = problem.partition(": ")
    expected = f"allow[0].{field}: {text}" if sep else f"allow[0]: {problem}"
    toml = "[[allow]]\n" + "".join(f"{k} = {json.dumps(v if isinstance(v, str) else list(v))}\n"
                                   for k, v in dataclasses.asdict(rule).items() if v or k == "name")
    found = errors(write(tmp_path, MINIMAL.split("[[allow]]")[0] + toml), {"MTLS_PROXY_SERVER_PROXY_PROTOCOL": "1"})
    assert expected in found, found


def test_duplicate_rule_names(tmp_path: Path) -> None:
    text = (MINIMAL + '[[allow]]\nname = "partner-b"\nsubject_cn = ["b"]\n[[allow]]\nname = "partner-a"\n'
            'subject_cn = ["c"]\n')
    assert errors(write(tmp_path, text)) == ["allow[2].name: duplicate rule name 'partner-a'"]


@pytest.mark.parametrize(("rules", "key", "fragment"), [
    ("[allow]\nname = \"x\"\n", "allow", "expected a list of rules"),
    ("allow = [5]\n", "allow[0]", "expected a table"),
    ("[[allow]]\nsubject_cn = [\"a\"]\n", "allow[0].name", "required"),
])
def test_malformed_rule_list(tmp_path: Path, rules: str, key: str, fragment: str) -> None:
    text = MINIMAL.split("[[allow]]")[0]
    text = rules + text if rules.startswith("allow =") else text + rules
    lines = errors(write(tmp_path, text))
    assert len(lines) == 1 and lines[0].startswith(f"{key}: ") and fragment in lines[0], lines


@pytest.mark.parametrize(("missing", "key"), [
    ('cert = "server.crt"', "server.cert"),
    ('key = "server.key"', "server.key"),
    ('client_ca = "ca.crt"', "server.client_ca"),
    ('url = "https://abc123.execute-api.us-east-1.amazonaws.com/prod"', "upstream.url"),
])
def test_required_keys(tmp_path: Path, missing: str, key: str) -> None:
    assert errors(write(tmp_path, MINIMAL.replace(missing, ""))) == [f"{key}: required"]


def test_a_wrong_required_key_is_reported_once(tmp_path: Path) -> None:
    # Regression: a present-but-invalid required key also produced "server.cert: required".
    assert errors(write(tmp_path, MINIMAL.replace('cert = "server.crt"', "cert = 5"))) == [
        "server.cert: expected " + SYNTAX]
    lines = errors(write(tmp_path, MINIMAL.replace("[server]", "server = 5\n[other]")))
    assert lines[0] == "server: expected a table" and "server.cert: required" not in lines


ENV_ERRORS: list[tuple[dict[str, str], str, str]] = [
    ({"MTLS_PROXY_SERVER_BOGUS": "1"}, "MTLS_PROXY_SERVER_BOGUS", "unknown setting"),
    ({"MTLS_PROXY_BOGUS": "1"}, "MTLS_PROXY_BOGUS", "unknown setting"),
    ({"MTLS_PROXY_SERVER": "1"}, "MTLS_PROXY_SERVER", "unknown setting"),
    ({"MTLS_PROXY_SERVERLISTEN": "1"}, "MTLS_PROXY_SERVERLISTEN", "unknown setting"),
    ({"MTLS_PROXY_UPSTREAM_READTIMEOUT": "1"}, "MTLS_PROXY_UPSTREAM_READTIMEOUT", "unknown setting"),
    ({"MTLS_PROXY_SERVER_VERIFY_DEPTH": "two"}, "MTLS_PROXY_SERVER_VERIFY_DEPTH", "expected an integer"),
    ({"MTLS_PROXY_SERVER_VERIFY_DEPTH": "2.0"}, "MTLS_PROXY_SERVER_VERIFY_DEPTH", "expected an integer"),
    ({"MTLS_PROXY_SERVER_PROXY_PROTOCOL": "maybe"}, "MTLS_PROXY_SERVER_PROXY_PROTOCOL", "expected true or false"),
    ({"MTLS_PROXY_UPSTREAM_READ_TIMEOUT": "soon"}, "MTLS_PROXY_UPSTREAM_READ_TIMEOUT", "expected a number"),
    ({"MTLS_PROXY_UPSTREAM_READ_TIMEOUT": "nan"}, "upstream.read_timeout", "between 0.01"),
    ({"MTLS_PROXY_SERVER_TLS_VERSIONS": "1.2"}, "MTLS_PROXY_SERVER_TLS_VERSIONS", "expected a list of strings"),
    ({"MTLS_PROXY_SERVER_TLS_VERSIONS": '["1.2"'}, "MTLS_PROXY_SERVER_TLS_VERSIONS", "expected a JSON array"),
    ({"MTLS_PROXY_SERVER_TLS_VERSIONS": '["1.1"]'}, "server.tls_versions", 'only "1.2" and "1.3"'),
    ({"MTLS_PROXY_SERVER_LISTEN": "nowhere"}, "MTLS_PROXY_SERVER_LISTEN", "host:port"),
    ({"MTLS_PROXY_UPSTREAM_URL": "http://api.example.com"}, "upstream.url", "must be an https:// URL"),
    ({"MTLS_PROXY_ALLOW_ALL_VERIFIED": "perhaps"}, "MTLS_PROXY_ALLOW_ALL_VERIFIED", "expected true or false"),
    ({"MTLS_PROXY_ALLOW": "{not json"}, "MTLS_PROXY_ALLOW", "expected a JSON array of rule objects"),
    ({"MTLS_PROXY_ALLOW": '{"name": "a"}'}, "MTLS_PROXY_ALLOW", "expected a list of rules"),
    ({"MTLS_PROXY_ALLOW": '["a"]'}, "MTLS_PROXY_ALLOW[0]", "expected a table"),
    ({"MTLS_PROXY_ALLOW": '[{"name": "a", "subject_cn": ["x"], "methods": ["get"]}]'},
     "MTLS_PROXY_ALLOW[0].methods[0]", "must be an uppercase HTTP method"),
    ({"MTLS_PROXY_ALLOW": '[{"name": "a", "subject_cn": ["x"], "colour": "red"}]'},
     "MTLS_PROXY_ALLOW[0].colour", "unknown key"),
    ({"MTLS_PROXY_ALLOW": '[{"name": "a", "subject_cn": ["x"]}, {"name": "a", "san_dns": ["y"]}]'},
     "MTLS_PROXY_ALLOW[1].name", "duplicate rule name"),
]


@pytest.mark.parametrize(("env", "key", "fragment"), ENV_ERRORS, ids=[f"{k}:{list(e.values())[0]}"
                                                                       for e, k, _ in ENV_ERRORS])
def test_env_error_is_one_line_naming_the_variable(tmp_path: Path, env: dict[str, str], key: str,
                                                   fragment: str) -> None:
    lines = errors(write(tmp_path, MINIMAL), env)
    assert len(lines) == 1 and lines[0].startswith(f"{key}: ") and fragment in lines[0], lines


def test_env_and_file_values_are_not_confused_for_each_other(tmp_path: Path) -> None:
    # The variable is named, not the file key it overrides; the file's own value was fine.
    lines = errors(write(tmp_path, edit(MINIMAL, "server", "verify_depth = 3")),
                   {"MTLS_PROXY_SERVER_VERIFY_DEPTH": "x"})
    assert lines == ["MTLS_PROXY_SERVER_VERIFY_DEPTH: expected an integer, got 'x'"]


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "[server\n")
    lines = errors(path)
    assert len(lines) == 1 and lines[0].startswith(f"{path}: invalid TOML: ") and "line" in lines[0]


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    assert errors(path) == [f"{path}: config file not found"]


def test_unreadable_path_names_the_file(tmp_path: Path) -> None:
    lines = errors(tmp_path)  # a directory
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path}: cannot read")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = MINIMAL.replace('cert = "server.crt"', 'cert = 5')
    text = text.replace("https://abc123", "http://abc123")
    text = edit(text, "server", 'listen = "nowhere"\ntls_versions = ["1.1"]\nbogus = true')
    text = edit(text, "upstream", 'api_id = "NOT-AN-ID"\nread_timeout = 0')
    text += 'methods = ["get"]\n[[allow]]\nname = "partner-a"\nsubject_cn = ["x"]\n'
    env = {"MTLS_PROXY_LOG_LEVEL": "loud", "MTLS_PROXY_UPSTREAM_VERIFY": "sometimes", "MTLS_PROXY_TYPO": "1"}
    lines = errors(write(tmp_path, text), env)
    keys = sorted(line.split(": ", 1)[0] for line in lines)
    assert keys == sorted([
        "server.cert", "server.listen", "server.bogus", "server.tls_versions", "upstream.url", "upstream.api_id",
        "upstream.read_timeout", "allow[0].methods[0]", "allow[1].name", "log.level",
        "MTLS_PROXY_UPSTREAM_VERIFY", "MTLS_PROXY_TYPO",
    ]), lines


# ---- [identity] and per-rule rate limits ----------------------------------------------------------------------

RULE = '[[allow]]\nname = "p"\nsubject_cn = ["client-a"]\n'
BASE = MINIMAL.split("[[allow]]")[0]


def test_identity_client_cert_header_defaults_off(tmp_path: Path) -> None:
    assert load(write(tmp_path, MINIMAL)).identity.client_cert_header is False
    cfg = load(write(tmp_path, MINIMAL + "[identity]\nclient_cert_header = true\n"))
    assert cfg.identity.client_cert_header is True


def test_identity_unknown_key_is_named(tmp_path: Path) -> None:
    assert errors(write(tmp_path, MINIMAL + "[identity]\nclient_cert = true\n")) == [
        "identity.client_cert: unknown key"]


@pytest.mark.parametrize("extra, rate, burst", [
    ("", None, None),
    ("rate_limit = 5\n", 5.0, None),  # burst left to the default (ceil(rate_limit), applied by proxy.partners)
    ("rate_limit = 0.5\nburst = 4\n", 0.5, 4),
])
def test_rate_limit_and_burst(tmp_path: Path, extra: str, rate: float | None, burst: int | None) -> None:
    (rule,) = load(write(tmp_path, BASE + RULE + extra)).allow
    assert (rule.rate_limit, rule.burst) == (rate, burst)


@pytest.mark.parametrize("extra, problem", [
    ("burst = 3\n", "allow[0].burst: needs rate_limit in the same rule"),
    ("rate_limit = 0\n", "allow[0].rate_limit: must be more than 0 and at most 1e+06 requests per second, got 0"),
    ("rate_limit = -2\n", "allow[0].rate_limit: must be more than 0"),
    ("rate_limit = nan\n", "allow[0].rate_limit: must be more than 0"),
    ("rate_limit = inf\n", "allow[0].rate_limit: must be more than 0"),
    ("rate_limit = 2000000\n", "allow[0].rate_limit: must be more than 0"),
    ("rate_limit = 1\nburst = 0\n", "allow[0].burst: must be between 1 and 1000000, got 0"),
    ("rate_limit = 1\nburst = 1.5\n", "allow[0].burst: expected an integer, got 1.5"),
    ("rate_limit = \"fast\"\n", "allow[0].rate_limit: expected a number, got 'fast'"),
])
def test_bad_rate_limits_name_the_key(tmp_path: Path, extra: str, problem: str) -> None:
    (line,) = errors(write(tmp_path, BASE + RULE + extra))
    assert line.startswith(problem), line


def test_rate_limit_from_the_environment_rules(tmp_path: Path) -> None:
    env = {"MTLS_PROXY_ALLOW": '[{"name": "p", "subject_cn": ["a"], "burst": 2}]'}
    assert errors(write(tmp_path, BASE), env) == [
        "MTLS_PROXY_ALLOW[0].burst: needs rate_limit in the same rule (burst is how many requests may come at once)"]


# ---- allow_from: rules from a document ---------------------------------------------------------------------

NO_RULES = MINIMAL.split("[[allow]]")[0]


@pytest.mark.parametrize("name, text", [
    ("rules.toml", '[[allow]]\nname = "partner-b"\nsubject_cn = ["client-b"]\nmethods = ["GET"]\n'),
    ("rules.json", '[{"name": "partner-b", "subject_cn": ["client-b"], "methods": ["GET"]}]'),
    ("rules2.json", '{"allow": [{"name": "partner-b", "subject_cn": ["client-b"], "methods": ["GET"]}]}'),
])
def test_allow_from_a_toml_or_json_document(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    cfg = load(write(tmp_path, edit(NO_RULES, "", f'allow_from = "{name}"')))
    assert cfg.allow == (AllowRule(name="partner-b", subject_cn=("client-b",), methods=("GET",)),)
    assert cfg.allow_from == PemSource(path=tmp_path / name)
    assert tmp_path / name in cfg.watched_files  # a file document is reloaded like the config file


def test_allow_from_rules_are_validated_like_inline_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[[allow]]\nname = "p"\nsubject_cn = ["c"]\nmethods = ["get"]\n'
                                         '[[allow]]\nsubject_cn = ["d"]\n')
    lines = errors(write(tmp_path, edit(NO_RULES, "", 'allow_from = "rules.toml"')))
    assert lines == ["allow_from.allow[1].name: required",
                     "allow_from.allow[0].methods[0]: must be an uppercase HTTP method such as 'GET', got 'get'"], lines


@pytest.mark.parametrize("text, fragment", [
    ("[[allow]\n", "invalid TOML"), ("[{]", "invalid JSON"), ('{"rules": []}', "unknown key 'rules'"),
    ("[server]\nlisten = \"x\"\n", "unknown key 'server'"), ('{"allow": 5}', "expected a list of rules")])
def test_a_bad_rules_document_is_one_line(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "rules.doc").write_text(text)
    lines = errors(write(tmp_path, edit(NO_RULES, "", 'allow_from = "rules.doc"')))
    assert len(lines) == 1 and lines[0].startswith(f"allow_from: {tmp_path / 'rules.doc'}: ") \
        and fragment in lines[0], lines


def test_allow_from_and_inline_rules_together_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "rules.toml").write_text('[[allow]]\nname = "p"\nsubject_cn = ["c"]\n')
    assert errors(write(tmp_path, edit(MINIMAL, "", 'allow_from = "rules.toml"'))) == [
        "allow_from: allow rules and allow_from together: give the rules in one place"]


def test_allow_from_a_missing_document_names_the_key(tmp_path: Path) -> None:
    assert errors(write(tmp_path, edit(NO_RULES, "", 'allow_from = "absent.toml"'))) == [
        f"allow_from: {tmp_path / 'absent.toml'}: file not found"]


def test_allow_from_the_environment(tmp_path: Path) -> None:
    (tmp_path / "rules.json").write_text('[{"name": "p", "subject_cn": ["c"]}]')
    cfg = load(write(tmp_path, NO_RULES), {"MTLS_PROXY_ALLOW_FROM": str(tmp_path / "rules.json")})
    assert [r.name for r in cfg.allow] == ["p"]
    assert errors(write(tmp_path, NO_RULES), {"MTLS_PROXY_ALLOW_FROM": "http://h/rules.json"})[0].startswith(
        "MTLS_PROXY_ALLOW_FROM: http://h/rules.json: plain http://")
