"""proxy.globs: ``*`` and ``**`` matching against an obviously correct (exponential) reference, and hostile input."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.globs import compile_globs

_SEGMENTS = st.sampled_from(["a", "b", "", "*", "a*", "*b", "a*b", "*a*a*", "a*b*b", "**"])
_TEXT_SEGMENTS = st.sampled_from(["a", "b", "ab", "ba", "aab", ""])


def brute_force(patterns: list[str], segments: list[str]) -> bool:
    """Obviously correct (exponential) reference: '**' tries every split."""
    if not patterns:
        return not segments
    head, rest = patterns[0], patterns[1:]
    if head == "**":
        return any(brute_force(rest, segments[k:]) for k in range(len(segments) + 1))
    regex = ".*".join(re.escape(piece) for piece in head.split("*"))
    return bool(segments) and re.fullmatch(regex, segments[0]) is not None and brute_force(rest, segments[1:])


@settings(max_examples=400)
@given(st.lists(_SEGMENTS, min_size=1, max_size=7), st.lists(_TEXT_SEGMENTS, min_size=1, max_size=6))
def test_property_path_glob_matches_brute_force(pattern_segments: list[str], text_segments: list[str]) -> None:
    pattern, path = "/" + "/".join(pattern_segments), "/" + "/".join(text_segments)
    assert compile_globs([pattern], "/").matches(path) is brute_force(["", *pattern_segments], ["", *text_segments])


def test_hostile_path_is_cheap() -> None:
    """Segment-wise matching: no regex backtracking blow-up on a long path (would take minutes)."""
    globs = compile_globs(["/**/a*a*a*a*b/**/c"], "/")
    assert not globs.matches("/" + "/".join(["a" * 4000] * 2))
    assert not globs.matches("/" + "a/" * 4000)




def test_patterns_are_sorted_into_the_cheapest_test() -> None:
    g = compile_globs(["/exact", "/v1/**", "/a/*/b"], "/")
    assert g.exact == frozenset({"/exact", "/v1"}) and g.prefixes == ("/v1/",) and len(g.globs) == 1
    assert g.matches("/v1") and g.matches("/v1/x/y") and g.matches("/a/q/b") and not g.matches("/a/q/r/b")
    d = compile_globs(["**.example.com"], ".")
    assert d.exact == frozenset({"example.com"}) and d.suffixes == (".example.com",) and not d.globs
    assert d.matches("a.b.example.com") and not d.matches("badexample.com")
