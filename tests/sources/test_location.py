"""proxy.sources.location: every accepted syntax, and a one-line reason for every rejected one."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.sources.location import (
    KINDS_FOR_CRL,
    KINDS_FOR_PUBLIC,
    KINDS_FOR_SECRETS,
    Location,
    parse_location,
)

ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:mtls-proxy/server-cert-AbCdEf"
PARAM_ARN = "arn:aws:ssm:eu-central-1:123456789012:parameter/mtls-proxy/crl"


@pytest.mark.parametrize(("text", "kind", "expected"), [
    ("/etc/pki/server.crt", "file", Location(path=Path("/etc/pki/server.crt"))),
    ("certs/server.crt", "file", Location(path=Path("/base/certs/server.crt"))),
    ("env:SERVER_CERT_PEM", "env", Location(env="SERVER_CERT_PEM")),
    ("s3://my-bucket/certs/crl.der", "s3", Location(uri="s3://my-bucket/certs/crl.der")),
    ("s3://a.b-c/k", "s3", Location(uri="s3://a.b-c/k")),
    ("secretsmanager:mtls-proxy/server-cert", "secretsmanager", Location(uri="secretsmanager:mtls-proxy/server-cert")),
    (f"secretsmanager:{ARN}", "secretsmanager", Location(uri=f"secretsmanager:{ARN}")),
    ("ssm:/mtls-proxy/crl", "ssm", Location(uri="ssm:/mtls-proxy/crl")),
    ("ssm:plain_name", "ssm", Location(uri="ssm:plain_name")),
    (f"ssm:{PARAM_ARN}", "ssm", Location(uri=f"ssm:{PARAM_ARN}")),
    ("https://pki.example.com/ca.pem", "https", Location(uri="https://pki.example.com/ca.pem")),
    ("http://crl.example.com:8080/root.crl", "http", Location(uri="http://crl.example.com:8080/root.crl")),
])
def test_every_syntax_parses_to_its_kind(text: str, kind: str, expected: Location) -> None:
    loc = parse_location(text, Path("/base"))
    assert loc == expected
    assert loc.kind == kind
    assert loc.remote == (kind not in ("file", "env"))


def test_parts_of_remote_locations() -> None:
    s3 = parse_location("s3://bucket-1/dir/rules.toml")
    assert (s3.bucket, s3.object_key, s3.region) == ("bucket-1", "dir/rules.toml", None)
    sm = parse_location(f"secretsmanager:{ARN}")
    assert (sm.ident, sm.region) == (ARN, "eu-west-1")
    assert parse_location("secretsmanager:name").region is None  # the standard chain decides
    ssm = parse_location(f"ssm:{PARAM_ARN}")
    assert (ssm.ident, ssm.region) == (PARAM_ARN, "eu-central-1")


def test_display_never_shows_a_url_query() -> None:
    loc = parse_location("https://pki.example.com/crl?X-Amz-Signature=secret123&token=abc")
    assert str(loc) == "https://pki.example.com/crl?..."
    assert "secret123" not in str(loc)
    assert str(parse_location("s3://b-1/k")) == "s3://b-1/k"
    assert str(parse_location("env:X")) == "env:X"
    assert str(parse_location("ssm:/a/b")) == "ssm:/a/b"


@pytest.mark.parametrize(("text", "reason"), [
    ("", "expected a file path, env:NAME, s3://bucket/key"),
    (42, "expected a file path"),
    ("env:", "bad environment variable name ''"),
    ("env:1BAD", "bad environment variable name '1BAD'"),
    ("s3://", "not an S3 bucket name"),
    ("s3://bucket", "the object key is missing"),
    ("s3://bucket/", "the object key is missing"),
    ("s3://Bad_Bucket/k", "not an S3 bucket name"),
    ("s3://ab/k", "not an S3 bucket name"),
    ("s3://a..b/k", "not an S3 bucket name"),
    ("S3://bucket/k", "write the scheme in lowercase"),
    ("s3:bucket/key", "expected s3://bucket/key"),
    ("secretsmanager:", "expected secretsmanager:NAME_OR_ARN"),
    ("secretsmanager:has space", "expected secretsmanager:NAME_OR_ARN"),
    ("secretsmanager:arn:aws:s3:::bucket", "not a Secrets Manager secret ARN"),
    ("secretsmanager://name", "expected secretsmanager:NAME_OR_ARN"),
    ("ssm:", "expected ssm:/parameter/name"),
    ("ssm:/a//b", "expected ssm:/parameter/name"),
    ("ssm:/a/", "expected ssm:/parameter/name"),
    ("ssm:/a b", "expected ssm:/parameter/name"),
    ("ssm:arn:aws:ssm:eu-west-1:123:parameter/x", "not an SSM parameter ARN"),
    ("ssm://name", "expected ssm:/parameter/name"),
    ("file:///etc/x.pem", "expected a plain file path"),
    ("ftp://host/x.pem", "unknown source scheme 'ftp'"),
    ("HTTPS://host/x", "write the scheme in lowercase"),
    ("https://", "the URL has no host"),
    ("https://user:pw@host/x", "credentials in the URL are not supported"),
    ("https://host/x#frag", "a URL fragment is not supported"),
    ("https://host:99999/x", "bad URL"),
    ("/etc/x\n.pem", "control characters"),
])
def test_bad_locations_get_a_one_line_reason(text: object, reason: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_location(text)
    message = str(info.value)
    assert reason in message
    assert "\n" not in message
    assert "pw" not in message  # credentials are never echoed


def test_kind_sets_keep_secrets_off_plain_urls() -> None:
    assert "https" not in KINDS_FOR_SECRETS and "http" not in KINDS_FOR_SECRETS
    assert "https" in KINDS_FOR_PUBLIC and "http" not in KINDS_FOR_PUBLIC
    assert {"https", "http"} <= KINDS_FOR_CRL
    assert {"file", "env", "s3", "secretsmanager", "ssm"} <= KINDS_FOR_SECRETS
