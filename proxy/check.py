"""``mtls-proxy check``: validate a configuration and everything it names, and warn about weak settings.

Owns: the list of warnings (exit status stays 0): TLS 1.2 suites without AEAD (CBC) or with 3DES, upstream
verification off, ``allow_all_verified``, ``identity.client_cert_header`` (its size cost), client CA names over
16 KB, certificates that
expire within 30 days, CRLs whose nextUpdate is within ``server.crl_warn_days``, CRL coverage (with
``crl`` set, OpenSSL refuses every client whose issuing CA has no CRL in the file), and OpenSSL fast paths this
Python cannot use (``proxy.openssl``: the proxy works without them, with more CPU per request).

Must not: start anything; it shares the loader and the context builders with ``serve``.
"""

from __future__ import annotations

import datetime as dt
import ssl

from cryptography import x509

from . import openssl, tls
from .config import Config, load
from .errors import ConfigErrors
from .runtime import build_runtime
from .tls import CertFact, expiring, load_crls, read_pem

WARN_DAYS = 30


CA_NAMES_WARN_BYTES = 16 * 1024


def check(path: str | None) -> tuple[list[str], list[str]]:
    """(errors, warnings) as display lines, each naming the key or file."""
    try:
        cfg = load(path)
    except ConfigErrors as exc:
        return [str(e) for e in exc.errors], []
    try:
        rt = build_runtime(cfg)
    except ConfigErrors as exc:
        return [str(e) for e in exc.errors], []
    warnings = _cipher_warnings(rt.server_context)
    if not cfg.upstream.verify:
        warnings.append("upstream.verify: false: the upstream certificate is not checked (anyone on the path "
                        "can impersonate the API)")
    if cfg.allow_all_verified:
        warnings.append("allow_all_verified: true: every client with a certificate from server.client_ca is "
                        "allowed, on every method and path")
    if cfg.identity.client_cert_header:
        warnings.append("identity.client_cert_header: true: every request carries the client certificate and the "
                        "intermediates it sent (Client-Cert, Client-Cert-Chain: base64, 4/3 of their DER size, often "
                        "1-4 KB); API Gateway refuses a request line plus headers over 10240 bytes, so a request the "
                        "certificate pushes past that is refused by the proxy with 431 identity_too_large")
    names = tls.client_ca_names_size(cfg.server)
    if names > CA_NAMES_WARN_BYTES:
        warnings.append(f"server.client_ca: the client CA names sent in every handshake take {names} bytes (over "
                        f"{CA_NAMES_WARN_BYTES // 1024} KB); Java clients refuse handshake messages over 32768 bytes "
                        f"by default (jdk.tls.maxHandshakeMessageSize); fewer CAs or server.send_client_ca_names = "
                        f"false avoid it")
    warnings += _expiry_warnings(rt.facts, cfg.server.crl_warn_days)
    warnings += _crl_coverage(cfg)
    warnings += [f"openssl: fast path {name} {state}" for name, state in
                 openssl.fast_paths(rt.server_context, rt.upstream_context).items() if state != "on"]
    return [], warnings


def _cipher_warnings(ctx: ssl.SSLContext) -> list[str]:
    weak, des = [], []
    for c in ctx.get_ciphers():
        if c.get("protocol") == "TLSv1.3":
            continue
        if "DES" in c["name"]:
            des.append(c["name"])
        elif not c.get("aead"):
            weak.append(c["name"])
    out = []
    if des:
        out.append(f"server.ciphers: enables 3DES suites: {', '.join(des)}")
    if weak:
        out.append(f"server.ciphers: enables CBC (non-AEAD) suites: {', '.join(weak)}")
    return out


def _label_key(fact: CertFact) -> str:
    kind, _, name = fact.label.partition(":")
    return {"server": "server.cert", "client_ca": f"server.client_ca ({name})", "crl": f"server.crl ({name})"}[kind]


def _expiry_warnings(facts: list[CertFact], crl_warn_days: float) -> list[str]:
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    out = []
    # A CRL is reissued every few days (a week's validity is common), so it has its own, shorter horizon.
    crls = [f for f in facts if f.label.startswith("crl:")]
    certs = [f for f in facts if not f.label.startswith("crl:")]
    for f in expiring(certs, WARN_DAYS, now) + expiring(crls, crl_warn_days, now):
        when = dt.datetime.fromtimestamp(f.not_after, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        what = "next update" if f.label.startswith("crl:") else "expiry"
        if f.not_after <= now:
            consequence = " (every client is refused)" if f.label.startswith("crl:") else ""
            out.append(f"{_label_key(f)}: {what} {when} has passed{consequence}")
        else:
            out.append(f"{_label_key(f)}: {what} in {(f.not_after - now) / 86400:.0f} days ({when})")
    return out


def _crl_coverage(cfg: Config) -> list[str]:
    if cfg.server.crl is None:
        return []
    cas = x509.load_pem_x509_certificates(read_pem(cfg.server.client_ca, "server.client_ca"))
    issuers = {crl.issuer for crl in load_crls(read_pem(cfg.server.crl, "server.crl"), cfg.server.crl)}
    return [f"server.crl: no CRL for client CA {ca.subject.rfc4514_string()}: with crl set, OpenSSL refuses "
            f"every client it issued" for ca in cas if ca.subject not in issuers]
