"""Partner certificate lifecycle: which client certificates each allow rule let in, and when they expire.

Owns: a bounded table of (rule, certificate fingerprint) -> subject, serial, notAfter and when it was last seen;
the per-rule earliest notAfter over the last 24 hours (``mtls_proxy_client_cert_expiry_timestamp_seconds``); the
``GET /certs`` report; and the changes a worker sends its supervisor (so the supervisor's admin port shows every
worker's certificates) with the supervisor-side merge.
Must not: read a clock (callers pass ``now``, wall-clock seconds: the values are shown to people and compared
across processes), parse certificates, do IO, or be called per request (the connection records a certificate the
first time a rule allows a request on it).

Memory: at most ``cap`` entries.  Recording moves an entry to the end of an insertion-ordered dict, so the first
entry is the least recently seen; a new entry at the cap evicts it and counts it in ``dropped``
(``mtls_proxy_cert_tracking_dropped_total``).

Worker -> supervisor: each answer on the control channel carries ``changes()``: the entries recorded since the
previous answer (usually a handful), numbered by ``seq``.  A full table is sent only when the supervisor asks for
one (at worker start, or after it missed an answer: a ``seq`` gap), so the channel does not carry the whole table
twice a second.  ``Feed`` is the supervisor's bookkeeping for one worker; merging keeps the latest ``last_seen``,
so applying the same entry twice or out of order is harmless.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["DEFAULT_CAP", "WINDOW", "CertTable", "Feed", "SeenCert"]

DEFAULT_CAP = 4096
WINDOW = 24 * 3600.0  # the expiry metric looks at certificates seen in the last 24 hours


class SeenCert:
    __slots__ = ("rule", "fingerprint", "subject", "serial", "not_after", "last_seen")

    def __init__(self, rule: str, fingerprint: str, subject: str, serial: str, not_after: float,
                 last_seen: float) -> None:
        self.rule = rule
        self.fingerprint = fingerprint
        self.subject = subject  # RFC 4514, already header/JSON safe (identity.py)
        self.serial = serial
        self.not_after = not_after
        self.last_seen = last_seen

    def wire(self) -> list[Any]:
        return [self.rule, self.fingerprint, self.subject, self.serial, self.not_after, self.last_seen]

    @classmethod
    def from_wire(cls, item: Any) -> SeenCert:
        rule, fingerprint, subject, serial, not_after, last_seen = item
        if not (isinstance(rule, str) and isinstance(fingerprint, str) and isinstance(subject, str)
                and isinstance(serial, str)):
            raise ValueError("bad certificate entry")
        return cls(rule, fingerprint, subject, serial, float(not_after), float(last_seen))

    def report(self) -> dict[str, Any]:
        return {"subject": self.subject, "fingerprint": self.fingerprint, "serial": self.serial,
                "not_after": _rfc3339(self.not_after), "not_after_timestamp": self.not_after,
                "last_seen": _rfc3339(self.last_seen), "last_seen_timestamp": self.last_seen}


def _rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class CertTable:
    """The bounded table (one per worker process; the supervisor keeps a merged one)."""

    __slots__ = ("cap", "_entries", "_changed", "_seq", "dropped")

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap = cap
        self._entries: dict[tuple[str, str], SeenCert] = {}
        self._changed: dict[tuple[str, str], None] = {}  # insertion-ordered set of keys recorded since changes()
        self._seq = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[SeenCert]:
        return iter(self._entries.values())

    def seen(self, rule: str, fingerprint: str, subject: str, serial: str, not_after: float, now: float) -> None:
        """Rule ``rule`` allowed a request from this certificate at ``now``."""
        key = (rule, fingerprint)
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = SeenCert(rule, fingerprint, subject, serial, not_after, now)
        else:
            entry.last_seen = max(entry.last_seen, now)
        self._insert(key, entry)
        self._changed[key] = None

    def merge(self, entries: Iterable[SeenCert]) -> None:
        """Supervisor side: take a worker's entries, keeping the later ``last_seen`` of each."""
        for entry in entries:
            key = (entry.rule, entry.fingerprint)
            old = self._entries.get(key)
            if old is not None:
                if old.last_seen >= entry.last_seen:
                    continue
                del self._entries[key]
            self._insert(key, entry)

    def _insert(self, key: tuple[str, str], entry: SeenCert) -> None:
        entries = self._entries
        if len(entries) >= self.cap:
            oldest = next(iter(entries))
            del entries[oldest]
            self._changed.pop(oldest, None)
            self.dropped += 1
        entries[key] = entry

    # -- what leaves the process -----------------------------------------------------------------------
    def expiry_by_rule(self, now: float, window: float = WINDOW) -> dict[str, float]:
        """Per rule, the earliest notAfter among certificates it allowed within ``window`` seconds of ``now``."""
        since = now - window
        out: dict[str, float] = {}
        for entry in self._entries.values():
            if entry.last_seen >= since:
                prev = out.get(entry.rule)
                if prev is None or entry.not_after < prev:
                    out[entry.rule] = entry.not_after
        return out

    def report(self) -> dict[str, Any]:
        """The ``GET /certs`` document: per rule, its certificates, the soonest to expire first."""
        rules: dict[str, list[SeenCert]] = {}
        for entry in self._entries.values():
            rules.setdefault(entry.rule, []).append(entry)
        return {
            "cap": self.cap,
            "dropped": self.dropped,
            "rules": {name: [e.report() for e in sorted(found, key=lambda e: (e.not_after, e.fingerprint))]
                      for name, found in sorted(rules.items())},
        }

    def changes(self, full: bool) -> dict[str, Any]:
        """Worker side: the next answer for the supervisor (all entries if ``full``), numbered."""
        if full:
            items = [e.wire() for e in self._entries.values()]
        else:
            items = [self._entries[k].wire() for k in self._changed if k in self._entries]
        self._changed.clear()
        seq = self._seq
        self._seq += 1
        return {"seq": seq, "full": full, "entries": items}


class Feed:
    """Supervisor side, one per worker process: which answer comes next, and whether a full table is needed."""

    __slots__ = ("expected", "need_full")

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """A new worker process: its numbering starts again and its table must be fetched whole."""
        self.expected = 0
        self.need_full = True

    def apply(self, message: Any, table: CertTable) -> None:
        """Merge one answer into ``table``; a gap in the numbering asks for a full table next time."""
        if not isinstance(message, dict):
            self.need_full = True
            return
        seq, full, items = message.get("seq"), message.get("full"), message.get("entries")
        if not isinstance(seq, int) or not isinstance(items, list):
            self.need_full = True
            return
        try:
            table.merge([SeenCert.from_wire(item) for item in items])
        except (TypeError, ValueError):
            self.need_full = True
            return
        if full:
            self.need_full = False
        elif seq != self.expected:
            self.need_full = True  # an answer was lost (a poll timed out): its entries may be missing
        self.expected = seq + 1
