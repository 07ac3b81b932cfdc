"""Globs over separated text: ``*`` inside one segment, ``**`` across whole segments, compiled once.

Owns: turning the patterns of one rule field into a ``GlobSet`` (exact names, ``prefix/**`` and ``**.suffix``
patterns sorted into the cheapest test each needs, general globs split at their ``**`` segments) and matching text
against it.  The separator is the caller's: ``.`` for DNS names, ``/`` for URIs and paths.

Semantics: ``*`` matches zero or more characters inside one segment (it never crosses the separator).  ``**`` must
be a whole segment and matches zero or more whole segments: ``/v1/**`` matches ``/v1``, ``/v1/`` and ``/v1/a/b``;
``**.example.com`` matches ``example.com`` and ``a.b.example.com``.  Matching is done segment by segment with plain
string operations (no regex backtracking), so hostile text costs O(len(text) x len(pattern)) at worst.

Must not: validate patterns (``proxy.config.values`` does, for the config loader and the policy alike) or know what
the text is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["GlobSet", "compile_globs"]

_SegmentPattern = str | tuple[str, ...]  # a literal segment, or the pieces of a '*' glob ("a*b" -> ("a","b"))


def _segment_matches(pattern: _SegmentPattern, segment: str) -> bool:
    if type(pattern) is str:
        return pattern == segment
    # Classic wildcard matching for one wildcard kind: anchored first and last pieces, middle pieces found
    # leftmost-first (earliest placement leaves the most room, so it is complete); no backtracking.
    first, last = pattern[0], pattern[-1]
    if len(segment) < len(first) + len(last) or not segment.startswith(first) or not segment.endswith(last):
        return False
    pos, end = len(first), len(segment) - len(last)
    for piece in pattern[1:-1]:
        found = segment.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def _run_matches(run: tuple[_SegmentPattern, ...], segments: list[str], start: int) -> bool:
    return all(_segment_matches(p, segments[start + k]) for k, p in enumerate(run))


@dataclass(frozen=True, slots=True)
class _Glob:
    """A pattern with '*' inside segments and/or '**' segments, split at the '**' segments into runs."""

    runs: tuple[tuple[_SegmentPattern, ...], ...]  # len(runs) == number of '**' + 1

    def matches(self, segments: list[str]) -> bool:
        runs, n = self.runs, len(segments)
        head = runs[0]
        if len(runs) == 1:
            return n == len(head) and _run_matches(head, segments, 0)
        tail = runs[-1]
        if len(head) + len(tail) > n:
            return False
        if not _run_matches(head, segments, 0) or not _run_matches(tail, segments, n - len(tail)):
            return False
        # '**' absorbs anything, so placing each middle run at its leftmost fit is complete.
        pos, end = len(head), n - len(tail)
        for run in runs[1:-1]:
            for start in range(pos, end - len(run) + 1):
                if _run_matches(run, segments, start):
                    pos = start + len(run)
                    break
            else:
                return False
        return True


@dataclass(frozen=True, slots=True)
class GlobSet:
    """All patterns of one field, sorted into the cheapest test each needs."""

    sep: str
    exact: frozenset[str]  # no wildcard (plus the "zero segments" case of prefix/suffix patterns)
    prefixes: tuple[str, ...]  # "<literal>/**" -> "<literal>/"
    suffixes: tuple[str, ...]  # "**.<literal>" -> ".<literal>"
    globs: tuple[_Glob, ...]

    def matches(self, text: str) -> bool:
        if text in self.exact:
            return True
        if self.prefixes and text.startswith(self.prefixes):
            return True
        if self.suffixes and text.endswith(self.suffixes):
            return True
        if self.globs:
            segments = text.split(self.sep)
            return any(glob.matches(segments) for glob in self.globs)
        return False


def compile_globs(patterns: Iterable[str], sep: str) -> GlobSet:
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    globs: list[_Glob] = []
    for pattern in patterns:
        segments = pattern.split(sep)
        if "*" not in pattern:
            exact.add(pattern)
        elif len(segments) > 1 and segments[-1] == "**" and "*" not in pattern[:-2]:
            exact.add(pattern[:-3])
            prefixes.append(pattern[:-2])
        elif len(segments) > 1 and segments[0] == "**" and "*" not in pattern[2:]:
            exact.add(pattern[3:])
            suffixes.append(pattern[2:])
        else:
            runs: list[list[_SegmentPattern]] = [[]]
            for segment in segments:
                if segment == "**":
                    runs.append([])
                else:
                    runs[-1].append(tuple(segment.split("*")) if "*" in segment else segment)
            globs.append(_Glob(tuple(tuple(run) for run in runs)))
    return GlobSet(sep, frozenset(exact), tuple(prefixes), tuple(suffixes), tuple(globs))
