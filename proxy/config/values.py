"""The grammar of configured values: each check takes what an operator wrote and says what is wrong with it.

Owns: listen/dial addresses, the upstream URL (host, port, base path), API Gateway ids, CloudWatch namespaces,
and every ``[[allow]]`` field: CNs, DNS and URI SAN patterns, fingerprints, VPC endpoint ids, methods and path
patterns.  The config loader
runs these checks at load time (so each problem is reported under its own key, ``allow[2].methods[0]``) and the
policy compiles with the same functions, so what one accepts the other accepts.

Each rule-field check returns ``(problem or None, the value to compile)``.

Must not: read files or the environment, or collect errors (the loader does).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from urllib.parse import urlsplit

from ..wire.proxy_protocol import VPCE_ID
from ..wire.paths import HEX, PCT_TRIPLET, UNRESERVED, upper_percent
from .model import Address

# The name decisions of ``allow_all_verified`` carry (a metric label and the access log's "rule"); no rule may
# take it.
ALLOW_ALL_RULE = "allow_all_verified"
IDENTITY_FIELDS = ("subject_cn", "san_dns", "san_uri", "fingerprint_sha256")
API_ID = re.compile(r"[a-z0-9]{1,64}")
# A CloudWatch namespace: 1-255 of these characters; "AWS/" is reserved for AWS's own services.
CLOUDWATCH_NAMESPACE = re.compile(r"(?!AWS/)[A-Za-z0-9._#:/-]{1,255}")


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port``; the host may be a name or an IP literal."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
    if not m:
        raise ValueError(f"expected host:port or [ipv6]:port, got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if m.group(1):
        ipaddress.IPv6Address(host)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return Address(host, port)


def check_namespace(namespace: str) -> str | None:
    """The problem with a CloudWatch namespace (``metrics.namespace``), or None."""
    if CLOUDWATCH_NAMESPACE.fullmatch(namespace):
        return None
    if namespace.startswith("AWS/"):
        return f"{namespace!r}: the AWS/ prefix is reserved for AWS services"
    return f"not a CloudWatch namespace: {namespace!r} (1-255 characters: letters, digits and . _ # : / -)"


# RFC 1123 section 2.1 host names: the upstream host is sent as Host and SNI, so it must be plain ASCII.
_HOSTNAME = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def parse_url(url: str) -> tuple[str, int, str]:
    """(host, port, base path) of ``upstream.url``; ValueError says what is wrong (never echoing a password)."""
    shown = re.sub(r"(?<=//)[^/?#]*@", "***@", url)  # never echo a password into logs
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # bad port, or an unbalanced "[" (urlsplit raises for both)
        raise ValueError(f"{exc} in {shown!r}") from None
    if parts.scheme != "https":
        raise ValueError(f"must be an https:// URL (upstream TLS is always used), got {shown!r}")
    if not parts.hostname or "@" in parts.netloc or "?" in url or "#" in url:
        raise ValueError("must be https://host[:port][/base-path] without credentials, query or fragment")
    host = parts.hostname
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"host {host!r} is not an ASCII DNS name or IP address") from None
    base_path = parts.path.rstrip("/")
    if base_path and (not re.fullmatch(r"(/[A-Za-z0-9\-._~%!$&'()*+,;=:@]+)+", base_path)):
        raise ValueError(f"bad base path {parts.path!r}")
    return host, port or 443, base_path


# --- [[allow]] fields ---

_DNS_CHARS = re.compile(r"[a-z0-9_*-]+")  # LDH (RFC 1123 §2.1) plus '_' seen in service names, plus '*'
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")  # RFC 3986 §2: reserved + unreserved + %
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # RFC 3986 §3.1
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/%]+")  # RFC 3986 §3.3 pchar and "/"
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_VPCE = re.compile(VPCE_ID)
# RFC 9110 §9.1 methods are case-sensitive tokens; a rule names them in uppercase letters, digits, '-' and '_'
# (every registered method fits), so a lowercase or punctuated entry is a typo that would silently match nothing.
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


def _check_percent(pattern: str) -> str | None:
    for part in pattern.split("%")[1:]:
        if len(part) < 2 or part[0] not in HEX or part[1] not in HEX:
            return f"'%' must start a %XX escape in {pattern!r}"
    return None


def _check_wildcards(pattern: str, sep: str, unit: str) -> str | None:
    for segment in pattern.split(sep):
        if "**" in segment and segment != "**":
            return f"'**' must be a whole {unit} in {pattern!r}"
    return None


# Each check returns (problem or None, the value to compile).


def check_cn(value: str) -> tuple[str | None, str]:
    return None, value  # any text can be a CN; emptiness is checked for every field


def check_dns(pattern: str) -> tuple[str | None, str]:
    lowered = pattern.lower()
    if any(not label for label in lowered.split(".")):
        return f"empty label in {pattern!r}", lowered
    if not _DNS_CHARS.fullmatch(lowered.replace(".", "a")):
        return f"invalid character in {pattern!r} (letters, digits, '-', '_', '.', '*')", lowered
    return _check_wildcards(lowered, ".", "label"), lowered


def check_uri(pattern: str) -> tuple[str | None, str]:
    if not _URI_SCHEME.match(pattern):
        return f"must start with a URI scheme such as 'spiffe:' in {pattern!r}", pattern
    if not _URI_CHARS.fullmatch(pattern):
        return f"invalid character in {pattern!r} (RFC 3986 characters only)", pattern
    return _check_percent(pattern) or _check_wildcards(pattern, "/", "segment"), pattern


def check_path(pattern: str) -> tuple[str | None, str]:
    if not pattern.startswith("/"):
        return "must start with '/'", pattern
    if "?" in pattern or "#" in pattern:
        return f"paths are matched without query or fragment: {pattern!r}", pattern
    if not _PATH_CHARS.fullmatch(pattern):
        return f"invalid character in {pattern!r} (RFC 3986 path characters only)", pattern
    problem = _check_percent(pattern)
    if problem is not None:
        return problem, pattern
    for triplet in PCT_TRIPLET.findall(pattern):
        char = chr(int(triplet[1:], 16))
        if char in UNRESERVED:
            return f"{triplet!r} never occurs in a normalised path, write {char!r} in {pattern!r}", pattern
    if any(segment in (".", "..") for segment in pattern.split("/")):
        return f"'.' and '..' segments never occur in a normalised path: {pattern!r}", pattern
    return _check_wildcards(pattern, "/", "segment"), upper_percent(pattern)


def check_fingerprint(value: str) -> tuple[str | None, str]:
    normalised = value.lower().replace(":", "")
    if not _FINGERPRINT.fullmatch(normalised):
        return f"must be 64 hex digits (SHA-256), colons allowed, got {value!r}", normalised
    return None, normalised


def _must_match(regex: re.Pattern[str], hint: str) -> Callable[[str], tuple[str | None, str]]:
    def check(value: str) -> tuple[str | None, str]:
        return (None if regex.fullmatch(value) else f"{hint}, got {value!r}"), value

    return check


check_vpce = _must_match(_VPCE, "must look like 'vpce-0123456789abcdef0'")
check_method = _must_match(_METHOD, "must be an uppercase HTTP method such as 'GET'")


Check = Callable[[str], tuple[str | None, str]]
RULE_FIELDS: dict[str, Check] = {
    "subject_cn": check_cn, "san_dns": check_dns, "san_uri": check_uri, "fingerprint_sha256": check_fingerprint,
    "source_vpce": check_vpce, "methods": check_method, "paths": check_path,
}


def check_rule_name(name: str) -> str | None:
    if not name:
        return "must not be empty"
    if name == ALLOW_ALL_RULE:
        return f"{ALLOW_ALL_RULE!r} is reserved"
    return None


def missing_identity(fields: dict[str, object]) -> str | None:
    """The problem when a rule names no identity field (it would apply to every client)."""
    if any(fields.get(f) for f in IDENTITY_FIELDS):
        return None
    return f"needs at least one identity field ({', '.join(IDENTITY_FIELDS)})"
