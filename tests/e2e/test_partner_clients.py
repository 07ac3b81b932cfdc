"""End-to-end: partners' own TLS stacks against the real ``mtls-proxy serve`` process.

Owns: the partner matrix.  Each stack (curl, ``openssl s_client``, Java 17 ``HttpClient``, Node ``https``, Python
``requests`` and ``httpx``) does what partners do with its defaults, in two proxy modes: the default TLS versions
(every stack negotiates TLS 1.3) and TLS 1.2 only, like the NGINX configuration the proxy replaces.  Per stack and
mode: a valid certificate gets 200 with the identity headers right; a valid certificate no rule allows gets the
proxy's 403; a revoked certificate is refused in the handshake, with the alert that stack reports.  A Java partner
holding two client certificates in one PKCS12 keystore (this provider's and another provider's) is served too.

Speed: one proxy process per mode for the whole module, one batch per (stack, mode) (one JVM, one node process),
Java compiled once per session.  A stack that is not installed is skipped with the reason; scripts/test.sh
installs them where it can.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.partners import (
    Curl,
    Httpx,
    Java,
    Node,
    Outcome,
    Request,
    Requests,
    SClient,
    Unavailable,
    UpstreamThread,
)
from tests.harness import ProxyProcess, spawn_proxy, write_config
from tests.pki import Pki

# Proxy modes: [server] settings over the test defaults (tests.harness.write_config), and the TLS version every
# stack should end up with.
MODES: dict[str, dict[str, Any]] = {"tls13": {}, "tls12": {"tls_versions": ["1.2"]}}
PROTOCOL = {"tls13": "TLSv1.3", "tls12": "TLSv1.2"}
STACKS = ["curl", "s_client", "java", "node", "requests", "httpx"]

# What each stack reports when the proxy refuses a revoked certificate with the certificate_revoked alert
# (alert 44, RFC 5246 section 7.2.2).  Under TLS 1.3 the client's handshake ends before the server has judged its
# certificate (RFC 8446 section 4.4.2), so there the alert arrives on the client's first read; still no HTTP status.
REVOKED_ALERT = {
    "curl": "alert certificate revoked",
    "s_client": "sslv3 alert certificate revoked",
    "java": "Received fatal alert: certificate_revoked",
    "node": "sslv3 alert certificate revoked",
    "requests": "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "httpx": "SSLV3_ALERT_CERTIFICATE_REVOKED",
}

# Java keystores holding two key entries: this provider's client certificate ("good", from the proxy's client CA)
# and another provider's ("other_ca_same_cn": same subject, a CA this proxy does not trust), in both orders.
TWO_CERTIFICATE_KEYSTORES = {"provider_first": (("a", "good"), ("b", "other_ca_same_cn")),
                             "other_first": (("a", "other_ca_same_cn"), ("b", "good"))}


class Matrix:
    """Lazily started parts shared by the module: the upstream, one proxy process per mode, each stack, and
    each (stack, mode) batch of outcomes."""

    def __init__(self, pki: Pki, tmp: Path, java: Callable[[], Java]) -> None:
        self.pki, self.tmp, self._java = pki, tmp, java
        self.upstream = UpstreamThread(pki).start()
        self._proxies: dict[str, ProxyProcess] = {}
        self._stacks: dict[str, Any] = {}
        self._outcomes: dict[tuple[str, str], dict[str, Outcome]] = {}

    def proxy(self, mode: str) -> ProxyProcess:
        if mode not in self._proxies:
            cfg = write_config(self.tmp / f"proxy-{mode}.toml", self.pki, self.upstream.port, server=MODES[mode])
            self._proxies[mode] = spawn_proxy(cfg, self.tmp)
        return self._proxies[mode]

    def stack(self, name: str) -> Any:
        if name not in self._stacks:
            ca, tmp = self.pki.server_ca, self.tmp / name
            tmp.mkdir(exist_ok=True)
            try:
                self._stacks[name] = {
                    "curl": lambda: Curl(ca), "s_client": lambda: SClient(ca, tmp), "java": self._java,
                    "node": lambda: Node(ca, tmp), "requests": lambda: Requests(ca), "httpx": lambda: Httpx(ca),
                }[name]()
            except Unavailable as exc:
                self._stacks[name] = exc
        stack = self._stacks[name]
        if isinstance(stack, Unavailable):
            pytest.skip(f"{name}: {stack}")
        return stack

    def outcomes(self, stack: str, mode: str) -> dict[str, Outcome]:
        key = (stack, mode)
        if key not in self._outcomes:
            s = self.stack(stack)
            requests = [Request(name, path(stack, mode, name), self.pki.clients[name])
                        for name in ("good", "other", "revoked")]
            if stack == "java":
                requests += [Request(f"two-{order}", path(stack, mode, f"two-{order}"),
                                     keystore=s.keystore(f"two-{order}", [(alias, self.pki.clients[c])
                                                                          for alias, c in entries]))
                             for order, entries in TWO_CERTIFICATE_KEYSTORES.items()]
            self._outcomes[key] = s.run(self.proxy(mode).port, requests)
        return self._outcomes[key]

    def close(self) -> None:
        for proc in self._proxies.values():
            proc.stop()
        self.upstream.stop()


def path(stack: str, mode: str, case: str) -> str:
    return f"/partner/{stack}/{mode}/{case}"


@pytest.fixture(scope="session")
def java_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Java]:
    """Java compiled at most once per session, on first use (a session without Java tests never runs javac)."""
    made: list[Java] = []

    def get() -> Java:
        if not made:
            made.append(Java(pki.server_ca, tmp_path_factory.mktemp("java")))
        return made[0]

    return get


@pytest.fixture(scope="module")
def matrix(pki: Pki, tmp_path_factory: pytest.TempPathFactory, java_stack: Callable[[], Java]) -> Iterator[Matrix]:
    m = Matrix(pki, tmp_path_factory.mktemp("partners"), java_stack)
    try:
        yield m
    finally:
        m.close()


def forwarded(matrix: Matrix, stack: str, mode: str, case: str) -> bool:
    return f"/prod{path(stack, mode, case)}" in matrix.upstream.paths


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("stack", STACKS)
def test_valid_certificate_gets_200_with_identity(matrix: Matrix, pki: Pki, stack: str, mode: str) -> None:
    out = matrix.outcomes(stack, mode)["good"]
    assert out.status == 200, out
    assert out.protocol == PROTOCOL[mode], out
    echo = out.echo()
    assert echo.path == f"/prod{path(stack, mode, 'good')}"
    assert echo.one("X-Client-Cert-Subject") == pki.clients["good"].subject
    assert echo.one("X-Client-Cert-Fingerprint") == pki.clients["good"].fingerprint


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("stack", STACKS)
def test_certificate_no_rule_allows_gets_403(matrix: Matrix, stack: str, mode: str) -> None:
    out = matrix.outcomes(stack, mode)["other"]
    assert out.status == 403, out
    assert out.protocol == PROTOCOL[mode], out
    assert b'"no_rule_for_client"' in out.body, out.body  # the proxy's own refusal, not the upstream's
    assert not forwarded(matrix, stack, mode, "other")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("stack", STACKS)
def test_revoked_certificate_is_refused_in_the_handshake(matrix: Matrix, stack: str, mode: str) -> None:
    out = matrix.outcomes(stack, mode)["revoked"]
    assert out.status is None, out  # no HTTP answer at all
    assert REVOKED_ALERT[stack] in out.error, out.error
    assert not forwarded(matrix, stack, mode, "revoked")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("order", ["provider_first", "other_first"])
def test_java_keystore_with_two_certificates_sends_this_providers(matrix: Matrix, pki: Pki, order: str,
                                                                  mode: str) -> None:
    """SunX509 picks the key entry whose chain the server's CertificateRequest names; the proxy's identity
    headers show which certificate arrived."""
    out = matrix.outcomes("java", mode)[f"two-{order}"]
    assert out.status == 200, out
    assert out.protocol == PROTOCOL[mode]
    echo = out.echo()
    assert echo.one("X-Client-Cert-Fingerprint") == pki.clients["good"].fingerprint
    assert echo.one("X-Client-Cert-Subject") == pki.clients["good"].subject
