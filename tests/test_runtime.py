"""runtime: build_runtime collects every file problem; Runtime.peer parses a certificate once and builds the
per-connection header block with that connection's own address, and the RFC 9440 lines a resumed session reuses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from proxy import config as config_mod
from proxy import runtime
from proxy.config import AllowRule
from proxy.wire.client_cert import rfc9440_lines
from proxy.errors import ConfigErrors
from tests.harness import write_config
from tests.pki import Pki
from tests.test_identity import build, cn


@pytest.fixture
def rt(tmp_path: Path, pki: Pki) -> runtime.Runtime:
    return runtime.build_runtime(config_mod.load(write_config(tmp_path / "p.toml", pki, 9), {}))


def test_same_certificate_same_identity_object(rt: runtime.Runtime, pki: Pki) -> None:
    der = pki.clients["good"].der
    first = rt.peer(der, "10.0.0.1", None)
    second = rt.peer(bytes(der), "10.0.0.2", None)  # equal bytes, another object: still a cache hit
    assert second.identity is first.identity and second.policy is first.policy
    assert first.identity.fingerprint == pki.clients["good"].fingerprint


def test_block_carries_each_connections_address(rt: runtime.Runtime, pki: Pki) -> None:
    der = pki.clients["good"].der
    a, b = rt.peer(der, "10.0.0.1", None), rt.peer(der, "192.0.2.7", None)
    assert (a.client_addr, b.client_addr) == ("10.0.0.1", "192.0.2.7")
    assert b"\r\nX-Forwarded-For: 10.0.0.1\r\n" in a.block and b"192.0.2.7" not in a.block
    assert b"\r\nX-Forwarded-For: 192.0.2.7\r\n" in b.block and b"10.0.0.1" not in b.block
    assert a.block.startswith(rt.upstream_block) and rt.upstream_block.startswith(b"Host: api.test\r\n")
    assert b"\r\nX-Client-Cert-Fingerprint: " + pki.clients["good"].fingerprint.encode() + b"\r\n" in a.block
    assert "10.0.0.1" in a.log_prefix and "192.0.2.7" in b.log_prefix


def test_different_certificates_different_identities(rt: runtime.Runtime, pki: Pki) -> None:
    good, other = rt.peer(pki.clients["good"].der, "10.0.0.1", None), rt.peer(pki.clients["other"].der,
                                                                              "10.0.0.1", None)
    assert good.identity.fingerprint == pki.clients["good"].fingerprint
    assert other.identity.fingerprint == pki.clients["other"].fingerprint


def test_vpce_id_is_part_of_the_cache_key_and_the_block(rt: runtime.Runtime, pki: Pki) -> None:
    der = pki.clients["good"].der
    plain, via = rt.peer(der, "10.0.0.1", None), rt.peer(der, "10.0.0.1", "vpce-0abc")
    assert via.vpce_id == "vpce-0abc" and b"\r\nX-Client-Vpce-Id: vpce-0abc\r\n" in via.block
    assert b"Vpce" not in plain.block
    assert rt.peer(der, "10.0.0.9", "vpce-0abc").policy is via.policy


def test_cache_is_bounded(rt: runtime.Runtime, pki: Pki) -> None:
    der = pki.clients["good"].der
    for i in range(runtime.IDENTITY_CACHE + 10):
        rt.peer(der, "10.0.0.1", f"vpce-{i:x}")
    assert len(rt._cache) <= runtime.IDENTITY_CACHE


def test_build_runtime_reports_every_problem(tmp_path: Path, pki: Pki) -> None:
    path = write_config(tmp_path / "p.toml", pki, 9, server={"key": str(tmp_path / "gone.key")},
                        upstream={"ca_bundle": str(tmp_path / "gone-ca.crt")})
    # The loader refuses such a rule itself; a Config built in code reaches the policy's own check.
    cfg = config_mod.replace(config_mod.load(path, {}), allow=(AllowRule(name="paths-only", paths=("/x",)),))
    with pytest.raises(ConfigErrors) as info:
        runtime.build_runtime(cfg)
    assert [e.key for e in info.value.errors] == ["server.key", "upstream.ca_bundle", "allow"]


def test_unreadable_sans_are_logged_once_per_certificate(rt: runtime.Runtime, pki: Pki,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    der = build([cn("svc")], (x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x05\x82"),))
    with caplog.at_level(logging.WARNING, logger="mtls_proxy"):
        first = rt.peer(der, "10.0.0.1", None)
        rt.peer(der, "10.0.0.2", None)  # a second connection with the same certificate: cached, not logged again
        rt.peer(pki.clients["good"].der, "10.0.0.3", None)  # a readable certificate: nothing to say
    assert first.identity.san_parse_failed and first.identity.common_names == ("svc",)
    warned = [r for r in caplog.records if "SANs are ignored" in r.getMessage()]
    assert len(warned) == 1
    fields = warned[0].fields  # type: ignore[attr-defined]
    assert fields == {"subject": "CN=svc", "fingerprint": first.identity.fingerprint}


# ---- RFC 9440 lines and resumed sessions --------------------------------------------------------------------


@pytest.fixture
def rt_cert_header(tmp_path: Path, pki: Pki) -> runtime.Runtime:
    path = write_config(tmp_path / "h.toml", pki, 9, identity={"client_cert_header": True})
    return runtime.build_runtime(config_mod.load(path, {}))


def test_no_rfc9440_lines_unless_configured(rt: runtime.Runtime, pki: Pki) -> None:
    der = pki.clients["via_intermediate"].der
    block = rt.peer(der, "10.0.0.1", None, ([der, b"inter"], [der, b"inter", b"root"])).block
    assert b"\r\nClient-Cert:" not in block and b"X-Client-Cert-Thumbprint: " in block


def test_a_resumed_session_gets_the_lines_of_its_full_handshake(rt_cert_header: runtime.Runtime, pki: Pki,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    der = pki.clients["via_intermediate"].der
    full = rt_cert_header.peer(der, "10.0.0.1", None, ([der, b"inter"], [der, b"inter", b"root"])).block
    assert rfc9440_lines(der, (b"inter",)) in full
    resumed = rt_cert_header.peer(der, "10.0.0.2", None, (None, None)).block  # OpenSSL kept no chain
    assert rfc9440_lines(der, (b"inter",)) in resumed
    assert "chain unknown" not in caplog.text


def test_a_forgotten_chain_sends_client_cert_alone_with_a_warning(rt_cert_header: runtime.Runtime, pki: Pki,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "CHAIN_MEMO", 1)
    a, b = pki.clients["via_intermediate"].der, pki.clients["good"].der
    rt_cert_header.peer(a, "10.0.0.1", None, ([a, b"inter"], [a, b"inter", b"root"]))
    rt_cert_header.peer(b, "10.0.0.1", None, ([b], [b, b"root"]))  # the memo holds one leaf: "a" is dropped
    block = rt_cert_header.peer(a, "10.0.0.1", None, (None, None)).block
    assert rfc9440_lines(a, ()) in block and b"Client-Cert-Chain" not in block
    assert "client certificate chain unknown on a resumed TLS session" in caplog.text
