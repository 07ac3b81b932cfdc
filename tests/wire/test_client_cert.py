"""client_cert: RFC 8941 Byte Sequence / List serialisation, the RFC 9440 example of Appendix A as exact bytes, the
RFC 8705 x5t#S256 thumbprint against an independent computation, and which certificates Client-Cert-Chain carries.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from proxy.wire.client_cert import (
    CLIENT_CERT_NAMES,
    byte_sequence,
    byte_sequence_list,
    rfc9440_lines,
    sent_intermediates,
    x5t_s256,
    x5t_s256_of_digest,
)

# ---- RFC 9440 Appendix A: the client sends its certificate and the intermediate; the chain field shown there
# holds the intermediate and the root (the RFC's proxy forwards the whole validation chain). -----------------
RFC9440_LEAF = """-----BEGIN CERTIFICATE-----
MIIBqDCCAU6gAwIBAgIBBzAKBggqhkjOPQQDAjA6MRswGQYDVQQKDBJMZXQncyBB
dXRoZW50aWNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTAeFw0yMDAx
MTQyMjU1MzNaFw0yMTAxMjMyMjU1MzNaMA0xCzAJBgNVBAMMAkJDMFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAE8YnXXfaUgmnMtOXU/IncWalRhebrXmckC8vdgJ1p
5Be5F/3YC8OthxM4+k1M6aEAEFcGzkJiNy6J84y7uzo9M6NyMHAwCQYDVR0TBAIw
ADAfBgNVHSMEGDAWgBRm3WjLa38lbEYCuiCPct0ZaSED2DAOBgNVHQ8BAf8EBAMC
BsAwEwYDVR0lBAwwCgYIKwYBBQUHAwIwHQYDVR0RAQH/BBMwEYEPYmRjQGV4YW1w
bGUuY29tMAoGCCqGSM49BAMCA0gAMEUCIBHda/r1vaL6G3VliL4/Di6YK0Q6bMje
SkC3dFCOOB8TAiEAx/kHSB4urmiZ0NX5r5XarmPk0wmuydBVoU4hBVZ1yhk=
-----END CERTIFICATE-----"""
RFC9440_INTERMEDIATE = """-----BEGIN CERTIFICATE-----
MIIB5jCCAYugAwIBAgIBFjAKBggqhkjOPQQDAjBWMQswCQYDVQQGEwJVUzEbMBkG
A1UECgwSTGV0J3MgQXV0aGVudGljYXRlMSowKAYDVQQDDCFMZXQncyBBdXRoZW50
aWNhdGUgUm9vdCBBdXRob3JpdHkwHhcNMjAwMTE0MjEzMjMwWhcNMzAwMTExMjEz
MjMwWjA6MRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdGUxGzAZBgNVBAMMEkxB
IEludGVybWVkaWF0ZSBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABJf+aA54
RC5pyLAR5yfXVYmNpgd+CGUTDp2KOGhc0gK91zxhHesEYkdXkpS2UN8Kati+yHtW
CV3kkhCngGyv7RqjZjBkMB0GA1UdDgQWBBRm3WjLa38lbEYCuiCPct0ZaSED2DAf
BgNVHSMEGDAWgBTEA2Q6eecKu9g9yb5glbkhhVINGDASBgNVHRMBAf8ECDAGAQH/
AgEAMA4GA1UdDwEB/wQEAwIBhjAKBggqhkjOPQQDAgNJADBGAiEA5pLvaFwRRkxo
mIAtDIwg9D7gC1xzxBl4r28EzmSO1pcCIQCJUShpSXO9HDIQMUgH69fNDEMHXD3R
RX5gP7kuu2KGMg==
-----END CERTIFICATE-----"""
RFC9440_ROOT = """-----BEGIN CERTIFICATE-----
MIICBjCCAaygAwIBAgIJAKS0yiqKtlhoMAoGCCqGSM49BAMCMFYxCzAJBgNVBAYT
AlVTMRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdGUxKjAoBgNVBAMMIUxldCdz
IEF1dGhlbnRpY2F0ZSBSb290IEF1dGhvcml0eTAeFw0yMDAxMTQyMTI1NDVaFw00
MDAxMDkyMTI1NDVaMFYxCzAJBgNVBAYTAlVTMRswGQYDVQQKDBJMZXQncyBBdXRo
ZW50aWNhdGUxKjAoBgNVBAMMIUxldCdzIEF1dGhlbnRpY2F0ZSBSb290IEF1dGhv
cml0eTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABFoaHU+Z5bPKmGzlYXtCf+E6
HYj62fORaHDOrt+yyh3H/rTcs7ynFfGn+gyFsrSP3Ez88rajv+U2NfD0o0uZ4Pmj
YzBhMB0GA1UdDgQWBBTEA2Q6eecKu9g9yb5glbkhhVINGDAfBgNVHSMEGDAWgBTE
A2Q6eecKu9g9yb5glbkhhVINGDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQE
AwIBhjAKBggqhkjOPQQDAgNIADBFAiEAmAeg1ycKHriqHnaD4M/UDBpQRpkmdcRF
YGMg1Qyrkx4CIB4ivz3wQcQkGhcsUZ1SOImd/lq1Q0FLf09rGfLQPWDc
-----END CERTIFICATE-----"""
# The field values as the RFC prints them ("line breaks and whitespace have been added ... for display").
RFC9440_CLIENT_CERT = """:MIIBqDCCAU6gAwIBAgIBBzAKBggqhkjOPQQDAjA6MRswGQYDVQQKDBJ
 MZXQncyBBdXRoZW50aWNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTAeFw0
 yMDAxMTQyMjU1MzNaFw0yMTAxMjMyMjU1MzNaMA0xCzAJBgNVBAMMAkJDMFkwEwYHKoZ
 Izj0CAQYIKoZIzj0DAQcDQgAE8YnXXfaUgmnMtOXU/IncWalRhebrXmckC8vdgJ1p5Be
 5F/3YC8OthxM4+k1M6aEAEFcGzkJiNy6J84y7uzo9M6NyMHAwCQYDVR0TBAIwADAfBgN
 VHSMEGDAWgBRm3WjLa38lbEYCuiCPct0ZaSED2DAOBgNVHQ8BAf8EBAMCBsAwEwYDVR0
 lBAwwCgYIKwYBBQUHAwIwHQYDVR0RAQH/BBMwEYEPYmRjQGV4YW1wbGUuY29tMAoGCCq
 GSM49BAMCA0gAMEUCIBHda/r1vaL6G3VliL4/Di6YK0Q6bMjeSkC3dFCOOB8TAiEAx/k
 HSB4urmiZ0NX5r5XarmPk0wmuydBVoU4hBVZ1yhk=:"""
RFC9440_CLIENT_CERT_CHAIN = """:MIIB5jCCAYugAwIBAgIBFjAKBggqhkjOPQQDAjBWMQsw
 CQYDVQQGEwJVUzEbMBkGA1UECgwSTGV0J3MgQXV0aGVudGljYXRlMSowKAYDVQQ
 DDCFMZXQncyBBdXRoZW50aWNhdGUgUm9vdCBBdXRob3JpdHkwHhcNMjAwMTE0Mj
 EzMjMwWhcNMzAwMTExMjEzMjMwWjA6MRswGQYDVQQKDBJMZXQncyBBdXRoZW50a
 WNhdGUxGzAZBgNVBAMMEkxBIEludGVybWVkaWF0ZSBDQTBZMBMGByqGSM49AgEG
 CCqGSM49AwEHA0IABJf+aA54RC5pyLAR5yfXVYmNpgd+CGUTDp2KOGhc0gK91zx
 hHesEYkdXkpS2UN8Kati+yHtWCV3kkhCngGyv7RqjZjBkMB0GA1UdDgQWBBRm3W
 jLa38lbEYCuiCPct0ZaSED2DAfBgNVHSMEGDAWgBTEA2Q6eecKu9g9yb5glbkhh
 VINGDASBgNVHRMBAf8ECDAGAQH/AgEAMA4GA1UdDwEB/wQEAwIBhjAKBggqhkjO
 PQQDAgNJADBGAiEA5pLvaFwRRkxomIAtDIwg9D7gC1xzxBl4r28EzmSO1pcCIQC
 JUShpSXO9HDIQMUgH69fNDEMHXD3RRX5gP7kuu2KGMg==:, :MIICBjCCAaygAw
 IBAgIJAKS0yiqKtlhoMAoGCCqGSM49BAMCMFYxCzAJBgNVBAYTAlVTMRswGQYDV
 QQKDBJMZXQncyBBdXRoZW50aWNhdGUxKjAoBgNVBAMMIUxldCdzIEF1dGhlbnRp
 Y2F0ZSBSb290IEF1dGhvcml0eTAeFw0yMDAxMTQyMTI1NDVaFw00MDAxMDkyMTI
 1NDVaMFYxCzAJBgNVBAYTAlVTMRswGQYDVQQKDBJMZXQncyBBdXRoZW50aWNhdG
 UxKjAoBgNVBAMMIUxldCdzIEF1dGhlbnRpY2F0ZSBSb290IEF1dGhvcml0eTBZM
 BMGByqGSM49AgEGCCqGSM49AwEHA0IABFoaHU+Z5bPKmGzlYXtCf+E6HYj62fOR
 aHDOrt+yyh3H/rTcs7ynFfGn+gyFsrSP3Ez88rajv+U2NfD0o0uZ4PmjYzBhMB0
 GA1UdDgQWBBTEA2Q6eecKu9g9yb5glbkhhVINGDAfBgNVHSMEGDAWgBTEA2Q6ee
 cKu9g9yb5glbkhhVINGDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB/wQEAwIBh
 jAKBggqhkjOPQQDAgNIADBFAiEAmAeg1ycKHriqHnaD4M/UDBpQRpkmdcRFYGMg
 1Qyrkx4CIB4ivz3wQcQkGhcsUZ1SOImd/lq1Q0FLf09rGfLQPWDc:"""


def der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(Encoding.DER)


def undisplay(value: str) -> bytes:
    """The RFC's display form back to the field value: its added line breaks and indentation removed (the one
    real space, after the List's comma, comes back with them: RFC 8941 §4.1.1 puts it there)."""
    return re.sub(r"\n ", "", value).replace(":,:", ":, :").encode()


def test_rfc9440_appendix_a_client_cert() -> None:
    assert byte_sequence(der(RFC9440_LEAF)) == undisplay(RFC9440_CLIENT_CERT)


def test_rfc9440_appendix_a_client_cert_chain() -> None:
    chain = [der(RFC9440_INTERMEDIATE), der(RFC9440_ROOT)]
    assert byte_sequence_list(chain) == undisplay(RFC9440_CLIENT_CERT_CHAIN)


def test_rfc9440_appendix_a_our_chain_drops_the_anchor() -> None:
    # The example's client sent leaf + intermediate; OpenSSL's verified chain ends in the root the proxy trusts.
    leaf, inter, root = der(RFC9440_LEAF), der(RFC9440_INTERMEDIATE), der(RFC9440_ROOT)
    chain = sent_intermediates([leaf, inter], [leaf, inter, root])
    assert chain == (inter,)
    assert byte_sequence_list(chain) == undisplay(RFC9440_CLIENT_CERT_CHAIN).split(b", ")[0]


# ---- RFC 8941 serialisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("data, expected", [
    (b"", b"::"),  # RFC 8941 §3.3.5: a zero-length Byte Sequence is valid
    (b"\x00", b":AA==:"),  # padding is kept (§4.1.8: base64 per RFC 4648 §4)
    (b"\xfb\xff", b":+/8=:"),  # the standard alphabet, not base64url
    (b"pretend this is binary content.", b":cHJldGVuZCB0aGlzIGlzIGJpbmFyeSBjb250ZW50Lg==:"),  # RFC 8941 §3.3.5
], ids=["empty", "padding", "standard-alphabet", "rfc8941-example"])
def test_byte_sequence(data: bytes, expected: bytes) -> None:
    assert byte_sequence(data) == expected


@pytest.mark.parametrize("items, expected", [
    ([], b""),
    ([b"a"], b":YQ==:"),
    ([b"a", b"bc", b"def"], b":YQ==:, :YmM=:, :ZGVm:"),
], ids=["empty-list-not-serialised", "one", "three"])
def test_byte_sequence_list(items: list[bytes], expected: bytes) -> None:
    assert byte_sequence_list(items) == expected


@given(st.lists(st.binary(max_size=64), max_size=5))
def test_byte_sequence_list_round_trips(items: list[bytes]) -> None:
    """What a strict RFC 8941 parser would read back: the members, in order, byte-exact."""
    value = byte_sequence_list(items)
    assert re.fullmatch(rb"(?::[A-Za-z0-9+/=]*:(?:, :[A-Za-z0-9+/=]*:)*)?", value)
    decoded = [base64.b64decode(m[1:-1], validate=True) for m in value.split(b", ")] if value else []
    assert decoded == items


# ---- RFC 8705 x5t#S256 ----------------------------------------------------------------------------------------
def test_x5t_s256_matches_an_independent_computation() -> None:
    leaf = der(RFC9440_LEAF)
    digest = hashlib.sha256(leaf).digest()
    expected = base64.b64encode(digest).decode().replace("+", "-").replace("/", "_").rstrip("=")
    assert x5t_s256(leaf) == expected
    assert x5t_s256_of_digest(digest) == expected
    assert len(expected) == 43 and "=" not in expected  # 32 bytes -> 43 base64url characters, no padding


@pytest.mark.parametrize("digest, expected", [
    (bytes(32), "A" * 43),
    (b"\xff" * 32, "_" * 42 + "8"),  # base64url: '_' where base64 has '/' ...
    (b"\xfb\xef\xbe" * 10 + b"\xfb\xef", "-" * 42 + "8"),  # ... and '-' where it has '+' (sextets of 62)
], ids=["zeros", "url-safe-slash", "url-safe-plus"])
def test_x5t_s256_alphabet(digest: bytes, expected: str) -> None:
    assert x5t_s256_of_digest(digest) == expected


def test_x5t_s256_rejects_a_digest_of_the_wrong_size() -> None:
    with pytest.raises(ValueError):
        x5t_s256_of_digest(bytes(20))  # a SHA-1 digest: x5t, not x5t#S256


# ---- which certificates Client-Cert-Chain carries -------------------------------------------------------------
L, I1, I2, ROOT, JUNK = b"leaf", b"inter-1", b"inter-2", b"root", b"unrelated"


@pytest.mark.parametrize("sent, verified, expected", [
    ([L, I1], [L, I1, ROOT], (I1,)),  # the usual case
    ([L, I1, I2], [L, I1, I2, ROOT], (I1, I2)),  # two intermediates, nearest the leaf first
    ([L, I2, I1], [L, I1, I2, ROOT], (I1, I2)),  # sent out of order (TLS 1.3 tolerates it): validation order
    ([L, I1, ROOT], [L, I1, ROOT], (I1,)),  # the client also sent the anchor: not forwarded
    ([L, I1, JUNK], [L, I1, ROOT], (I1,)),  # a certificate validation did not use: not forwarded
    ([L], [L, I1, ROOT], ()),  # the intermediate came from the proxy's own client_ca, not from the client
    ([L], [L, ROOT], ()),  # issued directly by the anchor
    ([L], [L], ()),  # a self-signed partner certificate, its own anchor
    (None, None, None),  # a resumed TLS session: OpenSSL kept neither chain
    ([L, I1], None, None),
], ids=["one", "two", "out-of-order", "anchor-sent", "junk-sent", "from-trust-store", "direct", "self-signed",
        "resumed", "verified-unknown"])
def test_sent_intermediates(sent: list[bytes] | None, verified: list[bytes] | None,
                            expected: tuple[bytes, ...] | None) -> None:
    assert sent_intermediates(sent, verified) == expected


# ---- header lines ----------------------------------------------------------------------------------------------
def test_rfc9440_lines() -> None:
    leaf, inter = der(RFC9440_LEAF), der(RFC9440_INTERMEDIATE)
    assert rfc9440_lines(leaf, ()) == b"Client-Cert: " + undisplay(RFC9440_CLIENT_CERT) + b"\r\n"
    both = rfc9440_lines(leaf, (inter,))
    first, second, end = both.split(b"\r\n")
    assert end == b"" and first == b"Client-Cert: " + undisplay(RFC9440_CLIENT_CERT)
    assert second == b"Client-Cert-Chain: " + byte_sequence(inter)


def test_client_cert_names_are_lowercase_field_names() -> None:
    assert CLIENT_CERT_NAMES == {b"client-cert", b"client-cert-chain", b"x-client-cert-thumbprint"}
    for line in rfc9440_lines(b"x", (b"y",)).split(b"\r\n")[:-1]:
        assert line.split(b":")[0].lower() in CLIENT_CERT_NAMES
