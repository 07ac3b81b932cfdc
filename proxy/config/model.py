"""The configuration's shape: frozen dataclasses, every key with its type and default.

Owns: ``Config`` and its sections, the values shared by every key (``Address``, ``PemSource``), the defaults
(``DEFAULT_CIPHERS``), and where a configuration came from (``source``; ``file`` is the TOML file or None).

Must not: parse, read files or the environment (``loader.py`` builds these objects), or hold anything mutable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "MTLS_PROXY_"
# What ``Config.source`` says when no file was read: ``load(None)`` (environment only) or a Config built in code.
ENVIRONMENT = "<environment>"
DEFAULTS = "<defaults>"

# Mozilla "intermediate" TLS 1.2 suites: forward secrecy and AEAD only (no CBC, 3DES, RC4, NULL).
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Signature algorithms offered for client certificates (the CertificateRequest's signature_algorithms): ECDSA,
# EdDSA, RSA-PSS and RSA PKCS#1 with SHA-256 or better.  OpenSSL's default list also offers SHA-224, SHA-1 and DSA.
DEFAULT_CLIENT_SIGALGS = (
    "ECDSA+SHA256:ECDSA+SHA384:ECDSA+SHA512:ed25519:ed448:"
    "rsa_pss_pss_sha256:rsa_pss_pss_sha384:rsa_pss_pss_sha512:"
    "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512:"
    "RSA+SHA256:RSA+SHA384:RSA+SHA512"
)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PemSource:
    """Where PEM text comes from: a file (reloadable), an environment variable (fixed for the process), or a
    remote source (``uri``: ``s3://bucket/key``, ``secretsmanager:ID``, ``ssm:NAME`` or an http(s) URL; re-read
    every ``reload_interval`` with a conditional request).  Exactly one field is set."""

    path: Path | None = None
    env: str | None = None
    uri: str | None = None

    def __str__(self) -> str:
        if self.uri is not None:
            return str(self.location)  # never shows a URL's query string
        return f"env:{self.env}" if self.env else str(self.path)

    @property
    def location(self) -> Any:
        """The same place as a ``proxy.sources.Location`` (what the source readers take)."""
        from ..sources.location import Location

        return Location(path=self.path, env=self.env, uri=self.uri)

    @property
    def remote(self) -> bool:
        return self.uri is not None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    cert: PemSource
    key: PemSource
    client_ca: PemSource
    listen: Address = Address("0.0.0.0", 8443)
    crl: PemSource | None = None
    tls_versions: tuple[str, ...] = ("1.2", "1.3")
    ciphers: str = DEFAULT_CIPHERS
    verify_depth: int = 2
    send_client_ca_names: bool = True  # the client_ca subjects in the CertificateRequest (clients pick by them)
    client_sigalgs: str = DEFAULT_CLIENT_SIGALGS
    max_body_bytes: int = 10 * 1024 * 1024
    proxy_protocol: bool = False
    proxy_protocol_timeout: float = 3.0
    handshake_timeout: float = 10.0
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 10000
    workers: int = 1  # "auto" in the file or the environment is resolved at load time (proxy.cpus)
    shutdown_timeout: float = 25.0
    reload_interval: float = 30.0
    crl_warn_days: float = 7.0  # ``check`` warns when a CRL's nextUpdate is this close


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str
    scheme: str
    host: str  # Host header, SNI and the name the certificate is verified against
    port: int
    base_path: str  # prefix of every forwarded path, without trailing slash ("" for none)
    connect_to: Address | None = None
    api_id: str | None = None
    ca_bundle: PemSource | None = None
    verify: bool = True
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    pool_max_idle: int = 64
    pool_idle_timeout: float = 30.0

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 literal: RFC 3986 section 3.2.2
        return host if self.port == 443 else f"{host}:{self.port}"  # the URL is always https (checked at load)

    @property
    def dial(self) -> Address:
        return self.connect_to or Address(self.host, self.port)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address = Address("127.0.0.1", 9100)


@dataclass(frozen=True, slots=True)
class LogConfig:
    access: bool = True
    level: str = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """CloudWatch Embedded Metric Format lines on stdout (``proxy.emf``), next to the access log."""

    emf: bool = False
    namespace: str = "mtls-proxy"
    interval: float = 60.0  # seconds: CloudWatch's standard resolution is one minute


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    client_cert_header: bool = False  # RFC 9440 Client-Cert / Client-Cert-Chain


@dataclass(frozen=True, slots=True)
class AllowRule:
    name: str
    subject_cn: tuple[str, ...] = ()
    san_dns: tuple[str, ...] = ()
    san_uri: tuple[str, ...] = ()
    fingerprint_sha256: tuple[str, ...] = ()
    source_vpce: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    rate_limit: float | None = None  # requests per second per client certificate (per worker process)
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    upstream: UpstreamConfig
    admin: AdminConfig = AdminConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    identity: IdentityConfig = IdentityConfig()
    allow: tuple[AllowRule, ...] = ()
    allow_all_verified: bool = False
    allow_from: PemSource | None = None  # where the rules came from, when not inline (re-read like PEM sources)
    source: str = DEFAULTS  # the TOML file's path, or ENVIRONMENT / DEFAULTS
    # Files the running proxy watches for hot reload (the config file itself and every file-based PEM source).
    watched_files: tuple[Path, ...] = field(default=(), compare=False)

    @property
    def file(self) -> str | None:
        """The TOML file this configuration was read from, or None (environment variables and defaults only)."""
        return None if self.source in (ENVIRONMENT, DEFAULTS) else self.source


def replace(cfg: Config, **changes: Any) -> Config:
    """A modified copy (a reload builds the config it applies this way; tests do too); the original is never changed."""
    return dataclasses.replace(cfg, **changes)
