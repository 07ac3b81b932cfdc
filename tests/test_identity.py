"""Tests for proxy.identity: real certificates (trustme, cryptography's builder, hand-made DER for the
odd ones), one real TLS handshake, escaping tables, and a hypothesis property for header safety."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import ssl
import warnings

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtensionOID, NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.identity import Identity, IdentityError, escape_rfc4514, parse_identity

_KEY = ed25519.Ed25519PrivateKey.generate()  # Ed25519: signing is fast enough for hypothesis
_NOT_AFTER = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
DNS_TAG, URI_TAG = 0x82, 0x86  # GeneralName [2] dNSName, [6] uniformResourceIdentifier (RFC 5280 4.2.1.6)


def tlv(tag: int, body: bytes) -> bytes:
    """DER tag-length-value (definite length, X.690 8.1.3)."""
    n = len(body)
    if n < 0x80:
        return bytes([tag, n]) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def raw_san(*entries: tuple[int, bytes]) -> x509.UnrecognizedExtension:
    """A SAN extension from raw GeneralNames, so tests can put any bytes in an IA5String."""
    return x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, tlv(0x30, b"".join(tlv(t, v) for t, v in entries))
    )


def attr(oid: ObjectIdentifier, value: str, asn1_type: _ASN1Type | None = None) -> x509.NameAttribute:
    with warnings.catch_warnings():  # _validate=False still warns about out-of-bounds lengths
        warnings.simplefilter("ignore", UserWarning)
        return x509.NameAttribute(oid, value, asn1_type, _validate=False)


def cn(value: str, asn1_type: _ASN1Type | None = None) -> x509.NameAttribute:
    return attr(NameOID.COMMON_NAME, value, asn1_type)


def build(
    subject: x509.Name | list[x509.NameAttribute] = (),  # type: ignore[assignment]
    extensions: tuple[x509.ExtensionType, ...] = (),
    serial: int = 0x5A5A5A,
) -> bytes:
    name = subject if isinstance(subject, x509.Name) else x509.Name(list(subject))
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer")]))
        .public_key(_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
        .not_valid_after(_NOT_AFTER)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    with warnings.catch_warnings():  # the builder itself warns about over-long attributes
        warnings.simplefilter("ignore", UserWarning)
        return builder.sign(_KEY, None).public_bytes(serialization.Encoding.DER)


def patch(der: bytes, old: bytes, new: bytes) -> bytes:
    """Same-length byte surgery for encodings the builder refuses (signature breaks; nobody checks here)."""
    assert len(old) == len(new) and der.count(old) == 1
    return der.replace(old, new)


def rfc4514_unescape_value(value: str) -> str:
    """Reverse RFC 4514 §2.4 escaping: '\\' + hexpair is an octet, '\\' + char is that char."""
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\":
            pair = value[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789ABCDEFabcdef" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += value[i + 1].encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return out.decode("utf-8")


def parse_xfcc(xfcc: str) -> list[tuple[str, str]]:
    """A strict reader of one XFCC element: key=value pairs split on ';', quoted values unescaped."""
    pairs, i = [], 0
    while i < len(xfcc):
        eq = xfcc.index("=", i)
        key, i = xfcc[i:eq], eq + 1
        if i < len(xfcc) and xfcc[i] == '"':
            i += 1
            value = []
            while xfcc[i] != '"':
                if xfcc[i] == "\\":
                    i += 1
                value.append(xfcc[i])
                i += 1
            i += 1
            pairs.append((key, "".join(value)))
        else:
            end = xfcc.find(";", i)
            end = len(xfcc) if end < 0 else end
            raw = xfcc[i:end]
            assert not any(c in raw for c in ',="\\ ')
            pairs.append((key, raw))
            i = end
        if i < len(xfcc):
            assert xfcc[i] == ";"
            i += 1
    return pairs


def percent_decode(value: str) -> str:
    out, i = bytearray(), 0
    while i < len(value):
        if value[i] == "%":
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out += value[i].encode()
            i += 1
    return out.decode("utf-8")


def header_safe(text: str) -> bool:
    return all(0x20 <= ord(c) <= 0x7E for c in text)


# --- ordinary certificates --------------------------------------------------------------------------------


def test_trustme_certificate_fields() -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("a.example.com", "b.example.com", "x@y.example", "10.0.0.1", common_name="partner-a")
    der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(serialization.Encoding.DER)
    cert = x509.load_der_x509_certificate(der)

    ident = parse_identity(der)

    assert ident.common_names == ("partner-a",)
    assert ident.san_dns == ("a.example.com", "b.example.com")  # email and IP ignored
    assert ident.san_uri == ()
    assert ident.subject == cert.subject.rfc4514_string()
    assert ident.subject.startswith("CN=partner-a,OU=Testing cert ")
    assert ident.fingerprint == hashlib.sha256(der).hexdigest()
    # RFC 8705 §3.1 x5t#S256, computed independently: base64url of the SHA-256 digest, no padding
    assert ident.thumbprint == base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert ident.serial == format(cert.serial_number, "X")
    assert ident.not_after == cert.not_valid_after_utc.timestamp()
    assert ident.san_parse_failed is False
    assert ident.xfcc == (
        f'Hash={ident.fingerprint};Subject="{ident.subject}";DNS=a.example.com;DNS=b.example.com'
    )
    assert parse_identity(bytearray(der)) == ident


def test_identity_from_a_real_tls_handshake() -> None:
    """The DER as the listener will get it: ssl_object.getpeercert(binary_form=True) after mTLS."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("server.test").configure_cert(server_ctx)
    ca.configure_trust(server_ctx)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_leaf = ca.issue_cert("client.partner.test", common_name="partner-b")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    client_leaf.configure_cert(client_ctx)

    bios = [ssl.MemoryBIO() for _ in range(4)]  # c->s in, c->s out ... pumped by hand, no sockets
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname="server.test")
    done = {server: False, client: False}
    for _ in range(20):
        for end in (client, server):
            if not done[end]:
                try:
                    end.do_handshake()
                    done[end] = True
                except ssl.SSLWantReadError:
                    pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
        if all(done.values()):
            break
    client.write(b"x")  # TLS 1.3: the server sees the client certificate once the client flight is read
    bios[0].write(bios[3].read())
    assert server.read(1) == b"x"

    der = server.getpeercert(binary_form=True)
    assert der is not None
    ident = parse_identity(der)
    assert ident.common_names == ("partner-b",)
    assert ident.san_dns == ("client.partner.test",)
    expected = x509.load_pem_x509_certificate(client_leaf.cert_chain_pems[0].bytes())
    assert der == expected.public_bytes(serialization.Encoding.DER)
    assert ident.fingerprint == hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize(
    ("serial", "expected"),
    [(1, "1"), (0xAB, "AB"), (0x0100, "100"), (2**159 - 1, "7" + "F" * 39)],
)
def test_serial_is_uppercase_hex_without_leading_zeros(serial: int, expected: str) -> None:
    assert parse_identity(build([cn("x")], serial=serial)).serial == expected


def test_not_after_is_posix_timestamp() -> None:
    assert parse_identity(build([cn("x")])).not_after == _NOT_AFTER.timestamp()


# --- subject rendering and escaping -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "subject"),
    [
        ("plain", "CN=plain"),
        ("a b", "CN=a b"),  # inner space is allowed raw (RFC 4514 §2.4)
        ("a=b", "CN=a=b"),
        ("a,b", "CN=a\\,b"),
        ("a+b", "CN=a\\+b"),
        ('a"b', 'CN=a\\"b'),
        ("a\\b", "CN=a\\\\b"),
        ("a;b<c>d", "CN=a\\;b\\<c\\>d"),
        ("#x", "CN=\\#x"),
        (" x", "CN=\\ x"),
        ("x ", "CN=x\\ "),
        ("a\r\nb", "CN=a\\0D\\0Ab"),
        ("a\x00b", "CN=a\\00b"),
        ("a\tb\x7f", "CN=a\\09b\\7F"),
        ("caf\u00e9", "CN=caf\\C3\\A9"),
        ("\U0001f600", "CN=\\F0\\9F\\98\\80"),
        ("\u2028\u0085", "CN=\\E2\\80\\A8\\C2\\85"),  # Unicode line separators are not printable ASCII
    ],
)
def test_subject_escaping(value: str, subject: str) -> None:
    ident = parse_identity(build([cn(value)]))
    assert ident.subject == subject
    assert ident.common_names == (value,)  # raw, for matching
    assert rfc4514_unescape_value(subject[3:]) == value


def test_subject_order_and_multivalued_rdn() -> None:
    name = x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")]),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org, Inc.")]),
            x509.RelativeDistinguishedName([cn("svc"), x509.NameAttribute(NameOID.USER_ID, "42")]),
        ]
    )
    ident = parse_identity(build(name))
    assert ident.subject == "CN=svc+UID=42,O=Org\\, Inc.,C=DE"
    assert ident.common_names == ("svc",)


def test_escape_rfc4514_leaves_printable_ascii_alone() -> None:
    text = "CN=a\\,b x"
    assert escape_rfc4514(text) == text
    assert escape_rfc4514("CN=\n") == "CN=\\0A"


@pytest.mark.parametrize(
    "asn1_type",
    [_ASN1Type.BMPString, _ASN1Type.T61String, _ASN1Type.UniversalString, _ASN1Type.UTF8String,
     _ASN1Type.IA5String, _ASN1Type.VisibleString],
)
def test_subject_string_types(asn1_type: _ASN1Type) -> None:
    ident = parse_identity(build([cn("h\u00e9llo", asn1_type)]))
    assert ident.common_names == ("h\u00e9llo",)
    assert ident.subject == "CN=h\\C3\\A9llo"


def test_subject_printable_string() -> None:
    ident = parse_identity(build([cn("Hello World", _ASN1Type.PrintableString)]))
    assert ident.common_names == ("Hello World",)


def test_empty_subject() -> None:
    ident = parse_identity(build([]))
    assert ident.subject == ""
    assert ident.common_names == ()
    assert ident.xfcc == f'Hash={ident.fingerprint};Subject=""'


def test_duplicate_cns_are_all_kept_in_order() -> None:
    ident = parse_identity(build([cn("first"), cn("second"), cn("first")]))
    assert ident.common_names == ("first", "second", "first")
    assert ident.subject == "CN=first,CN=second,CN=first"


@pytest.mark.parametrize(
    "attrs",
    [
        [cn("x" * 100_000)],  # cryptography warns (> 64): must neither warn nor fail here
        [cn("")],  # warns (< 1)
        [attr(NameOID.COUNTRY_NAME, "USA")],  # warns (!= 2)
    ],
)
def test_out_of_bounds_attributes_parse_without_warnings(attrs: list[x509.NameAttribute]) -> None:
    ident = parse_identity(build(attrs))  # filterwarnings=error turns any leaked warning into a failure
    assert header_safe(ident.subject)
    assert ident.subject.split("=", 1)[1] == attrs[0].value


# --- SANs and XFCC ----------------------------------------------------------------------------------------


def test_sans_keep_certificate_order_and_xfcc_groups_uri_before_dns() -> None:
    ext = x509.SubjectAlternativeName(
        [
            x509.DNSName("b.example"),
            x509.UniformResourceIdentifier("spiffe://td/ns/a"),
            x509.DNSName("a.example"),
            x509.UniformResourceIdentifier("https://x.example/p"),
        ]
    )
    ident = parse_identity(build([cn("svc")], (ext,)))
    assert ident.san_dns == ("b.example", "a.example")
    assert ident.san_uri == ("spiffe://td/ns/a", "https://x.example/p")
    assert ident.xfcc == (
        f'Hash={ident.fingerprint};Subject="CN=svc";URI=spiffe://td/ns/a;URI=https://x.example/p;'
        "DNS=b.example;DNS=a.example"
    )


def test_other_san_types_are_ignored() -> None:
    ext = x509.SubjectAlternativeName(
        [
            x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
            x509.RFC822Name("ops@example.com"),
            x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"), tlv(0x0C, b"upn@example")),
            x509.RegisteredID(ObjectIdentifier("1.2.3.4")),
            x509.DirectoryName(x509.Name([cn("dir")])),
            x509.DNSName("only.example"),
        ]
    )
    ident = parse_identity(build([cn("svc")], (ext,)))
    assert ident.san_dns == ("only.example",)
    assert ident.san_uri == ()
    assert ident.xfcc.endswith(';DNS=only.example')


def test_five_thousand_sans() -> None:
    names: list[x509.GeneralName] = []
    for i in range(2500):
        names.append(x509.DNSName(f"h{i}.example"))
        names.append(x509.UniformResourceIdentifier(f"spiffe://td/{i}"))
    ident = parse_identity(build([cn("many")], (x509.SubjectAlternativeName(names),)))
    assert len(ident.san_dns) == 2500 and len(ident.san_uri) == 2500
    assert ident.san_dns[-1] == "h2499.example"
    assert ident.xfcc.count(";DNS=") == 2500 and ident.xfcc.count(";URI=") == 2500


@pytest.mark.parametrize(
    ("tag", "raw", "fragment"),
    [
        (DNS_TAG, b"a.example.com", "DNS=a.example.com"),
        (URI_TAG, b"spiffe://td/ns/a", "URI=spiffe://td/ns/a"),
        (URI_TAG, b"https://x/?a=b;c", 'URI="https://x/?a=b;c"'),
        (URI_TAG, b"https://x/a,b", 'URI="https://x/a,b"'),
        (URI_TAG, b"https://x/a%41", "URI=https://x/a%41"),  # existing percent-encoding untouched
        (DNS_TAG, b'a"b', 'DNS="a\\"b"'),
        (DNS_TAG, b"a\\b", 'DNS="a\\\\b"'),
        (DNS_TAG, b"a b", 'DNS="a b"'),
        (DNS_TAG, b"a\r\nb", "DNS=a%0D%0Ab"),
        (DNS_TAG, b"a\x00\x7f", "DNS=a%00%7F"),
        (DNS_TAG, b"a\tb", "DNS=a%09b"),  # tab: percent-encoded, so no whitespace is left to quote
        (DNS_TAG, "\u00e9.example".encode(), "DNS=%C3%A9.example"),
        (DNS_TAG, b"", 'DNS=""'),
    ],
)
def test_xfcc_value_encoding(tag: int, raw: bytes, fragment: str) -> None:
    ident = parse_identity(build([cn("svc")], (raw_san((tag, raw)),)))
    assert ident.xfcc == f'Hash={ident.fingerprint};Subject="CN=svc";{fragment}'
    assert header_safe(ident.xfcc)
    assert (ident.san_dns if tag == DNS_TAG else ident.san_uri) == (raw.decode(),)  # raw for matching


def test_xfcc_subject_escapes_backslash_and_quote() -> None:
    ident = parse_identity(build([cn('a,"b"')]))
    assert ident.subject == 'CN=a\\,\\"b\\"'
    assert ident.xfcc == f'Hash={ident.fingerprint};Subject="CN=a\\\\,\\\\\\"b\\\\\\""'
    assert parse_xfcc(ident.xfcc)[1] == ("Subject", ident.subject)


# --- odd and broken certificates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extensions",
    [
        pytest.param((x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x05\x82"),),
                     id="truncated-san"),
        pytest.param((raw_san((DNS_TAG, b"\xff\xfe")),), id="san-not-utf8"),
        pytest.param((x509.SubjectAlternativeName([x509.DNSName("ok.example")]),
                      x509.UnrecognizedExtension(ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x01\x01")),
                     id="other-extension-malformed"),
    ],
)
def test_unparseable_extensions_drop_sans_but_keep_identity(extensions: tuple[x509.ExtensionType, ...]) -> None:
    ident = parse_identity(build([cn("svc")], extensions))
    assert ident.common_names == ("svc",)
    assert (ident.san_dns, ident.san_uri, ident.san_parse_failed) == ((), (), True)
    assert ident.xfcc == f'Hash={ident.fingerprint};Subject="CN=svc"'


def test_duplicate_san_extension_drops_sans() -> None:
    placeholder = ObjectIdentifier("2.5.29.99")  # same DER length as 2.5.29.17, patched in afterwards
    der = build(
        [cn("svc")],
        (x509.SubjectAlternativeName([x509.DNSName("a.example")]), x509.UnrecognizedExtension(
            placeholder, tlv(0x30, tlv(DNS_TAG, b"b.example")))),
    )
    der = patch(der, b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x11")
    ident = parse_identity(der)
    assert (ident.san_dns, ident.san_parse_failed) == ((), True)


_GOOD = build([cn("ZZ")])


@pytest.mark.parametrize(
    "der",
    [
        pytest.param(b"", id="empty"),
        pytest.param(None, id="none"),
        pytest.param("text", id="str"),
        pytest.param(b"\x30", id="one-byte"),
        pytest.param(b"not a certificate", id="garbage"),
        pytest.param(_GOOD[:-1], id="truncated"),
        pytest.param(_GOOD + b"\x00", id="trailing-byte"),
        pytest.param(trustme.CA().cert_pem.bytes(), id="pem-not-der"),
        pytest.param(patch(_GOOD, b"\x0c\x02ZZ", b"\x1e\x02\xd8\x00"), id="bmp-lone-surrogate"),
        pytest.param(patch(_GOOD, b"\x0c\x02ZZ", b"\x0c\x02\xff\xfe"), id="utf8-invalid"),
        pytest.param(patch(_GOOD, b"\x0c\x02ZZ", b"\x1c\x02ZZ"), id="universalstring-bad-length"),
        pytest.param(patch(_GOOD, b"\x0c\x02ZZ", b"\x03\x02\x00Z"), id="cn-bitstring"),
        pytest.param(patch(_GOOD, b"\x0c\x02ZZ", b"\x02\x02\x01\x02"), id="cn-integer"),
        pytest.param(patch(_GOOD, b"\x02\x03ZZZ", b"\x02\x03\xffZZ"), id="negative-serial"),
        pytest.param(patch(_GOOD, b"\x02\x03ZZZ", b"\x02\x03\x00\x00\x00"), id="zero-serial-padded"),
        pytest.param(patch(_GOOD, b"\x02\x03ZZZ", b"\x02\x03\x00ZZ"), id="serial-not-minimal"),
    ],
)
def test_bad_input_raises_identity_error(der: object) -> None:
    with pytest.raises(IdentityError) as info:
        parse_identity(der)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert len(str(info.value)) < 100 and "\n" not in str(info.value)


def test_zero_serial_is_refused() -> None:
    der = patch(build([cn("x")], serial=0x5A), b"\x02\x01\x5a", b"\x02\x01\x00")
    with pytest.raises(IdentityError, match="serial"):
        parse_identity(der)


# --- property ---------------------------------------------------------------------------------------------

_ANY_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.characters(min_codepoint=0x00, max_codepoint=0x1F),
        st.sampled_from("\x7f\x85\u00e9\u2028\u202e\ufeff\U0001f600"),
        st.characters(exclude_categories=("Cs",)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(common_name=_ANY_TEXT, dns=st.lists(_ANY_TEXT, max_size=4), uris=st.lists(_ANY_TEXT, max_size=4))
def test_property_subject_and_xfcc_are_header_safe(common_name: str, dns: list[str], uris: list[str]) -> None:
    entries = [(DNS_TAG, d.encode()) for d in dns] + [(URI_TAG, u.encode()) for u in uris]
    der = build([cn(common_name)], (raw_san(*entries),) if entries else ())

    ident = parse_identity(der)

    for text in (ident.subject, ident.xfcc):
        assert header_safe(text)
        assert "\r" not in text and "\n" not in text
    assert parse_identity(der) == ident  # deterministic
    assert ident.common_names == (common_name,)
    assert rfc4514_unescape_value(ident.subject[3:]) == common_name
    assert (ident.san_dns, ident.san_uri) == (tuple(dns), tuple(uris))
    pairs = parse_xfcc(ident.xfcc)
    assert pairs[:2] == [("Hash", ident.fingerprint), ("Subject", ident.subject)]
    assert [k for k, _ in pairs[2:]] == ["URI"] * len(uris) + ["DNS"] * len(dns)
    for (_, encoded), original in zip(pairs[2:], uris + dns, strict=True):
        if "%" not in original:  # an existing '%' is deliberately left alone (see module docstring)
            assert percent_decode(encoded) == original


def test_identity_is_frozen() -> None:
    ident = parse_identity(build([cn("x")]))
    assert isinstance(ident, Identity)
    with pytest.raises(AttributeError):
        ident.subject = "CN=evil"  # type: ignore[misc]
