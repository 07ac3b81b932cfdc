"""Remote PEM sources as the TLS contexts read them: certificates, keys, client CAs and CRLs from moto's S3,
Secrets Manager and SSM and from a local HTTP distribution point, and what happens when one cannot be read."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.config import PemSource, ServerConfig
from proxy.errors import ConfigError
from proxy.tls import build_server_context, load_crls, read_pem
from tests.pki import Pki
from tests.remote import DistributionPoint
from tests.sources.conftest import unique


def _server(pki: Pki, **changes: Any) -> ServerConfig:
    base = ServerConfig(cert=PemSource(path=pki.server_cert), key=PemSource(path=pki.server_key),
                        client_ca=PemSource(path=pki.client_ca))
    return dataclasses.replace(base, **changes)


def test_cert_and_key_from_secrets_manager_and_ca_from_ssm(pki: Pki, aws_env: Any,
                                                           aws: Callable[[str], Any]) -> None:
    cert, key = unique("cert"), unique("key")
    aws("secretsmanager").create_secret(Name=cert, SecretString=pki.server_cert.read_text())
    aws("secretsmanager").create_secret(Name=key, SecretString=pki.server_key.read_text())
    param = "/" + unique("ca")
    aws("ssm").put_parameter(Name=param, Value=pki.client_ca.read_text(), Type="SecureString")
    server = _server(pki, cert=PemSource(uri=f"secretsmanager:{cert}"), key=PemSource(uri=f"secretsmanager:{key}"),
                     client_ca=PemSource(uri=f"ssm:{param}"))
    _, facts = build_server_context(server)
    served = x509.load_pem_x509_certificates(pki.server_cert.read_bytes())[0]
    assert facts[0].not_after == served.not_valid_after_utc.timestamp()


def test_der_crl_from_s3_and_pem_crl_from_http(pki: Pki, aws_env: Any, aws: Callable[[str], Any],
                                              dp: DistributionPoint) -> None:
    pem = pki.crl.read_bytes()
    der = x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)
    bucket = unique("crl")
    aws("s3").create_bucket(Bucket=bucket)
    aws("s3").put_object(Bucket=bucket, Key="ca/crl.der", Body=der)
    dp.put("/crl.pem", pem)
    for src in (PemSource(uri=f"s3://{bucket}/ca/crl.der"), PemSource(uri=dp.url("/crl.pem"))):
        data = read_pem(src, "server.crl")
        assert [c.fingerprint(c.signature_hash_algorithm) for c in load_crls(data, src)] == [  # type: ignore[arg-type]
            x509.load_pem_x509_crl(pem).fingerprint(x509.load_pem_x509_crl(pem).signature_hash_algorithm)]  # type: ignore[arg-type]
        ctx, facts = build_server_context(_server(pki, crl=src))
        assert any(f.label.startswith("crl:") for f in facts)


def test_an_unreadable_source_is_fatal_naming_the_key(pki: Pki, aws_env: Any, aws: Callable[[str], Any]) -> None:
    bucket = unique("missing")
    aws("s3").create_bucket(Bucket=bucket)
    with pytest.raises(ConfigError) as err:
        build_server_context(_server(pki, crl=PemSource(uri=f"s3://{bucket}/nothing.pem")))
    assert err.value.key == "server.crl" and f"s3://{bucket}/nothing.pem" in str(err.value)
    with pytest.raises(ConfigError) as err:
        build_server_context(_server(pki, cert=PemSource(uri="secretsmanager:" + unique("absent"))))
    assert err.value.key == "server.cert"


def test_garbage_from_a_remote_source_is_refused_naming_the_key(pki: Pki, aws_env: Any,
                                                               aws: Callable[[str], Any]) -> None:
    name = unique("garbage")
    aws("secretsmanager").create_secret(Name=name, SecretString="not a certificate")
    with pytest.raises(ConfigError) as err:
        read_pem(PemSource(uri=f"secretsmanager:{name}"), "server.client_ca")
    assert err.value.key == "server.client_ca" and "no PEM data" in str(err.value)


def test_loading_a_file_only_config_does_not_import_boto3(pki: Pki) -> None:
    # boto3 and botocore cost tens of MB of resident memory: a proxy without an AWS source must never load them.
    code = ("import sys; from proxy import config, tls, server, cli; from proxy.config import PemSource;"
            f"tls.read_pem(PemSource(path=__import__('pathlib').Path({str(pki.crl)!r})), 'server.crl');"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_context_built_from_fetched_material_makes_no_second_request(pki: Pki, dp: DistributionPoint) -> None:
    # A reload after a poll found a change builds from what the poll read: one request per change, not two.
    from proxy.sources.material import Material

    dp.put("/crl.pem", pki.crl.read_bytes())
    dp.put("/other.pem", pki.crl.read_bytes())
    src = PemSource(uri=dp.url("/crl.pem"))
    material = Material({"server.crl": src.location}, environ={})
    material.load()
    assert len(dp.seen) == 1
    _, facts = build_server_context(_server(pki, crl=src), material)
    assert any(f.label.startswith("crl:") for f in facts)
    assert len(dp.seen) == 1  # nothing requested again
    # The configuration now names another location for the key: that one is read, not the stale copy.
    build_server_context(_server(pki, crl=PemSource(uri=dp.url("/other.pem"))), material)
    assert [s.path for s in dp.seen] == ["/crl.pem", "/other.pem"]
