"""End-to-end: the identity the upstream receives, and that a client can never forge it.

Owns: X-Client-Cert-Subject (RFC 4514), -Fingerprint (lowercase SHA-256), -Serial (uppercase hex),
X-Forwarded-Client-Cert (Envoy format), X-Forwarded-For (the peer address, replaced), X-Forwarded-Proto and
x-apigw-api-id as the upstream received them; removal of every client-sent copy in any spelling; and the
``weird`` certificate (quotes, commas, CR/LF, non-ASCII), whose values must arrive as single-line printable ASCII
that parses back to exactly the certificate's values.

The demo upstream echoes every header it received; the weird case reads the raw head bytes with a scripted
upstream instead, so nothing between the proxy and the assertion can hide a CR, LF or non-ASCII byte.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from cryptography import x509

from tests.e2e.kit import Echo, echo_of
from tests.harness import RawClient, RunningProxy, ScriptedUpstream, client_ctx, get, read_request
from tests.pki import WEIRD_CN, WEIRD_DNS, WEIRD_O, WEIRD_URI, ClientCert, Pki

ProxyFactory = Callable[..., Awaitable[RunningProxy]]
BOTH_LOOPS = pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])
IDENTITY_HEADERS = ("X-Client-Cert-Subject", "X-Client-Cert-Fingerprint", "X-Client-Cert-Serial",
                    "X-Forwarded-Client-Cert", "X-Forwarded-For", "X-Forwarded-Proto", "x-apigw-api-id")


# ---- strict parsers: what an upstream would do with the values -----------------------------------------------
def parse_rfc4514(text: str) -> list[list[tuple[str, str]]]:
    """RDNs in string order, each a list of (type, value); values unescaped per RFC 4514 §3 (``\\`` + special
    character, or ``\\`` + two hex digits of a UTF-8 byte).  Raises on anything ambiguous."""
    rdns: list[list[tuple[str, str]]] = []
    rdn: list[tuple[str, str]] = []
    i = 0
    while True:
        eq = text.index("=", i)
        attr = text[i:eq]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", attr):
            raise ValueError(f"bad attribute type {attr!r}")
        i = eq + 1
        raw = bytearray()
        while i < len(text) and text[i] not in ",+":
            c = text[i]
            if c == "\\":
                pair = text[i + 1:i + 3]
                if re.fullmatch(r"[0-9A-Fa-f]{2}", pair):
                    raw.append(int(pair, 16))
                    i += 3
                    continue
                if text[i + 1:i + 2] not in tuple(' "#+,;<=>\\'):
                    raise ValueError(f"bad escape at {i} in {text!r}")
                raw += text[i + 1].encode()
                i += 2
                continue
            if c in '";<>\x00':
                raise ValueError(f"unescaped {c!r} at {i} in {text!r}")
            raw += c.encode()
            i += 1
        rdn.append((attr, raw.decode("utf-8")))
        if i == len(text):
            rdns.append(rdn)
            return rdns
        if text[i] == ",":
            rdns.append(rdn)
            rdn = []
        i += 1


XFCC_KEYS = {"By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"}


def parse_xfcc(text: str) -> list[list[tuple[str, str]]]:
    """Envoy x-forwarded-client-cert: elements split on ``,``, pairs on ``;``, ``key=value`` where a value is a
    token or a double-quoted string with ``\\"`` and ``\\\\`` escapes.  Raises on anything ambiguous."""
    elements: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    i = 0
    while True:
        eq = text.index("=", i)
        key = text[i:eq]
        if key not in XFCC_KEYS:
            raise ValueError(f"unknown key {key!r}")
        i = eq + 1
        if text[i:i + 1] == '"':
            i += 1
            chars = []
            while text[i] != '"':
                if text[i] == "\\":
                    i += 1
                    if text[i] not in '"\\':
                        raise ValueError(f"bad escape at {i}")
                chars.append(text[i])
                i += 1
            value = "".join(chars)
            i += 1
        else:
            j = i
            while j < len(text) and text[j] not in ",;":
                if text[j] in '"\\= ':
                    raise ValueError(f"{text[j]!r} in an unquoted value at {j}")
                j += 1
            value, i = text[i:j], j
        pairs.append((key, value))
        if i == len(text):
            elements.append(pairs)
            return elements
        if text[i] == ",":
            elements.append(pairs)
            pairs = []
        elif text[i] != ";":
            raise ValueError(f"expected ';' or ',' at {i}")
        i += 1


def sans(client: ClientCert) -> tuple[list[str], list[str]]:
    ext = client.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.UniformResourceIdentifier), ext.get_values_for_type(x509.DNSName)


def expected_xfcc(client: ClientCert) -> str:
    uris, dns = sans(client)
    return ";".join([f"Hash={client.fingerprint}", f'Subject="{client.subject}"',
                     *(f"URI={u}" for u in uris), *(f"DNS={d}" for d in dns)])


# ---- per client --------------------------------------------------------------------------------------------
@BOTH_LOOPS
@pytest.mark.parametrize("name", ["good", "rsa", "via_intermediate", "self_signed"])
async def test_identity_headers_reach_the_upstream(pki: Pki, auth_proxy: ProxyFactory, name: str) -> None:
    rp = await auth_proxy(top={"allow_all_verified": True}, rules=[])
    client = pki.clients[name]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ctx(pki, name))) as session:
        async with session.get(f"https://localhost:{rp.port}/id") as resp:
            assert resp.status == 200
            echo = echo_of(await resp.read())
    assert echo.one("X-Client-Cert-Subject") == client.subject
    assert echo.one("X-Client-Cert-Fingerprint") == client.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", client.fingerprint)
    assert echo.one("X-Client-Cert-Serial") == client.serial_hex
    assert re.fullmatch(r"[0-9A-F]+", client.serial_hex)
    assert echo.one("X-Forwarded-Client-Cert") == expected_xfcc(client)
    assert parse_xfcc(echo.one("X-Forwarded-Client-Cert")) == [
        [("Hash", client.fingerprint), ("Subject", client.subject),
         *(("URI", u) for u in sans(client)[0]), *(("DNS", d) for d in sans(client)[1])]]
    assert echo.one("X-Forwarded-For") == "127.0.0.1"
    assert echo.one("X-Forwarded-Proto") == "https"
    assert echo.one("x-apigw-api-id") == "api"
    assert echo.one("Host") == "api.test"


@pytest.mark.parametrize(("api_id", "expected"), [("abc123", ["abc123"]), (None, [])])
async def test_api_id_comes_from_the_config_only(pki: Pki, auth_proxy: ProxyFactory, api_id: str | None,
                                                 expected: list[str]) -> None:
    rp = await auth_proxy(upstream={"api_id": api_id})
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        resp = await client.request(get("/api", extra=b"x-apigw-api-id: evil\r\nX_Apigw_Api_Id: evil2\r\n"))
    finally:
        await client.close()
    assert resp.status == 200, resp.body  # the demo upstream accepts Host api.test either way
    assert echo_of(resp.body).all("x-apigw-api-id") == expected


# ---- spoofing ----------------------------------------------------------------------------------------------
SPELLINGS = {
    "as-is": lambda n: n,
    "lower": str.lower,
    "upper": str.upper,
    "underscore": lambda n: n.replace("-", "_"),
    "underscore-lower": lambda n: n.replace("-", "_").lower(),
    "mixed": lambda n: "".join(c.upper() if i % 2 else c.lower() for i, c in enumerate(n.replace("-", "_", 1))),
}


@BOTH_LOOPS
@pytest.mark.parametrize("spelling", list(SPELLINGS))
async def test_client_sent_identity_headers_never_reach_the_upstream(pki: Pki, auth_proxy: ProxyFactory,
                                                                     spelling: str) -> None:
    rp = await auth_proxy()
    spell = SPELLINGS[spelling]
    forged = b"".join(f"{spell(name)}: FORGED-{i}\r\n{spell(name)}: FORGED-{i}b\r\n".encode()
                      for i, name in enumerate(IDENTITY_HEADERS))
    client = await RawClient.connect(rp.port, client_ctx(pki, "good"))
    try:
        resp = await client.request(get("/spoof", extra=forged))
    finally:
        await client.close()
    assert resp.status == 200, resp.body
    echo = echo_of(resp.body)
    assert not [(k, v) for k, v in echo.headers if "FORGED" in v]
    folded = {n.lower() for n in IDENTITY_HEADERS}
    assert not [k for k, _ in echo.headers if "_" in k and k.lower().replace("_", "-") in folded]
    good = pki.clients["good"]
    assert echo.one("X-Client-Cert-Subject") == good.subject
    assert echo.one("X-Client-Cert-Fingerprint") == good.fingerprint
    assert echo.one("X-Client-Cert-Serial") == good.serial_hex
    assert echo.one("X-Forwarded-Client-Cert") == expected_xfcc(good)
    assert echo.one("X-Forwarded-For") == "127.0.0.1"  # replaced, not "FORGED-4, 127.0.0.1"
    assert echo.one("X-Forwarded-Proto") == "https"
    assert echo.one("x-apigw-api-id") == "api"


async def test_identity_is_per_connection(pki: Pki, auth_proxy: ProxyFactory) -> None:
    """Two clients interleaving keep-alive requests: each request carries its own connection's identity."""
    rp = await auth_proxy(top={"allow_all_verified": True}, rules=[])
    names = ["good", "other", "rsa"]
    clients = [await RawClient.connect(rp.port, client_ctx(pki, n)) for n in names]
    try:
        for round_ in range(3):
            answers = await asyncio.gather(*(c.request(get(f"/r{round_}")) for c in clients))
            for name, resp in zip(names, answers):
                echo: Echo = echo_of(resp.body)
                assert echo.one("X-Client-Cert-Fingerprint") == pki.clients[name].fingerprint
                assert echo.one("X-Client-Cert-Subject") == pki.clients[name].subject
    finally:
        for c in clients:
            await c.close()


# ---- the weird certificate: raw bytes on the upstream side ---------------------------------------------------
async def test_weird_certificate_yields_single_line_ascii_that_parses_back(pki: Pki,
                                                                           auth_proxy: ProxyFactory) -> None:
    heads: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    upstream = await ScriptedUpstream(pki, capture).start()
    try:
        weird = pki.clients["weird"]
        rp = await auth_proxy(upstream_port=upstream.port,
                              rules=[{"name": "weird", "fingerprint_sha256": [weird.fingerprint]}])
        client = await RawClient.connect(rp.port, client_ctx(pki, "weird"))
        try:
            resp = await client.request(get("/weird"))
        finally:
            await client.close()
    finally:
        await upstream.stop()
    assert resp.status == 200 and resp.body == b"ok"
    [head] = heads
    lines = head[:-4].split(b"\r\n")
    for line in lines:  # no bare CR or LF, no control or non-ASCII byte anywhere in the head
        assert re.fullmatch(rb"[\x20-\x7e]*", line), line
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.decode("ascii").partition(":")
        fields.setdefault(name.lower(), []).append(value.strip())
    for name in IDENTITY_HEADERS:
        assert len(fields[name.lower()]) == 1, (name, fields.get(name.lower()))
    [subject] = fields["x-client-cert-subject"]
    assert parse_rfc4514(subject) == [[("CN", WEIRD_CN)], [("O", WEIRD_O)]]  # RFC 4514: last RDN first
    assert fields["x-client-cert-fingerprint"] == [weird.fingerprint]
    assert fields["x-client-cert-serial"] == [weird.serial_hex]
    [xfcc] = fields["x-forwarded-client-cert"]
    assert parse_xfcc(xfcc) == [[("Hash", weird.fingerprint), ("Subject", subject), ("URI", WEIRD_URI),
                                 ("DNS", WEIRD_DNS)]]


@pytest.mark.parametrize(("text", "expected"), [
    ("CN=a\\,b,O=x", [[("CN", "a,b")], [("O", "x")]]),
    ("CN=caf\\C3\\A9+UID=7,O=x", [[("CN", "café"), ("UID", "7")], [("O", "x")]]),
    ("CN=\\0D\\0A\\\"q\\\"", [[("CN", '\r\n"q"')]]),
])
def test_rfc4514_parser_itself(text: str, expected: list[list[tuple[str, str]]]) -> None:
    """The test's own parser: it must decode escapes, and refuse what an upstream could read two ways."""
    assert parse_rfc4514(text) == expected


@pytest.mark.parametrize("text", ['CN=a"b', "CN=a;b", "CN=a\\x", "C N=a"])
def test_rfc4514_parser_refuses_ambiguity(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc4514(text)


@pytest.mark.parametrize(("text", "expected"), [
    ('Hash=ab;Subject="CN=a,O=b";URI=spiffe://x/y;DNS=a.test', [[("Hash", "ab"), ("Subject", "CN=a,O=b"),
                                                                ("URI", "spiffe://x/y"), ("DNS", "a.test")]]),
    ('Hash=ab;DNS="a\\"b\\\\c",Hash=cd', [[("Hash", "ab"), ("DNS", 'a"b\\c')], [("Hash", "cd")]]),
])
def test_xfcc_parser_itself(text: str, expected: list[list[tuple[str, str]]]) -> None:
    assert parse_xfcc(text) == expected


@pytest.mark.parametrize("text", ['Hash=a"b', "Hash=a b", "Nope=1", 'Subject="a\\x"', "DNS=a=b"])
def test_xfcc_parser_refuses_ambiguity(text: str) -> None:
    with pytest.raises(ValueError):
        parse_xfcc(text)
