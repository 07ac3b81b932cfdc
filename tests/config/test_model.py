"""proxy.config.model: the configuration's shape.  Every section is a frozen, slotted dataclass holding nothing
mutable, ``replace`` builds a changed copy and leaves the original alone, and the TLS defaults are what the module
says they are (forward secrecy and AEAD only; client signature algorithms with SHA-256 or better)."""

from __future__ import annotations

import dataclasses
import ssl
import typing
from pathlib import Path

import pytest

from proxy import config
from proxy.config import model
from proxy.config.model import (
    DEFAULT_CIPHERS,
    DEFAULT_CLIENT_SIGALGS,
    DEFAULTS,
    ENVIRONMENT,
    Address,
    AdminConfig,
    AllowRule,
    Config,
    IdentityConfig,
    LogConfig,
    MetricsConfig,
    PemSource,
    ServerConfig,
    UpstreamConfig,
    replace,
)

CLASSES = [Address, PemSource, ServerConfig, UpstreamConfig, AdminConfig, LogConfig, MetricsConfig, IdentityConfig,
           AllowRule, Config]


def upstream(**changes: object) -> UpstreamConfig:
    fields: dict[str, object] = {"url": "https://api.test/prod", "scheme": "https", "host": "api.test", "port": 443,
                                 "base_path": "/prod"}
    return UpstreamConfig(**{**fields, **changes})  # type: ignore[arg-type]


def a_config() -> Config:
    server = ServerConfig(cert=PemSource(Path("s.crt")), key=PemSource(Path("s.key")), client_ca=PemSource(env="CA"))
    return Config(server=server, upstream=upstream(), allow=(AllowRule(name="p", subject_cn=("c",)),))


def test_the_package_exports_the_model() -> None:
    assert all(getattr(config, cls.__name__) is cls for cls in CLASSES)
    assert (config.replace, config.DEFAULT_CIPHERS, config.DEFAULT_CLIENT_SIGALGS) == (
        replace, DEFAULT_CIPHERS, DEFAULT_CLIENT_SIGALGS)
    assert (config.ENV_PREFIX, config.ENVIRONMENT, config.DEFAULTS) == ("MTLS_PROXY_", "<environment>", "<defaults>")


# ---- frozen, slotted, nothing mutable ------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_is_frozen_and_slotted(cls: type) -> None:
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    assert params.frozen and "__slots__" in cls.__dict__
    assert not hasattr(cls.__new__(cls), "__dict__")  # slots: nowhere to put an attribute that is not a field


@pytest.mark.parametrize(("obj", "attr", "value"), [
    (Address("h", 1), "port", 2),
    (PemSource(Path("x")), "path", Path("y")),
    (a_config().server, "verify_depth", 5),
    (a_config().upstream, "host", "other.test"),
    (AdminConfig(), "listen", Address("h", 1)),
    (LogConfig(), "level", "debug"),
    (MetricsConfig(), "emf", True),
    (IdentityConfig(), "client_cert_header", True),
    (AllowRule(name="p"), "methods", ("GET",)),
    (a_config(), "allow_all_verified", True),
], ids=lambda x: type(x).__name__ if dataclasses.is_dataclass(x) else "")
def test_assignment_raises(obj: object, attr: str, value: object) -> None:
    with pytest.raises(AttributeError):
        setattr(obj, attr, value)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_no_field_holds_a_mutable_value(cls: type) -> None:
    hints = typing.get_type_hints(cls, vars(model))
    for f in dataclasses.fields(cls):
        shown = str(hints[f.name])
        assert not any(word in shown for word in ("list", "dict", "set[", "bytearray")), (f.name, shown)
        assert f.default_factory is dataclasses.MISSING or f.name == "watched_files", f.name
        assert not isinstance(f.default, (list, dict, set, bytearray)), f.name


def test_configs_are_hashable_values() -> None:
    # Equal contents are equal configs (a reload compares them); watched_files does not take part.
    assert a_config() == a_config() and hash(a_config()) == hash(a_config())
    assert replace(a_config(), watched_files=(Path("/x"),)) == a_config()


# ---- replace -----------------------------------------------------------------------------------------------


def test_replace_returns_a_new_config_and_leaves_the_original() -> None:
    cfg = a_config()
    changed = replace(cfg, allow_all_verified=True, allow=())
    assert changed is not cfg and type(changed) is Config
    assert (changed.allow_all_verified, changed.allow) == (True, ())
    assert (cfg.allow_all_verified, len(cfg.allow)) == (False, 1)
    assert changed.server is cfg.server and changed.upstream is cfg.upstream  # untouched sections are shared


def test_replace_with_no_changes_is_an_equal_copy() -> None:
    cfg = a_config()
    copy = replace(cfg)
    assert copy == cfg and copy is not cfg


def test_replace_refuses_an_unknown_field() -> None:
    with pytest.raises(TypeError):
        replace(a_config(), no_such_key=1)


# ---- defaults ------------------------------------------------------------------------------------------------


def test_section_defaults() -> None:
    cfg = a_config()
    assert cfg.admin == AdminConfig(Address("127.0.0.1", 9100))
    assert (cfg.log, cfg.metrics, cfg.identity) == (LogConfig(True, "info"), MetricsConfig(False, "mtls-proxy", 60.0),
                                                    IdentityConfig(False))
    assert (cfg.allow_all_verified, cfg.allow_from, cfg.source, cfg.watched_files) == (False, None, DEFAULTS, ())
    s = cfg.server
    assert (s.listen, s.crl, s.tls_versions, s.ciphers, s.client_sigalgs) == (
        Address("0.0.0.0", 8443), None, ("1.2", "1.3"), DEFAULT_CIPHERS, DEFAULT_CLIENT_SIGALGS)
    assert (s.verify_depth, s.send_client_ca_names, s.max_body_bytes, s.proxy_protocol, s.workers) == (
        2, True, 10 * 1024 * 1024, False, 1)
    assert AllowRule(name="p") == AllowRule("p", (), (), (), (), (), (), (), None, None)


def test_default_ciphers_are_ecdhe_aead_only() -> None:
    suites = DEFAULT_CIPHERS.split(":")
    assert len(suites) == len(set(suites)) == 6
    for suite in suites:
        assert suite.startswith(("ECDHE-ECDSA-", "ECDHE-RSA-")), suite  # forward secrecy
        assert suite.endswith(("-GCM-SHA256", "-GCM-SHA384", "-CHACHA20-POLY1305")), suite  # AEAD
        assert not any(bad in suite for bad in ("CBC", "3DES", "DES-", "RC4", "NULL", "MD5", "SHA1", "EXPORT"))


def test_default_ciphers_are_what_openssl_enables() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers(DEFAULT_CIPHERS)  # raises SSLError if OpenSSL knows none of them
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == set(DEFAULT_CIPHERS.split(":"))
    assert all(c["aead"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2")


def test_default_client_sigalgs_are_sha256_or_better() -> None:
    algs = DEFAULT_CLIENT_SIGALGS.split(":")
    assert len(algs) == len(set(algs))
    assert not any(weak in alg.upper() for alg in algs for weak in ("SHA1", "SHA224", "MD5"))
    assert not any(alg.upper().startswith("DSA") for alg in algs)
    for alg in algs:
        assert alg in ("ed25519", "ed448") or alg.endswith(("SHA256", "sha256", "SHA384", "sha384", "SHA512",
                                                            "sha512")), alg


# ---- what the values print and derive ---------------------------------------------------------------------------


def test_address_prints_as_it_is_written_in_the_config() -> None:
    """An address is named in error lines ("cannot listen on [::1]:9443"): IPv6 keeps its brackets."""
    assert str(Address("::1", 9443)) == "[::1]:9443"
    assert str(Address("0.0.0.0", 8443)) == "0.0.0.0:8443"
    assert str(Address("proxy.internal", 0)) == "proxy.internal:0"


@pytest.mark.parametrize(("src", "shown", "remote"), [
    (PemSource(path=Path("/etc/pki/ca.pem")), "/etc/pki/ca.pem", False),
    (PemSource(env="CA_PEM"), "env:CA_PEM", False),
    (PemSource(uri="s3://bucket/ca.pem"), "s3://bucket/ca.pem", True),
    (PemSource(uri="https://pki.example.com/ca.pem?token=s3cret"), "https://pki.example.com/ca.pem?...", True),
])
def test_pem_source_prints_where_it_is_and_says_whether_it_is_remote(src: PemSource, shown: str,
                                                                     remote: bool) -> None:
    assert (str(src), src.remote) == (shown, remote)
    assert (src.location.path, src.location.env, src.location.uri) == (src.path, src.env, src.uri)


@pytest.mark.parametrize(("host", "port", "host_header"), [
    ("api.example.com", 443, "api.example.com"),
    ("api.example.com", 8443, "api.example.com:8443"),
    ("10.1.2.3", 443, "10.1.2.3"),
    ("::1", 8443, "[::1]:8443"),  # bracketed in Host (RFC 3986 section 3.2.2)
    ("2001:db8::1", 443, "[2001:db8::1]"),
])
def test_upstream_host_header(host: str, port: int, host_header: str) -> None:
    assert upstream(host=host, port=port).host_header == host_header


def test_upstream_dials_connect_to_when_set() -> None:
    assert upstream().dial == Address("api.test", 443)
    assert upstream(connect_to=Address("10.0.0.5", 8443)).dial == Address("10.0.0.5", 8443)


@pytest.mark.parametrize(("source", "file"), [(DEFAULTS, None), (ENVIRONMENT, None), ("/etc/proxy.toml",
                                                                                      "/etc/proxy.toml")])
def test_config_file_is_the_source_only_when_a_file_was_read(source: str, file: str | None) -> None:
    assert replace(a_config(), source=source).file == file
