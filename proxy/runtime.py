"""The reloadable part of a running proxy, as one immutable snapshot.

Owns: building everything a *new* connection needs that may change without a restart — the client-facing TLS
context (server cert/key, client CA, CRL, depth), the upstream TLS context, the compiled allow rules — and the
per-certificate cache of parsed identities (each connection's facts, fixed after its handshake, are a ``Peer``:
identity, the policy pre-filtered for it, the header block, the log prefix), the rules' rate limits, and the RFC 9440 lines remembered per leaf certificate
(a resumed TLS session has no chain in OpenSSL: it gets the lines of the full handshake that created it).  ``build_runtime`` is pure and blocking (it reads files); the server
runs it off the event loop and swaps the reference in one assignment.  Connections keep the snapshot they
started with.

Must not: touch sockets or the event loop.  (It logs once per newly parsed certificate whose SANs were unreadable:
the operator's only clue why a san_dns/san_uri rule refuses it.)
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from .accesslog import connection_prefix
from .wire.client_cert import rfc9440_lines, sent_intermediates
from .config import Config
from .errors import ConfigError, ConfigErrors
from .wire.headers import connection_block, upstream_block
from .identity import Identity, parse_identity
from .partners import Limit, limits_of
from .policy import ConnectionPolicy, Policy, PolicyError
from .tls import CertFact, Fetched, build_server_context, build_upstream_context

log = logging.getLogger("mtls_proxy")

IDENTITY_CACHE = 4096  # distinct (certificate, endpoint) pairs remembered per snapshot
CHAIN_MEMO = 4096  # leaf certificates whose RFC 9440 lines are remembered per snapshot (for resumed sessions)
Chains = tuple[list[bytes] | None, list[bytes] | None]


@dataclass(frozen=True, slots=True)
class Peer:
    """Everything about a connection that is fixed after the handshake, computed once."""

    identity: Identity
    policy: ConnectionPolicy
    block: bytes  # headers added to every request
    log_prefix: str
    client_addr: str
    vpce_id: str | None
    limits: Mapping[str, Limit] = field(default_factory=dict)  # [[allow]] rate limits of this snapshot

    @property
    def added(self) -> int:
        return len(self.block)



@dataclass(slots=True)
class Runtime:
    cfg: Config
    server_context: ssl.SSLContext
    upstream_context: ssl.SSLContext
    policy: Policy
    facts: list[CertFact]
    upstream_block: bytes
    limits: dict[str, Limit] = field(default_factory=dict)
    _cache: dict[tuple[bytes, str | None], tuple[Identity, ConnectionPolicy]] = field(default_factory=dict)
    _chain_lines: dict[bytes, bytes] = field(default_factory=dict)

    def cert_lines(self, der: bytes, chains: Chains) -> bytes:
        """The RFC 9440 lines for one connection.  A resumed TLS session has no chains (OpenSSL keeps neither):
        the lines of the full handshake that created it are used, so resumption never changes what the upstream
        sees.  Session tickets are bound to this snapshot's SSL context, so that handshake happened here; only a
        memo that dropped the certificate (more than CHAIN_MEMO distinct ones since) loses the chain, and then
        Client-Cert goes alone, with a warning."""
        chain = sent_intermediates(*chains)
        if chain is None:
            lines = self._chain_lines.get(der)
            if lines is not None:
                return lines
            log.warning("client certificate chain unknown on a resumed TLS session: Client-Cert-Chain omitted")
            return rfc9440_lines(der, ())
        lines = rfc9440_lines(der, chain)
        memo = self._chain_lines
        memo.pop(der, None)
        if len(memo) >= CHAIN_MEMO:
            del memo[next(iter(memo))]  # the least recently handshaken certificate
        memo[der] = lines
        return lines

    def peer(self, der: bytes, client_addr: str, vpce_id: str | None, chains: Chains | None = None) -> Peer:
        """Per-connection facts for a verified certificate; parsing and rule pre-selection are cached."""
        key = (der, vpce_id)
        hit = self._cache.get(key)
        if hit is None:
            identity = parse_identity(der)
            if identity.san_parse_failed:  # once per certificate and snapshot, not per connection
                log.warning("client certificate extensions cannot be parsed: its SANs are ignored, so no san_dns or "
                            "san_uri rule can match it", extra={"fields": {"subject": identity.subject,
                                                                           "fingerprint": identity.fingerprint}})
            hit = (identity, self.policy.for_connection(identity, vpce_id))
            if len(self._cache) >= IDENTITY_CACHE:
                self._cache.clear()
            self._cache[key] = hit
        identity, policy = hit
        cert_lines = self.cert_lines(der, chains or (None, None)) if self.cfg.identity.client_cert_header else b""
        block = connection_block(self.upstream_block, identity, client_addr, vpce_id, cert_lines)
        prefix = connection_prefix(client_addr, vpce_id, identity.subject, identity.fingerprint)
        return Peer(identity, policy, block, prefix, client_addr, vpce_id, self.limits)


def build_runtime(cfg: Config, fetched: Fetched | None = None) -> Runtime:
    """Load and check every file; raise ConfigErrors listing each problem (key or file named).  ``fetched``: remote
    material the caller has already read (a reload after a poll found a change), used instead of a new request."""
    errors: list[ConfigError] = []
    server_ctx = upstream_ctx = None
    facts: list[CertFact] = []
    policy = None
    try:
        server_ctx, facts = build_server_context(cfg.server, fetched)
    except ConfigError as exc:
        errors.append(exc)
    try:
        upstream_ctx = build_upstream_context(cfg.upstream, fetched)
    except ConfigError as exc:
        errors.append(exc)
    try:
        policy = Policy.compile(cfg.allow, cfg.allow_all_verified)
    except PolicyError as exc:
        errors.append(ConfigError("allow", str(exc)))
    if errors or server_ctx is None or upstream_ctx is None or policy is None:
        raise ConfigErrors(errors)
    return Runtime(cfg, server_ctx, upstream_ctx, policy, facts, upstream_block(cfg.upstream), limits_of(cfg.allow))
