"""proxy.sources.aws against moto's real S3 / Secrets Manager / SSM APIs (server mode, over HTTP on loopback).

The sources get no endpoint from the test: boto3 finds the server through ``AWS_ENDPOINT_URL`` alone (``aws_env``),
so every test here also shows that variable is honoured.  Calls are counted with botocore's own event hooks, to
show that an unchanged source costs exactly one request.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from proxy.sources import SourceError
from proxy.sources.aws import AwsClients, S3Source, SecretsManagerSource, SsmSource
from proxy.sources.location import parse_location
from tests.remote import MotoServer
from tests.sources.conftest import unique

Aws = Callable[[str], Any]


def counted(clients: AwsClients, service: str, region: str | None = None) -> list[str]:
    """The operation name of every HTTP request this client makes (retries included), as botocore reports it."""
    calls: list[str] = []
    clients.client(service, region).meta.events.register(
        "request-created", lambda operation_name, **kw: calls.append(operation_name))
    return calls


# ---- S3 --------------------------------------------------------------------------------------------------------


def test_s3_object_is_read_then_unchanged_is_one_304(aws_env: MotoServer, aws: Aws) -> None:
    bucket = unique("bucket")
    s3 = aws("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="pki/crl.pem", Body=b"crl-1")
    clients = AwsClients()
    calls = counted(clients, "s3")
    src = S3Source(parse_location(f"s3://{bucket}/pki/crl.pem"), clients)
    first = src.fetch(None)
    assert first is not None and first.data == b"crl-1"
    assert src.fetch(first.version) is None
    assert calls == ["GetObject", "GetObject"]
    s3.put_object(Bucket=bucket, Key="pki/crl.pem", Body=b"crl-2")
    second = src.fetch(first.version)
    assert second is not None and second.data == b"crl-2" and second.version != first.version


def test_s3_versioned_bucket_works_the_same(aws_env: MotoServer, aws: Aws) -> None:
    bucket = unique("versioned")
    s3 = aws("s3")
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="rules.json", Body=b"[]")
    src = S3Source(parse_location(f"s3://{bucket}/rules.json"), AwsClients())
    first = src.fetch(None)
    assert first is not None and src.fetch(first.version) is None
    s3.put_object(Bucket=bucket, Key="rules.json", Body=b"[{}]")
    assert src.fetch(first.version) is not None


@pytest.mark.parametrize(("what", "code"), [("deleted", "NoSuchKey"), ("no-bucket", "NoSuchBucket")])
def test_s3_missing_object_is_a_source_error(aws_env: MotoServer, aws: Aws, what: str, code: str) -> None:
    bucket = unique("bucket")
    s3 = aws("s3")
    if what == "deleted":
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="k.pem", Body=b"x")
        s3.delete_object(Bucket=bucket, Key="k.pem")
    with pytest.raises(SourceError) as info:
        S3Source(parse_location(f"s3://{bucket}/k.pem"), AwsClients()).fetch("\"some-etag\"")
    assert info.value.message.startswith(f"s3://{bucket}/k.pem: {code}")
    assert "\n" not in info.value.message


# ---- Secrets Manager --------------------------------------------------------------------------------------------


def test_secret_is_read_then_unchanged_is_one_describe(aws_env: MotoServer, aws: Aws) -> None:
    name = unique("mtls-proxy/server-cert")
    sm = aws("secretsmanager")
    created = sm.create_secret(Name=name, SecretString="cert-1")
    clients = AwsClients()
    calls = counted(clients, "secretsmanager")
    src = SecretsManagerSource(parse_location(f"secretsmanager:{name}"), clients)
    first = src.fetch(None)
    assert first is not None and (first.data, first.version) == (b"cert-1", created["VersionId"])
    assert src.fetch(first.version) is None
    assert calls == ["DescribeSecret", "GetSecretValue", "DescribeSecret"]
    rotated = sm.put_secret_value(SecretId=name, SecretString="cert-2")
    second = src.fetch(first.version)
    assert second is not None and (second.data, second.version) == (b"cert-2", rotated["VersionId"])


def test_secret_by_arn(aws_env: MotoServer, aws: Aws) -> None:
    arn = aws("secretsmanager").create_secret(Name=unique("by-arn"), SecretString="pem")["ARN"]
    got = SecretsManagerSource(parse_location(f"secretsmanager:{arn}"), AwsClients()).fetch(None)
    assert got is not None and got.data == b"pem"


@pytest.mark.parametrize(("what", "reason"), [
    ("missing", "ResourceNotFoundException"),
    ("binary", "the secret has no SecretString"),
    ("deleted", "the secret is scheduled for deletion"),
])
def test_unusable_secret_is_a_source_error(aws_env: MotoServer, aws: Aws, what: str, reason: str) -> None:
    name = unique("secret")
    sm = aws("secretsmanager")
    if what == "binary":
        sm.create_secret(Name=name, SecretBinary=b"\x30\x82")
    if what == "deleted":
        sm.create_secret(Name=name, SecretString="pem")
        sm.delete_secret(SecretId=name, RecoveryWindowInDays=7)
    with pytest.raises(SourceError) as info:
        SecretsManagerSource(parse_location(f"secretsmanager:{name}"), AwsClients()).fetch(None)
    assert reason in info.value.message
    assert info.value.message.startswith(f"secretsmanager:{name}: ")


# ---- SSM ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["String", "SecureString"])
def test_parameter_is_read_then_unchanged_is_one_undecrypted_get(aws_env: MotoServer, aws: Aws,
                                                                  kind: str) -> None:
    name = "/" + unique("mtls-proxy") + "/rules"
    ssm = aws("ssm")
    ssm.put_parameter(Name=name, Value="rules-1", Type=kind)
    clients = AwsClients()
    calls = counted(clients, "ssm")
    src = SsmSource(parse_location(f"ssm:{name}"), clients)
    first = src.fetch(None)
    assert first is not None and (first.data, first.version) == (b"rules-1", "1")
    # A SecureString is read undecrypted first (its Version), then decrypted for exactly that version.
    assert calls == ["GetParameter"] * (2 if kind == "SecureString" else 1)
    calls.clear()
    assert src.fetch(first.version) is None
    assert calls == ["GetParameter"]
    ssm.put_parameter(Name=name, Value="rules-2", Type=kind, Overwrite=True)
    second = src.fetch(first.version)
    assert second is not None and (second.data, second.version) == (b"rules-2", "2")


def test_missing_parameter_is_a_source_error(aws_env: MotoServer) -> None:
    with pytest.raises(SourceError, match="ssm:/nope/x: ParameterNotFound"):
        SsmSource(parse_location("ssm:/nope/x"), AwsClients()).fetch(None)


# ---- plumbing -------------------------------------------------------------------------------------------------


def test_unreachable_endpoint_is_a_source_error(aws_env: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.harness import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceError, match="cannot reach http://127.0.0.1"):
        SsmSource(parse_location("ssm:/x"), AwsClients()).fetch(None)


def test_without_boto3_the_error_says_which_extra_to_install() -> None:
    # A fresh interpreter in which "import boto3" fails, as it does when the aws extra is not installed.
    code = ("import sys; sys.modules['boto3'] = None\n"
            "from proxy.sources import SourceError\n"
            "from proxy.sources.aws import AwsClients, S3Source\n"
            "from proxy.sources.location import parse_location\n"
            "try:\n    S3Source(parse_location('s3://bucket/k'), AwsClients()).fetch(None)\n"
            "except SourceError as e:\n    print(e.message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == ("AWS sources need boto3: install the aws extra "
                                  "(pip install 'mtls-proxy[aws]')")


def test_importing_the_sources_does_not_import_boto3_or_urllib() -> None:
    code = ("import sys\n"
            "import proxy.sources, proxy.sources.aws, proxy.sources.url, proxy.sources.material\n"
            "print(sorted(m for m in ('boto3', 'botocore', 'urllib.request') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "[]"
