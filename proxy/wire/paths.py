"""Request-path normalisation (RFC 3986), sans-IO: what the policy matches and, when dot segments go, what the
upstream receives.

Owns: decoding percent-encoded unreserved characters (§6.2.2.2), removing dot segments (§5.2.4), telling whether a
raw path has dot segments at all (also spelled ``%2e``), uppercasing percent-encodings for comparison (§6.2.2.1),
and the character classes those rules use (``UNRESERVED``, ``HEX``, ``PCT_TRIPLET``) for whoever validates a
pattern that must already be in normal form.

Must not: decode ``%2F`` (it is not a separator) or ``%25``, touch the query, or do IO.
"""

from __future__ import annotations

import re

__all__ = ["HEX", "PCT_TRIPLET", "UNRESERVED", "has_dot_segment", "normalize_path", "upper_percent"]

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")  # RFC 3986 §2.3
HEX = frozenset("0123456789ABCDEFabcdef")
PCT_TRIPLET = re.compile(r"%[0-9A-Fa-f]{2}")


def _decode_unreserved(path: str) -> str:
    """Decode %XX triplets that encode unreserved characters, leave every other one as it was (§6.2.2.2).

    A decoded hex digit stays encoded when the output so far ends in a stray "%" or "%h": decoding it would
    create a *new* triplet ("%%34%31" must not become "%41"), changing what the upstream decodes and making
    normalisation non-idempotent.
    """
    out: list[str] = []
    tail = ""  # the last two characters of "".join(out)
    i = 0
    while (j := path.find("%", i)) >= 0:
        if j > i:
            out.append(path[i:j])
            tail = (tail + path[i:j])[-2:]
        triplet = path[j : j + 3]
        if len(triplet) == 3 and triplet[1] in HEX and triplet[2] in HEX:
            char = chr(int(triplet[1:], 16))
            stray = tail[-1:] == "%" or (len(tail) == 2 and tail[0] == "%" and tail[1] in HEX)
            token = char if char in UNRESERVED and not (char in HEX and stray) else triplet
            i = j + 3
        else:
            token = "%"  # a stray '%' (not a triplet) is kept as is
            i = j + 1
        out.append(token)
        tail = (tail + token)[-2:]
    out.append(path[i:])
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path, segment-wise: "." is dropped, ".." drops the previous segment;
    a dot segment at the end leaves a trailing "/" ("/a/b/.." -> "/a/")."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
            continue
        if index == last:
            out.append("")
    return "/" + "/".join(out)


def normalize_path(path: str) -> str:
    """Normalise an origin-form path (no query): decode %-encoded unreserved characters, remove dot segments.

    ``%2F`` stays encoded and is not a separator; ``%25`` stays. Raises ValueError if ``path`` does not
    start with "/". Returns ``path`` itself when there is nothing to do (no "%" and no "/.").
    """
    if not path.startswith("/"):
        raise ValueError("path must start with '/'")
    if "%" not in path and "/." not in path:
        return path
    if "%" in path:
        path = _decode_unreserved(path)
    if "/." in path:
        path = _remove_dot_segments(path)
    return path


def _upper_match(match: re.Match[str]) -> str:
    return match.group().upper()


def upper_percent(path: str) -> str:
    """Percent-encodings with uppercase hex digits (RFC 3986 §6.2.2.1), so "%2f" and "%2F" compare equal."""
    return PCT_TRIPLET.sub(_upper_match, path)


def has_dot_segment(path: str) -> bool:
    """Whether RFC 3986 §5.2.4 would change ``path`` ("." or "..", also as %2e, any case, in any segment)."""
    return any(seg.lower().replace("%2e", ".") in (".", "..") for seg in path.split("/"))
