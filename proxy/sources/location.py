"""Where configured material lives: the grammar of a source location, parsed into one frozen value.

Owns: ``Location`` (a file path, ``env:NAME``, ``s3://bucket/key``, ``secretsmanager:NAME_OR_ARN``,
``ssm:NAME_OR_ARN``, ``https://...`` or ``http://...``) and ``parse_location``, which turns the configured text
into one or raises ``ValueError`` with a one-line message (the config loader adds the key).  ``str(location)`` is
safe to log: a URL's query string, which may carry a token, is never shown.

Must not: read anything (no file, variable or network access) or import the fetchers; which keys accept which
kinds is the config loader's decision (``KINDS_FOR_SECRETS`` and friends only name the sets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

FILE, ENV, S3, SECRETS_MANAGER, SSM, HTTPS, HTTP = "file", "env", "s3", "secretsmanager", "ssm", "https", "http"
AWS_KINDS = frozenset({S3, SECRETS_MANAGER, SSM})
REMOTE_KINDS = AWS_KINDS | {HTTPS, HTTP}
# Private keys and the server certificate: never over a plain URL.
KINDS_FOR_SECRETS = frozenset({FILE, ENV, S3, SECRETS_MANAGER, SSM})
# Public material (CA bundles, rules) may also come from an https:// URL, verified with the system trust store.
KINDS_FOR_PUBLIC = KINDS_FOR_SECRETS | {HTTPS}
# A CRL is signed by its CA (OpenSSL checks that signature), so a plain http:// distribution point is normal.
KINDS_FOR_CRL = KINDS_FOR_PUBLIC | {HTTP}

SYNTAX = "a file path, env:NAME, s3://bucket/key, secretsmanager:NAME_OR_ARN, ssm:/parameter/name or https://URL"

# S3 bucket naming rules (general purpose buckets): 3-63 characters, lowercase letters, digits, dots, hyphens,
# beginning and ending with a letter or digit.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Secrets Manager names: 1-512 characters of ASCII letters, digits and /_+=.@- (an ARN adds a 6-character suffix).
_SECRET_NAME = re.compile(r"[A-Za-z0-9/_+=.@-]{1,512}")
_SECRET_ARN = re.compile(r"arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:[A-Za-z0-9/_+=.@-]{1,512}")
# SSM parameter names: letters, digits and _.-/ (a leading / for a hierarchy), at most 2048 characters.
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,2048}")
_PARAMETER_ARN = re.compile(r"arn:aws[a-z-]*:ssm:[a-z0-9-]+:[0-9]{12}:parameter/[A-Za-z0-9_.\-/]{1,2048}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# Prefixes that look like a source but are not one; a file of that name is far less likely than a typo.
_NEAR_MISSES = {"s3:": "s3://bucket/key", "secretsmanager://": "secretsmanager:NAME_OR_ARN",
                "ssm://": "ssm:/parameter/name", "file://": "a plain file path"}


@dataclass(frozen=True, slots=True)
class Location:
    """One source.  Exactly one field is set: ``path`` (a file), ``env`` (a variable) or ``uri`` (remote:
    ``s3://bucket/key``, ``secretsmanager:ID``, ``ssm:NAME``, or an http(s) URL)."""

    path: Path | None = None
    env: str | None = None
    uri: str | None = None

    @property
    def kind(self) -> str:
        if self.path is not None:
            return FILE
        if self.env is not None:
            return ENV
        assert self.uri is not None
        return self.uri.split(":", 1)[0]

    @property
    def remote(self) -> bool:
        return self.kind in REMOTE_KINDS

    @property
    def bucket(self) -> str:
        """S3 bucket (``s3://`` only)."""
        return self._s3()[0]

    @property
    def object_key(self) -> str:
        """S3 object key (``s3://`` only)."""
        return self._s3()[1]

    @property
    def ident(self) -> str:
        """The secret id or parameter name (``secretsmanager:`` and ``ssm:`` only)."""
        assert self.uri is not None and self.kind in (SECRETS_MANAGER, SSM)
        return self.uri.split(":", 1)[1]

    @property
    def region(self) -> str | None:
        """The AWS region named by an ARN, else None (the standard chain decides)."""
        if self.kind in (SECRETS_MANAGER, SSM) and self.ident.startswith("arn:"):
            return self.ident.split(":")[3]
        return None

    def _s3(self) -> tuple[str, str]:
        assert self.uri is not None and self.kind == S3
        bucket, _, key = self.uri[len("s3://"):].partition("/")
        return bucket, key

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        if self.env is not None:
            return f"env:{self.env}"
        assert self.uri is not None
        if self.kind in (HTTP, HTTPS):
            parts = urlsplit(self.uri)
            return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?..." if parts.query else "")
        return self.uri


def parse_location(text: object, base_dir: Path | None = None) -> Location:
    """The location named by ``text``; relative file paths are taken relative to ``base_dir`` when given."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected {SYNTAX}")
    if not text.isprintable():
        raise ValueError(f"control characters in {text!r}")
    if text.startswith("env:"):
        name = text[4:]
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"bad environment variable name {name!r}")
        return Location(env=name)
    for prefix, meant in _NEAR_MISSES.items():
        if text.startswith(prefix) and not text.startswith("s3://"):
            raise ValueError(f"{text!r}: expected {meant}")
    if text.startswith("secretsmanager:"):
        return Location(uri=SECRETS_MANAGER + ":" + _secret_id(text[len("secretsmanager:"):]))
    if text.startswith("ssm:"):
        return Location(uri=SSM + ":" + _parameter_name(text[len("ssm:"):]))
    scheme = _SCHEME.match(text)
    if scheme:
        name = scheme.group(1).lower()
        if name in ("s3", "https", "http") and scheme.group(1) != name:
            raise ValueError(f"{name}://...: write the scheme in lowercase")
        if name == "s3":
            return Location(uri=_s3_uri(text))
        if name in ("https", "http"):
            return Location(uri=_http_url(text))
        raise ValueError(f"unknown source scheme {name!r} (expected {SYNTAX})")
    path = Path(text)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return Location(path=path)


def _secret_id(ident: str) -> str:
    if ident.startswith("arn:"):
        if not _SECRET_ARN.fullmatch(ident):
            raise ValueError(f"not a Secrets Manager secret ARN: {ident!r}")
    elif not _SECRET_NAME.fullmatch(ident):
        raise ValueError("expected secretsmanager:NAME_OR_ARN (a name is 1-512 letters, digits and /_+=.@-), "
                         f"got {ident!r}")
    return ident


def _parameter_name(name: str) -> str:
    if name.startswith("arn:"):
        if not _PARAMETER_ARN.fullmatch(name):
            raise ValueError(f"not an SSM parameter ARN: {name!r}")
    elif not _PARAMETER_NAME.fullmatch(name) or "//" in name or name.endswith("/"):
        raise ValueError(f"expected ssm:/parameter/name (letters, digits and _.-/), got {name!r}")
    return name


def _s3_uri(text: str) -> str:
    bucket, sep, key = text[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{text!r}: not an S3 bucket name ({bucket!r}: 3-63 lowercase letters, digits, . and -)")
    if not sep or not key:
        raise ValueError(f"{text!r}: expected s3://bucket/key (the object key is missing)")
    return f"s3://{bucket}/{key}"


def _http_url(text: str) -> str:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  (raises ValueError for a bad port)
    except ValueError as exc:
        raise ValueError(f"bad URL: {exc}") from None
    shown = f"{parts.scheme}://{parts.hostname or ''}"
    if not parts.hostname:
        raise ValueError(f"{shown}: the URL has no host")
    if "@" in parts.netloc:
        # Credentials in a URL end up in logs and process listings; use a token-free URL.
        raise ValueError(f"{shown}: credentials in the URL are not supported")
    if parts.fragment:
        raise ValueError(f"{shown}: a URL fragment is not supported")
    return text
