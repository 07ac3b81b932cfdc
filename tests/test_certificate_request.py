"""The CertificateRequest parser the partner tests read the wire with (tests/certificate_request.py): byte tables.

The first two messages are what OpenSSL 3.0 sent as a server with no client CA list and its default signature
algorithms, copied from ``openssl s_client -msg``; the rest are built by hand around one field each.
"""

from __future__ import annotations

import pytest

from tests.certificate_request import SIGNATURE_SCHEMES, CertificateRequest, from_s_client, parse

# TLS 1.2: certificate_types rsa_sign, dss_sign, ecdsa_sign; 20 schemes; certificate_authorities empty ("00 00").
OPENSSL_DEFAULT_12 = bytes.fromhex(
    "0d 00 00 30 03 01 02 40 00 28 04 03 05 03 06 03 08 07 08 08 08 09 08 0a 08 0b 08 04 08 05 08 06 "
    "04 01 05 01 06 01 03 03 03 01 03 02 04 02 05 02 06 02 00 00")
# TLS 1.3: empty context, one extension (signature_algorithms), no certificate_authorities extension.
OPENSSL_DEFAULT_13 = bytes.fromhex(
    "0d 00 00 29 00 00 26 00 0d 00 22 00 20 04 03 05 03 06 03 08 07 08 08 08 09 08 0a 08 0b 08 04 08 "
    "05 08 06 04 01 05 01 06 01 03 03 03 01")

NAME_A = bytes.fromhex("3011310f300d06035504030c06434120616161")  # CN=CA aaa
NAME_B = bytes.fromhex("3011310f300d06035504030c06434120626262")  # CN=CA bbb


def handshake(body: bytes) -> bytes:
    return b"\x0d" + len(body).to_bytes(3, "big") + body


def vec(n: int, data: bytes) -> bytes:
    return len(data).to_bytes(n, "big") + data


def names(*ders: bytes) -> bytes:
    return vec(2, b"".join(vec(2, d) for d in ders))


def test_openssl_default_tls12() -> None:
    cr = parse(OPENSSL_DEFAULT_12, "1.2")
    assert cr.certificate_types == (1, 2, 64)
    assert cr.signature_names[:3] == ("ecdsa_secp256r1_sha256", "ecdsa_secp384r1_sha384", "ecdsa_secp521r1_sha512")
    assert "dsa_sha224" in cr.signature_names and "rsa_pkcs1_sha224" in cr.signature_names
    assert len(cr.signature_algorithms) == 20
    assert cr.authorities == ()
    assert cr.raw == OPENSSL_DEFAULT_12


def test_openssl_default_tls13() -> None:
    cr = parse(OPENSSL_DEFAULT_13, "1.3")
    assert cr.certificate_types == ()
    assert cr.signature_names[-2:] == ("ecdsa_sha224", "rsa_pkcs1_sha224")
    assert len(cr.signature_algorithms) == 16
    assert cr.authorities == ()


def test_tls12_authorities_in_order() -> None:
    body = vec(1, b"\x40") + vec(2, b"\x04\x03\x08\x07") + names(NAME_B, NAME_A)
    cr = parse(handshake(body), "1.2")
    assert cr == CertificateRequest("1.2", handshake(body), (64,), (0x0403, 0x0807), (NAME_B, NAME_A))
    assert cr.signature_names == ("ecdsa_secp256r1_sha256", "ed25519")


def test_tls13_extensions_in_any_order() -> None:
    exts = (b"\x00\x2f" + vec(2, names(NAME_A, NAME_B))  # certificate_authorities first
            + b"\xff\x01" + vec(2, b"\x00")  # an unknown extension is skipped
            + b"\x00\x0d" + vec(2, vec(2, b"\x08\x04")))
    cr = parse(handshake(vec(1, b"") + vec(2, exts)), "1.3")
    assert cr.authorities == (NAME_A, NAME_B)
    assert cr.signature_algorithms == (SIGNATURE_SCHEMES["rsa_pss_rsae_sha256"],)


@pytest.mark.parametrize(("message", "version", "error"), [
    pytest.param(OPENSSL_DEFAULT_12[:-1], "1.2", "needs", id="truncated"),
    pytest.param(OPENSSL_DEFAULT_12 + b"\x00", "1.2", "trailing", id="trailing-byte"),
    pytest.param(b"\x0b" + OPENSSL_DEFAULT_12[1:], "1.2", "not a CertificateRequest", id="other-message"),
    pytest.param(handshake(vec(1, b"\x40") + vec(2, b"\x04\x03\x08") + names()), "1.2", "odd", id="odd-schemes"),
    pytest.param(handshake(vec(1, b"\x40") + vec(2, b"\x04\x03") + vec(2, b"\x00\x00")), "1.2", "empty",
                 id="empty-name"),
    pytest.param(handshake(vec(1, b"") + vec(2, (b"\x00\x0d" + vec(2, vec(2, b"\x04\x03"))) * 2)), "1.3", "twice",
                 id="duplicate-extension"),
    pytest.param(OPENSSL_DEFAULT_13, "1.1", "unsupported", id="version"),
])
def test_malformed_messages_are_errors(message: bytes, version: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse(message, version)


def dump(message: bytes, version: str = "1.2") -> str:
    """The message as ``openssl s_client -msg`` prints it: 16 bytes per line, indented by four spaces."""
    lines = [f"<<< TLS {version}, RecordHeader [length 0005]", "    16 03 03 00 30",
             f"<<< TLS {version}, Handshake [length {len(message):04x}], CertificateRequest"]
    lines += ["    " + message[i:i + 16].hex(" ") for i in range(0, len(message), 16)]
    lines += [f"<<< TLS {version}, Handshake [length 0004], ServerHelloDone", "    0e 00 00 00"]
    return "\n".join(lines) + "\n"


def test_from_s_client_transcript() -> None:
    cr = from_s_client(">>> TLS 1.3, Handshake [length 0005], ClientHello\n    01 00 00 01 00\n"
                       + dump(OPENSSL_DEFAULT_12))
    assert cr.raw == OPENSSL_DEFAULT_12 and cr.version == "1.2"
    assert from_s_client(dump(OPENSSL_DEFAULT_13, "1.3")).version == "1.3"


@pytest.mark.parametrize(("text", "error"), [
    pytest.param("", "found 0", id="none"),
    pytest.param(dump(OPENSSL_DEFAULT_12) * 2, "found 2", id="two"),
    pytest.param(dump(OPENSSL_DEFAULT_12).replace("[length 0034]", "[length 0035]"), "header says", id="short"),
])
def test_from_s_client_needs_exactly_one_whole_message(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        from_s_client(text)
