"""Configuration: one frozen tree, built once by a pure loader and passed down.

The face of the package: everything else in ``proxy`` imports configuration from here.  ``model.py`` holds the
shape (frozen dataclasses and defaults), ``loader.py`` turns a TOML file and ``MTLS_PROXY_*`` variables into it,
reporting every problem under its key, and ``values.py`` is the grammar of single values (addresses, the upstream
URL, ``[[allow]]`` fields) that the loader and the policy share.

Must not: open certificates or sockets, or exit the process.
"""

from __future__ import annotations

from .loader import load
from .model import (
    DEFAULT_CIPHERS,
    DEFAULT_CLIENT_SIGALGS,
    DEFAULTS,
    ENV_PREFIX,
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

__all__ = ["DEFAULTS", "DEFAULT_CIPHERS", "DEFAULT_CLIENT_SIGALGS", "ENVIRONMENT", "ENV_PREFIX", "Address", "AdminConfig", "AllowRule", "Config",
           "IdentityConfig", "LogConfig", "MetricsConfig", "PemSource", "ServerConfig", "UpstreamConfig", "load", "replace"]
