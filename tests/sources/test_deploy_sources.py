"""deploy/provider.yaml's task environment runs the real proxy against moto's server: the sources the template sets
(certificate and key in one Secrets Manager secret, the client CA in another, rules and CRL as ``s3://`` objects)
start it, and a rotation, an onboarding and a revocation done the way deploy/README.md describes them
(``put-secret-value``, an uploaded rules document, an uploaded CRL) take effect without a restart.

Only what a laptop cannot have is replaced: loopback listen addresses, no PROXY protocol (no NLB), an upstream that
refuses connections (an admitted request is answered 502), moto's region, and a 0.5 s reload interval (the test
checks the template's names and values; the time an interval takes is measured in deploy/README.md).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.harness import client_ctx, free_port, spawn_proxy
from tests.pki import Pki
from tests.remote import REGION
from tests.sources.conftest import unique
from tests.sources.test_e2e_sources import _status, _wait_for
from tests.test_deploy import PROVIDER, Deployment, _load

RULES_KEY, CRL_KEY = "partners/rules.toml", "pki/client-ca.crl"
SMOKE_RULES = b'[[allow]]\nname = "smoke-test"\nsubject_cn = ["smoke-test-client"]\n'
PARTNER_RULE = b'\n[[allow]]\nname = "partner-a"\nsubject_cn = ["client-a"]\n'


def _served(port: int, ctx: ssl.SSLContext) -> bytes | None:
    """The DER of the certificate the proxy presents, or None when the handshake fails."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)
    except (ssl.SSLError, OSError):
        return None


def test_the_template_environment_rotates_onboards_and_revokes_without_restart(
        tmp_path: Path, pki: Pki, aws_env: Any, aws: Callable[[str], Any]) -> None:
    bucket = unique("configbucket")
    s3, sm = aws("s3"), aws("secretsmanager")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key=RULES_KEY, Body=SMOKE_RULES)
    s3.put_object(Bucket=bucket, Key=CRL_KEY, Body=pki.write_crl(tmp_path / "none.crl").read_bytes())
    cert_arn = sm.create_secret(Name=unique("mtls-proxy/server-tls"),
                                SecretString=pki.server_cert.read_text() + pki.server_key.read_text())["ARN"]
    ca_arn = sm.create_secret(Name=unique("mtls-proxy/client-ca"), SecretString=pki.client_ca.read_text())["ARN"]

    d = Deployment(_load(PROVIDER), ServerCertSecretArn=cert_arn, ClientCaSecretArn=ca_arn, ConfigBucketName=bucket)
    env = d.env()
    assert {k: env[k] for k in ("MTLS_PROXY_SERVER_CERT", "MTLS_PROXY_SERVER_KEY", "MTLS_PROXY_SERVER_CLIENT_CA",
                                "MTLS_PROXY_SERVER_CRL", "MTLS_PROXY_ALLOW_FROM")} == {
        "MTLS_PROXY_SERVER_CERT": f"secretsmanager:{cert_arn}", "MTLS_PROXY_SERVER_KEY": f"secretsmanager:{cert_arn}",
        "MTLS_PROXY_SERVER_CLIENT_CA": f"secretsmanager:{ca_arn}",
        "MTLS_PROXY_SERVER_CRL": f"s3://{bucket}/{CRL_KEY}", "MTLS_PROXY_ALLOW_FROM": f"s3://{bucket}/{RULES_KEY}"}
    env |= {"MTLS_PROXY_SERVER_LISTEN": "127.0.0.1:0", "MTLS_PROXY_ADMIN_LISTEN": "127.0.0.1:0",
            "MTLS_PROXY_SERVER_PROXY_PROTOCOL": "false", "MTLS_PROXY_UPSTREAM_CONNECT_TO": f"127.0.0.1:{free_port()}",
            "MTLS_PROXY_METRICS_EMF": "false", "MTLS_PROXY_SERVER_RELOAD_INTERVAL": "0.5", "AWS_REGION": REGION}
    config = tmp_path / "empty.toml"
    config.write_text("")  # everything comes from the environment, as on ECS
    proxy = spawn_proxy(config, tmp_path, env=aws_env.env() | env)
    try:
        good = client_ctx(pki, "good")
        good.load_verify_locations(cafile=pki.upstream_ca)  # trusts the rotated-in certificate's issuer too
        assert _status(proxy.port, good) == 403  # verified; no rule names it yet

        # Onboard: the rules document with the partner's rule appended.
        s3.put_object(Bucket=bucket, Key=RULES_KEY, Body=SMOKE_RULES + PARTNER_RULE)
        assert _wait_for(lambda: _status(proxy.port, good) == 502)  # admitted (the upstream refuses: 502)

        # Rotate: certificate and key in one put-secret-value.
        old, new = (x509.load_pem_x509_certificates(p.read_bytes())[0].public_bytes(Encoding.DER)
                    for p in (pki.server_cert, pki.upstream_cert))
        assert _served(proxy.port, good) == old
        sm.put_secret_value(SecretId=cert_arn,
                            SecretString=pki.upstream_cert.read_text() + pki.upstream_key.read_text())
        assert _wait_for(lambda: _served(proxy.port, good) == new)

        # Revoke: a CRL listing the partner's certificate over the CRL object.
        started = time.monotonic()
        s3.put_object(Bucket=bucket, Key=CRL_KEY,
                      Body=pki.write_crl(tmp_path / "revoking.crl", [pki.clients["good"]], number=4).read_bytes())
        assert _wait_for(lambda: _status(proxy.port, good) is None)
        print(f"revocation took effect after {time.monotonic() - started:.2f} s (reload interval 0.5 s)")

        # Roll back: the previous CRL version copied over the current one admits the partner again.
        versions = s3.list_object_versions(Bucket=bucket, Prefix=CRL_KEY)["Versions"]
        previous = next(v["VersionId"] for v in versions if v["Key"] == CRL_KEY and not v["IsLatest"])
        s3.copy_object(Bucket=bucket, Key=CRL_KEY, CopySource={"Bucket": bucket, "Key": CRL_KEY,
                                                               "VersionId": previous})
        assert _wait_for(lambda: _status(proxy.port, good) == 502)
        assert proxy.proc.poll() is None
        assert "reload failed" not in proxy.stderr()
    finally:
        proxy.stop()
