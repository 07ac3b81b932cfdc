"""proxy.wire.paths: request-path normalisation (RFC 3986 §6.2.2.2, §5.2.4) as a byte table and properties checked
against the RFC's own algorithm, and the dot-segment test the upstream target depends on."""

from __future__ import annotations

from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire.paths import has_dot_segment, normalize_path, upper_percent

# --- normalize_path ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/", "/"),
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/%2E%2e/admin", "/admin"),
        ("/public/.%2e/admin", "/admin"),
        ("/public/%2e./admin", "/admin"),
        ("/public/%2e/admin", "/public/admin"),
        ("/public/..%2fadmin", "/public/..%2fadmin"),  # %2F is not a separator: one segment, kept
        ("/public/..%2Fadmin", "/public/..%2Fadmin"),  # hex case kept as sent
        ("/public/%252e%252e/admin", "/public/%252e%252e/admin"),  # %25 stays: no double decoding
        ("//admin", "//admin"),  # empty segments are kept (RFC 3986 §5.2.4 does not merge them)
        ("/a//b/", "/a//b/"),
        ("/a//../b", "/a/b"),  # '..' removes the empty segment
        ("/a/b/c/./../../x", "/a/x"),
        ("/a/b/../c", "/a/c"),
        ("/a/./b", "/a/b"),
        ("/..", "/"),
        ("/../..", "/"),
        ("/../a", "/a"),
        ("/a/..", "/"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/./", "/"),
        ("/.", "/"),
        ("/a/%2E", "/a/"),
        ("/.a/..b/...", "/.a/..b/..."),  # not dot segments
        ("/%41%62%7e%2D%5F%30", "/Ab~-_0"),  # unreserved decoded (RFC 3986 §2.3)
        ("/%7E%7e", "/~~"),
        ("/%20%2f%3A%40%25", "/%20%2f%3A%40%25"),  # reserved and others left exactly as they were
        ("/%C3%A9", "/%C3%A9"),
        ("/%", "/%"),  # stray percent signs are left alone
        ("/a%2", "/a%2"),
        ("/%zz", "/%zz"),
        ("/%%34%31", "/%%341"),  # decoding must not create a new "%41"
        ("/%4%31", "/%4%31"),
        ("/%%3%34%31", "/%%3%341"),
        ("/%25%34%31", "/%2541"),  # "%25" is a complete triplet, so "41" cannot join it
    ],
)
def test_normalize_path_table(raw: str, normal: str) -> None:
    assert normalize_path(raw) == normal
    assert normalize_path(normal) == normal


@pytest.mark.parametrize("path", ["/", "/a/b", "/a.b/c.d", "/a..", "/v1/items/42"])
def test_normalize_path_fast_path_returns_same_object(path: str) -> None:
    assert normalize_path(path) is path


@pytest.mark.parametrize("path", ["", "a/b", "*", "http://x/", "%2F"])
def test_normalize_path_requires_leading_slash(path: str) -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        normalize_path(path)


def rfc_remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, transcribed step by step (the independent reference)."""
    inp, out = path, ""
    while inp:
        if inp.startswith("../"):
            inp = inp[3:]
        elif inp.startswith("./"):
            inp = inp[2:]
        elif inp.startswith("/./"):
            inp = inp[2:]
        elif inp == "/.":
            inp = "/"
        elif inp.startswith("/../"):
            inp = inp[3:]
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp == "/..":
            inp = "/"
            out = out[: out.rfind("/")] if "/" in out else ""
        elif inp in (".", ".."):
            inp = ""
        else:
            start = 1 if inp.startswith("/") else 0
            end = inp.find("/", start)
            end = len(inp) if end < 0 else end
            out, inp = out + inp[:end], inp[end:]
    return out


_PATH_PIECES = st.sampled_from(["/", "/", ".", "..", "a", "b", "%2e", "%2E", "%2f", "%25", "%", "%4", "%31",
                                "%41", "%7e", "%3", "~", "-"])
_PATHS = st.lists(_PATH_PIECES, max_size=12).map(lambda parts: "/" + "".join(parts))


@settings(max_examples=500)
@given(_PATHS)
def test_property_normalize_path(path: str) -> None:
    normal = normalize_path(path)
    assert normal.startswith("/")
    assert not any(segment in (".", "..") for segment in normal.split("/"))
    assert normalize_path(normal) == normal
    # Meaning is preserved: the fully decoded segments are those of the input, after removing the
    # segments whose *decoded* form is "." or ".." (computed with the RFC's own string algorithm).
    decoded = [unquote(s) for s in path.split("/")[1:]]
    tokens = [s if s in (".", "..") else f"s{i}" for i, s in enumerate(decoded)]
    expected = rfc_remove_dot_segments("/" + "/".join(tokens)).split("/")[1:]
    expected_decoded = [decoded[int(t[1:])] if t else "" for t in expected]
    assert [unquote(s) for s in normal.split("/")[1:]] == expected_decoded


@given(st.text(alphabet="/.ab", max_size=16).map(lambda p: "/" + p))
def test_property_dot_removal_matches_rfc_algorithm(path: str) -> None:
    assert normalize_path(path) == rfc_remove_dot_segments(path)


@pytest.mark.parametrize(("path", "dots"), [
    ("/a/b", False), ("/a..", False), ("/.a/b.", False), ("/a/./b", True), ("/a/../b", True), ("/a/.", True),
    ("/a/%2e/b", True), ("/a/%2E%2e/b", True), ("/a/.%2E", True), ("/a/%2e%2e%2e", False), ("/", False),
])
def test_has_dot_segment(path: str, dots: bool) -> None:
    assert has_dot_segment(path) is dots


@given(_PATHS)
def test_property_has_dot_segment_says_whether_normalisation_removes_segments(path: str) -> None:
    if not has_dot_segment(path):
        # nothing but unreserved decoding can change: the segment count stays
        assert normalize_path(path).count("/") == path.count("/")


def test_upper_percent() -> None:
    assert upper_percent("/a%2fb%7E%zz%2") == "/a%2Fb%7E%zz%2"
