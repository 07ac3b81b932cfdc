"""The last good copy of every configured source, and the health of each.

Owns: ``Material``, keyed by config key (``server.cert``, ``server.crl``, ``allow_from`` ...): opening the right
kind of source for each location, the strict first read at start-up (any failure is fatal, naming the key: fail
closed), and ``poll()``, the conditional re-read that keeps the last good bytes whenever a source cannot be read
or holds content its validator refuses.  A refused version is remembered, so the same bad content is neither
counted as a new change nor downloaded again; the source stays "failing" until a good version replaces it.

Health, per polled source (environment variables are read once and not polled): ``errors`` counts every poll in
which the source failed (a read error, or still holding refused content), so ``rate()`` shows an ongoing
problem; ``last_ok`` is when the source was last read and validated successfully (an unchanged answer counts), so
its age says how stale the material in use may be.  ``poll()`` reports which sources changed, which new contents
were refused, and which sources turned failing or recovered in that round, so the caller logs once per state
change.

Two keys naming the same location (a certificate and its key in one secret) are fetched once per round, so they
can never come from two different versions.

Must not: know what the bytes mean (validators are passed in), log, or run on the event loop (``load`` and
``poll`` block on IO).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import ConfigError, ConfigErrors
from . import Fetched, Source, SourceError
from .location import AWS_KINDS, ENV, FILE, HTTP, HTTPS, S3, SECRETS_MANAGER, Location

Validator = Callable[[bytes], None]  # raises ValueError with a one-line reason when the content is unusable


@dataclass(frozen=True, slots=True)
class Health:
    errors: int  # polls in which the source failed
    last_ok: float  # time.monotonic() of the last successful read
    problem: str | None  # None while healthy


@dataclass(frozen=True, slots=True)
class PollResult:
    changed: tuple[str, ...] = ()  # keys whose new content passed validation (now the good copy)
    refused: Mapping[str, str] = field(default_factory=dict)  # keys whose new content was refused this round
    failing: Mapping[str, str] = field(default_factory=dict)  # every key failing after this round
    became_failing: Mapping[str, str] = field(default_factory=dict)  # healthy before this round
    recovered: tuple[str, ...] = ()  # failing before this round, healthy now


@dataclass(slots=True)
class _Entry:
    key: str
    source: Source
    validate: Validator | None
    good: bytes = b""
    good_version: str | None = None
    seen_version: str | None = None  # the version the source last answered with (good or refused)
    problem: str | None = None
    errors: int = 0
    last_ok: float = 0.0


class Material:
    def __init__(self, locations: Mapping[str, Location], validators: Mapping[str, Validator] | None = None, *,
                 environ: Mapping[str, str], http_context: ssl.SSLContext | None = None,
                 aws: object | None = None) -> None:
        self._validators = dict(validators or {})
        self._environ = environ
        self._http_context = http_context
        self._aws = aws  # AwsClients, made at the first AWS source (so boto3 is imported only then)
        self._entries = {key: _Entry(key, self._open(loc), self._validators.get(key))
                         for key, loc in locations.items()}

    # -- reading ---------------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> bytes:
        return self._entries[key].good

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def location(self, key: str) -> Location:
        return self._entries[key].source.location

    @property
    def locations(self) -> dict[str, Location]:
        return {k: e.source.location for k, e in self._entries.items()}

    @property
    def aws_clients(self) -> object | None:
        return self._aws

    def health(self) -> dict[str, Health]:
        """Every polled source (not ``env:`` ones: they are read once)."""
        return {k: Health(e.errors, e.last_ok, e.problem) for k, e in self._entries.items()
                if e.source.location.kind != ENV}

    # -- IO --------------------------------------------------------------------------------------------------
    def load(self, keys: Iterable[str] | None = None) -> None:
        """The first read of every source (or of ``keys``): ConfigErrors naming each key that fails."""
        errors: list[ConfigError] = []
        cache: dict[tuple[Location, str | None], Fetched | SourceError | None] = {}
        for key in self._entries if keys is None else keys:
            entry = self._entries[key]
            result = self._fetch(entry, None, cache)
            if isinstance(result, SourceError):
                errors.append(ConfigError(key, result.message))
                continue
            assert result is not None  # nothing is "known" yet, so every kind returns content
            problem = self._check(entry, result.data)
            if problem is not None:
                errors.append(ConfigError(key, problem))
                continue
            entry.good, entry.good_version = result.data, result.version
            entry.seen_version, entry.problem, entry.last_ok = result.version, None, time.monotonic()
        if errors:
            raise ConfigErrors(errors)

    def poll(self) -> PollResult:
        """Re-read every source conditionally; keep the last good copy of any that fails."""
        changed: list[str] = []
        refused: dict[str, str] = {}
        became_failing: dict[str, str] = {}
        recovered: list[str] = []
        cache: dict[tuple[Location, str | None], Fetched | SourceError | None] = {}
        for entry in self._entries.values():
            if entry.source.location.kind == ENV:
                continue
            before = entry.problem
            result = self._fetch(entry, entry.seen_version, cache)
            if isinstance(result, SourceError):
                entry.problem = result.message
            elif result is None:  # unchanged: healthy again only if what it holds is the good copy
                if entry.seen_version == entry.good_version:
                    entry.problem = None
            else:
                problem = self._check(entry, result.data)
                entry.seen_version = result.version
                if problem is not None:
                    entry.problem = problem
                    refused[entry.key] = problem
                else:
                    entry.problem = None
                    if result.data != entry.good:
                        changed.append(entry.key)
                    entry.good, entry.good_version = result.data, result.version
            if entry.problem is None:
                entry.last_ok = time.monotonic()
                if before is not None:
                    recovered.append(entry.key)
            else:
                entry.errors += 1
                if before is None:
                    became_failing[entry.key] = entry.problem
        failing = {e.key: e.problem for e in self._entries.values() if e.problem is not None}
        return PollResult(tuple(changed), refused, failing, became_failing, tuple(recovered))

    def reconfigured(self, locations: Mapping[str, Location]) -> Material:
        """A Material for new locations: unchanged ones keep their state (and last good copy), new or moved
        ones are read now (ConfigErrors if that fails; this Material is left untouched)."""
        fresh = Material({}, self._validators, environ=self._environ, http_context=self._http_context,
                         aws=self._aws)
        new_keys = []
        for key, loc in locations.items():
            old = self._entries.get(key)
            if old is not None and old.source.location == loc:
                fresh._entries[key] = _copy(old)
            else:
                fresh._entries[key] = _Entry(key, fresh._open(loc), self._validators.get(key))
                new_keys.append(key)
        fresh.load(new_keys)
        return fresh

    # -- internals -------------------------------------------------------------------------------------------
    def _fetch(self, entry: _Entry, known: str | None,
               cache: dict[tuple[Location, str | None], Fetched | SourceError | None]
               ) -> Fetched | SourceError | None:
        slot = (entry.source.location, known)
        if slot not in cache:
            try:
                cache[slot] = entry.source.fetch(known)
            except SourceError as exc:
                cache[slot] = exc
        return cache[slot]

    @staticmethod
    def _check(entry: _Entry, data: bytes) -> str | None:
        if entry.validate is None:
            return None
        try:
            entry.validate(data)
        except ValueError as exc:
            return f"{entry.source.location}: {exc}"
        return None

    def _open(self, loc: Location) -> Source:
        kind = loc.kind
        if kind == FILE:
            from .local import FileSource

            return FileSource(loc)
        if kind == ENV:
            from .local import EnvSource

            return EnvSource(loc, self._environ)
        if kind in (HTTP, HTTPS):
            from .url import UrlSource

            return UrlSource(loc, context=self._http_context)
        assert kind in AWS_KINDS, kind
        from . import aws

        if self._aws is None:
            self._aws = aws.AwsClients()
        clients = self._aws
        assert isinstance(clients, aws.AwsClients)
        if kind == S3:
            return aws.S3Source(loc, clients)
        if kind == SECRETS_MANAGER:
            return aws.SecretsManagerSource(loc, clients)
        return aws.SsmSource(loc, clients)


def _copy(entry: _Entry) -> _Entry:
    return _Entry(entry.key, entry.source, entry.validate, entry.good, entry.good_version, entry.seen_version,
                  entry.problem, entry.errors, entry.last_ok)
