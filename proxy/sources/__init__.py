"""Sources: reading configured material (PEM, CRLs, rule documents) from where it lives, conditionally.

A *source* is one configured location (``proxy.sources.location``): a file, an environment variable, an S3
object, a Secrets Manager secret, an SSM parameter, or an http(s) URL.  Every kind answers the same question,
``fetch(known_version)``: new bytes and their version, or ``None`` when what the caller holds is still current.
Remote kinds ask with a conditional request (S3 ETag, the secret's current VersionId, the parameter's Version,
HTTP ETag / Last-Modified), so an unchanged source costs one small call.

Modules:
    location   the grammar of a location; a frozen ``Location``  (pure, imported by the config loader)
    local      files (version: mtime, size, inode) and environment variables (fixed for the process)
    url        http:// and https:// (urllib, off the event loop; https verified with the system trust store)
    aws        S3, Secrets Manager, SSM through boto3, imported only when such a source exists
    material   ``Material``: the last good bytes of every source and each source's health; polling

Must not: know what the bytes mean (callers pass validators), touch the event loop (everything here blocks; the
server runs it in an executor), or keep module-level state (clients and sessions belong to a ``Material``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .location import Location

# No source may hand over more than this (S3 objects and URLs could be anything; a large CA's CRL is a few MB).
MAX_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Fetched:
    data: bytes
    version: str  # opaque: compared for equality and handed back on the next fetch


class SourceError(Exception):
    """A source could not be read.  ``message`` is one line, safe to log (no secret values, no URL query)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Source(Protocol):
    location: Location

    def fetch(self, known: str | None) -> Fetched | None:
        """New content, or None when ``known`` is still the current version.  Raises SourceError."""
        ...


__all__ = ["MAX_BYTES", "Fetched", "Location", "Source", "SourceError"]
