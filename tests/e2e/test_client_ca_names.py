"""What a partner's TLS stack sees in the CertificateRequest: the client CA names and the signature algorithms.

Java's key manager, SChannel, browsers and Go choose which client certificate to send from the CA names, so they
must be there (TLS 1.2 CertificateRequest, TLS 1.3 certificate_authorities), follow a reload of ``client_ca``, and
be absent when ``send_client_ca_names = false``.  Read with ``openssl s_client`` against the real process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from proxy.check import check
from tests.harness import free_port, spawn_proxy, write_config
from tests.pki import Pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def certificate_request(pki: Pki, port: int, version: str) -> tuple[list[str], list[str]]:
    """(CA names, requested signature algorithms) as ``openssl s_client`` prints them."""
    client = pki.clients["good"]
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", f"-tls{version.replace('.', '_')}",
         "-cert", str(client.cert), "-key", str(client.key), "-CAfile", str(pki.server_ca),
         "-servername", "localhost"],
        input=b"", capture_output=True, timeout=20).stdout.decode(errors="replace")
    assert "Verify return code: 0" in out, out
    if "No client certificate CA names sent" in out:
        names = []
    else:
        block = out.split("Acceptable client certificate CA names\n", 1)[1]
        names = []
        for line in block.splitlines():
            if not line.startswith(("/", "C=", "CN=", "O=")) and "=" not in line.split(",")[0]:
                break
            names.append(line)
    sigalgs = re.search(r"^Requested Signature Algorithms: (.*)$", out, re.M)
    assert sigalgs, out
    return names, sigalgs.group(1).split(":")


def common_names(path: Path) -> list[list[str]]:
    """Each certificate's subject as its attribute values (what any printed form of the name contains)."""
    return [[str(a.value) for a in c.subject] for c in x509.load_pem_x509_certificates(path.read_bytes())]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_every_client_ca_is_named_and_only_modern_sigalgs_are_offered(tmp_path: Path, pki: Pki,
                                                                     version: str) -> None:
    proxy = spawn_proxy(write_config(tmp_path / "p.toml", pki, free_port()), tmp_path)
    try:
        names, sigalgs = certificate_request(pki, proxy.port, version)
    finally:
        proxy.stop()
    expected = common_names(pki.client_ca)
    assert len(names) == len(expected) >= 2
    for values in expected:  # s_client prints each name in its own format: every attribute value on one line
        assert any(all(v in line for v in values) for line in names), (values, names)
    weak = [a for a in sigalgs if re.search(r"(sha1|sha224)$|^dsa\+", a, re.I)]
    assert not weak, sigalgs
    assert "ECDSA+SHA256" in sigalgs and any("PSS" in a.upper() for a in sigalgs), sigalgs


def test_names_can_be_kept_private_and_sigalgs_changed(tmp_path: Path, pki: Pki) -> None:
    path = write_config(tmp_path / "p.toml", pki, free_port(),
                        server={"send_client_ca_names": False, "client_sigalgs": "ECDSA+SHA384:ECDSA+SHA256"})
    proxy = spawn_proxy(path, tmp_path)
    try:
        names, sigalgs = certificate_request(pki, proxy.port, "1.2")
    finally:
        proxy.stop()
    assert names == []
    assert sigalgs == ["ECDSA+SHA384", "ECDSA+SHA256"]


def test_the_names_follow_a_reload_of_client_ca(tmp_path: Path, pki: Pki) -> None:
    bundle = tmp_path / "client-ca.pem"
    bundle.write_bytes(pki.client_ca.read_bytes())
    path = write_config(tmp_path / "p.toml", pki, free_port(), server={"client_ca": str(bundle)})
    proxy = spawn_proxy(path, tmp_path)
    try:
        before, _ = certificate_request(pki, proxy.port, "1.3")
        # Add another CA (keep the one that issued the test client, so the handshake still completes).
        bundle.write_bytes(pki.client_ca.read_bytes() + pki.other_client_ca.read_bytes())
        proxy.proc.send_signal(__import__("signal").SIGHUP)
        import time

        deadline = time.monotonic() + 15
        while True:
            after, _ = certificate_request(pki, proxy.port, "1.3")
            if len(after) > len(before) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        proxy.stop()
    assert len(after) == len(before) + len(common_names(pki.other_client_ca))


def test_check_warns_when_the_names_pass_16_kb(tmp_path: Path, pki: Pki) -> None:
    import trustme

    cas = b"".join(trustme.CA(organization_name="x" * 60 + str(i)).cert_pem.bytes() for i in range(160))
    bundle = tmp_path / "many-cas.pem"
    bundle.write_bytes(pki.client_ca.read_bytes() + cas)
    errors, warnings = check(str(write_config(tmp_path / "p.toml", pki, free_port(),
                                              server={"client_ca": str(bundle)})))
    assert errors == []
    (line,) = [w for w in warnings if "client CA names" in w]
    size = int(re.search(r"take (\d+) bytes", line).group(1))
    assert size > 16 * 1024 and "server.client_ca" in line and "32768" in line
    _, quiet = check(str(write_config(tmp_path / "q.toml", pki, free_port(),
                                      server={"client_ca": str(bundle), "send_client_ca_names": False})))
    assert not [w for w in quiet if "client CA names" in w]
