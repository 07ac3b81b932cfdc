"""AWS sources: S3 objects, Secrets Manager secrets, SSM parameters, read with boto3.

Owns: ``AwsClients`` (one boto3 session and its clients, created at the first fetch and kept by their
``Material``), one class per service, and translating botocore's exceptions into one-line ``SourceError``s.

boto3 is the optional ``aws`` extra and is imported only here, inside ``AwsClients.client``: a proxy without an
AWS source never loads it (it costs tens of MB of resident memory).  Credentials and region come from the
standard chain (on ECS: the task role and ``AWS_REGION``); ``AWS_ENDPOINT_URL`` (and the per-service
``AWS_ENDPOINT_URL_S3`` ...) are honoured by botocore itself (boto3 >= 1.28).

What an unchanged source costs, per poll:
    s3              GetObject with IfNoneMatch=<ETag>: 304 Not Modified, no body
    secretsmanager  DescribeSecret: the AWSCURRENT version id is compared; GetSecretValue (the only call that
                    decrypts) only when it moved, for exactly that version
    ssm             GetParameter without decryption: its Version is compared; a SecureString is read again with
                    decryption only when it moved, for exactly that version (``name:version``)

Must not: run on the event loop (every call blocks), log, or put secret values into an error message.
"""

from __future__ import annotations

import threading
from typing import Any

from . import MAX_BYTES, Fetched, SourceError
from .location import Location

# Seconds; with "standard" retries a dead endpoint fails a fetch in well under a minute, so start-up and each
# poll round stay bounded.
CONNECT_TIMEOUT, READ_TIMEOUT, MAX_ATTEMPTS = 5.0, 10.0, 3
_BOTO3_MISSING = "AWS sources need boto3: install the aws extra (pip install 'mtls-proxy[aws]')"


class AwsClients:
    """The boto3 clients of one owner (never module-global: two proxies in one process have their own)."""

    def __init__(self) -> None:
        self._session: Any = None
        self._clients: dict[tuple[str, str | None], Any] = {}
        self._lock = threading.Lock()  # boto3 sessions are not thread-safe; clients are

    def client(self, service: str, region: str | None) -> Any:
        with self._lock:
            found = self._clients.get((service, region))
            if found is not None:
                return found
            try:
                import boto3
                from botocore.config import Config
                from botocore.exceptions import BotoCoreError
            except ImportError:
                raise SourceError(_BOTO3_MISSING) from None
            if self._session is None:
                self._session = boto3.session.Session()
            config = Config(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                            retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                            user_agent_extra="mtls-proxy")
            try:
                made = self._session.client(service, region_name=region, config=config)
            except BotoCoreError as exc:
                raise SourceError(_botocore_message(exc)) from None
            self._clients[(service, region)] = made
            return made


class S3Source:
    def __init__(self, location: Location, clients: AwsClients) -> None:
        self.location = location
        self._clients = clients
        self._bucket, self._key = location.bucket, location.object_key

    def fetch(self, known: str | None) -> Fetched | None:
        s3 = self._clients.client("s3", None)
        args: dict[str, Any] = {"Bucket": self._bucket, "Key": self._key}
        if known is not None:
            args["IfNoneMatch"] = known
        try:
            resp = _call(self.location, s3.get_object, **args)
        except _NotModified:
            return None
        body = resp["Body"]
        try:
            if resp.get("ContentLength", 0) > MAX_BYTES:
                raise SourceError(f"{self.location}: larger than {MAX_BYTES} bytes")
            data = _call(self.location, body.read)  # botocore checks Content-Length: a short body raises
        finally:
            body.close()
        return Fetched(data, resp["ETag"])


class SecretsManagerSource:
    def __init__(self, location: Location, clients: AwsClients) -> None:
        self.location = location
        self._clients = clients
        self._id = location.ident

    def fetch(self, known: str | None) -> Fetched | None:
        sm = self._clients.client("secretsmanager", self.location.region)
        described = _call(self.location, sm.describe_secret, SecretId=self._id)
        if described.get("DeletedDate"):
            # GetSecretValue fails for it, but DescribeSecret still shows the old current version: without this
            # check a deleted secret would look unchanged forever.
            raise SourceError(f"{self.location}: the secret is scheduled for deletion")
        current = next((v for v, stages in (described.get("VersionIdsToStages") or {}).items()
                        if "AWSCURRENT" in stages), None)
        if current is not None and current == known:
            return None
        args = {"SecretId": self._id, **({"VersionId": current} if current else {})}
        value = _call(self.location, sm.get_secret_value, **args)
        text = value.get("SecretString")
        if text is None:
            raise SourceError(f"{self.location}: the secret has no SecretString (store the text, not binary)")
        return Fetched(text.encode(), value["VersionId"])


class SsmSource:
    def __init__(self, location: Location, clients: AwsClients) -> None:
        self.location = location
        self._clients = clients
        self._name = location.ident

    def fetch(self, known: str | None) -> Fetched | None:
        ssm = self._clients.client("ssm", self.location.region)
        param = _call(self.location, ssm.get_parameter, Name=self._name, WithDecryption=False)["Parameter"]
        version = str(param["Version"])
        if version == known:
            return None
        if param.get("Type") == "SecureString":
            param = _call(self.location, ssm.get_parameter, Name=f"{self._name}:{version}",
                          WithDecryption=True)["Parameter"]
        return Fetched(str(param["Value"]).encode(), version)


class _NotModified(Exception):
    pass


def _call(location: Location, fn: Any, **args: Any) -> Any:
    """``fn(**args)`` with botocore's exceptions turned into SourceError (and S3's 304 into _NotModified)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return fn(**args)
    except ClientError as exc:
        meta = exc.response.get("ResponseMetadata", {})
        error = exc.response.get("Error", {})
        if meta.get("HTTPStatusCode") == 304 or error.get("Code") in ("304", "NotModified"):
            raise _NotModified from None
        code = error.get("Code") or f"HTTP {meta.get('HTTPStatusCode', '?')}"
        text = _one_line(error.get("Message") or "")
        raise SourceError(f"{location}: {code}" + (f": {text}" if text else "")) from None
    except BotoCoreError as exc:
        raise SourceError(f"{location}: {_botocore_message(exc)}") from None


def _botocore_message(exc: Exception) -> str:
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return "no AWS credentials (on ECS: the task role; elsewhere the AWS_* variables or a profile)"
    if isinstance(exc, NoRegionError):
        return "no AWS region (set AWS_REGION; ECS sets it in every task)"
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError)):
        return f"timed out talking to {getattr(exc, 'kwargs', {}).get('endpoint_url', 'the endpoint')}"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach {exc.kwargs.get('endpoint_url', 'the endpoint')}"
    return _one_line(str(exc) or type(exc).__name__)


def _one_line(text: str) -> str:
    return " ".join(text.split())
