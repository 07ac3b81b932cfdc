"""Tests for proxy.wire.proxy_protocol: byte tables for every accepted form and every error reason, the real AWS NLB
example header, exact consumption before a real TLS ClientHello, hypothesis properties, and a replay of the
fuzz seed corpus through the atheris target's one-input function."""

from __future__ import annotations

import io
import pickle
import ssl
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.wire import proxy_protocol as pp
from proxy.wire.proxy_protocol import MAX_HEADER, PREFIX_LEN, SIGNATURE, ProxyInfo, ProxyProtocolError, build, parse
from proxy.wire.proxy_protocol import remaining_length
from tests.fuzz import fuzz_proxy_protocol

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # proxy-protocol.txt 2.2, spelled out independently
VPCE = b"vpce-08d2bf15fac5001c9"
IPV4_ADDRS = bytes([203, 0, 113, 7, 10, 0, 0, 5]) + struct.pack("!HH", 51234, 8443)
IPV6_ADDRS = (
    bytes.fromhex("20010db8000000000000000000000007")
    + bytes.fromhex("20010db8000000000000000000000005")
    + struct.pack("!HH", 51234, 8443)
)

# The NLB/PrivateLink header from AWS's own compatibility test (aws/elastic-load-balancing-tools, proprot
# Compatibility_AwsNetworkLoadBalancerTest.java, as reproduced in pires/go-proxyproto's TestParseV2TLV):
# PROXY TCP4 172.31.7.113:51442 -> 172.31.10.31:80, CRC32C TLV, AWS VPCE TLV, 36-byte NOOP padding.
NLB_EXAMPLE = (
    SIG
    + bytes.fromhex("21110054")  # v2 PROXY, INET STREAM, 84 bytes follow
    + bytes.fromhex("ac1f0771 ac1f0a1f c8f2 0050")  # 172.31.7.113 172.31.10.31 51442 80
    + bytes.fromhex("030004 e8d6892d")  # PP2_TYPE_CRC32C
    + bytes.fromhex("ea0017 01") + VPCE  # PP2_TYPE_AWS, subtype VPCE id
    + bytes.fromhex("040024") + bytes(36)  # PP2_TYPE_NOOP
)


def tlv(tlv_type: int, value: bytes) -> bytes:
    return struct.pack("!BH", tlv_type, len(value)) + value


def raw(ver_cmd: int, fam: int, body: bytes = b"", length: int | None = None) -> bytes:
    """A header written by hand, with an optional lying length field."""
    return SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body) if length is None else length) + body


def info(src=None, sport=None, dst=None, dport=None, vpce=None, tlvs=()) -> ProxyInfo:
    return ProxyInfo(False, src, sport, dst, dport, vpce, tuple(tlvs))


LOCAL = ProxyInfo(True, None, None, None, None, None, ())
AWS_TLV = (0xEA, b"\x01" + VPCE)

ACCEPTED = {
    "ipv4": (raw(0x21, 0x11, IPV4_ADDRS), info("203.0.113.7", 51234, "10.0.0.5", 8443)),
    "ipv4_vpce": (
        raw(0x21, 0x11, IPV4_ADDRS + tlv(*AWS_TLV)),
        info("203.0.113.7", 51234, "10.0.0.5", 8443, VPCE.decode(), [AWS_TLV]),
    ),
    "ipv6": (raw(0x21, 0x21, IPV6_ADDRS), info("2001:db8::7", 51234, "2001:db8::5", 8443)),
    "ipv6_vpce_noop": (
        raw(0x21, 0x21, IPV6_ADDRS + tlv(0x04, bytes(5)) + tlv(*AWS_TLV)),
        info("2001:db8::7", 51234, "2001:db8::5", 8443, VPCE.decode(), [(0x04, bytes(5)), AWS_TLV]),
    ),
    "ipv4_mapped_ipv6": (
        raw(0x21, 0x21, bytes.fromhex("00000000000000000000ffffcb007107") + bytes(16) + bytes(4)),
        info("::ffff:cb00:7107", 0, "::", 0),
    ),
    "nlb_aws_example": (
        NLB_EXAMPLE,
        info(
            "172.31.7.113", 51442, "172.31.10.31", 80, VPCE.decode(),
            [(0x03, bytes.fromhex("e8d6892d")), AWS_TLV, (0x04, bytes(36))],
        ),
    ),
    "noop_empty": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0x04, b"")), info("203.0.113.7", 51234, "10.0.0.5", 8443,
                                                                        tlvs=[(0x04, b"")])),
    "other_aws_subtype_ignored": (
        raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x02anything\xff") + tlv(0xEA, b"\x03")),
        info("203.0.113.7", 51234, "10.0.0.5", 8443, None, [(0xEA, b"\x02anything\xff"), (0xEA, b"\x03")]),
    ),
    "vpce_and_other_aws_subtype": (
        raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x02x") + tlv(*AWS_TLV)),
        info("203.0.113.7", 51234, "10.0.0.5", 8443, VPCE.decode(), [(0xEA, b"\x02x"), AWS_TLV]),
    ),
    "vpce_longest": (
        raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-" + b"f" * 32)),
        info("203.0.113.7", 51234, "10.0.0.5", 8443, "vpce-" + "f" * 32, [(0xEA, b"\x01vpce-" + b"f" * 32)]),
    ),
    "unknown_tlvs_kept_raw": (
        raw(0x21, 0x11, IPV4_ADDRS + tlv(0x01, b"h2") + tlv(0x20, b"\x07\0\0\0\0") + tlv(0xE0, b"")),
        info("203.0.113.7", 51234, "10.0.0.5", 8443, None, [(0x01, b"h2"), (0x20, b"\x07\0\0\0\0"), (0xE0, b"")]),
    ),
    "unspec_proxy": (raw(0x21, 0x00), info()),
    "unspec_proxy_stream_with_vpce": (raw(0x21, 0x01, tlv(*AWS_TLV)), info(vpce=VPCE.decode(), tlvs=[AWS_TLV])),
    "unix_stream": (raw(0x21, 0x31, bytes(216) + tlv(0x04, b"")), info(tlvs=[(0x04, b"")])),
    # Health checks: the NLB sends LOCAL with family UNSPEC and nothing after the prefix.
    "local_nlb_health_check": (raw(0x20, 0x00), LOCAL),
    # LOCAL: "discard the protocol block including the family" (2.2) -- even ones we would refuse for PROXY.
    "local_with_ipv4_and_tlvs": (raw(0x20, 0x11, IPV4_ADDRS + tlv(*AWS_TLV)), LOCAL),
    "local_with_garbage_block": (raw(0x20, 0x11, b"\xff\xff"), LOCAL),
    "local_with_bad_vpce_discarded": (raw(0x20, 0x00, tlv(0xEA, b"\x01NOT-A-VPCE")), LOCAL),
    "local_dgram": (raw(0x20, 0x12, IPV4_ADDRS), LOCAL),
    "local_unknown_family": (raw(0x20, 0xFF), LOCAL),
}


@pytest.mark.parametrize(("header", "expected"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted_forms(header: bytes, expected: ProxyInfo) -> None:
    assert remaining_length(header[:PREFIX_LEN]) == len(header) - PREFIX_LEN
    assert parse(header) == expected
    assert parse(bytearray(header)) == expected
    assert parse(memoryview(header)) == expected


def crc32c(data: bytes) -> int:
    """Bitwise CRC32C (Castagnoli, reflected 0x82F63B78), only to prove NLB_EXAMPLE was copied exactly."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_nlb_example_is_the_real_bytes_and_build_reproduces_it() -> None:
    # 2.2.1 PP2_TYPE_CRC32C: checksum of the whole header with the CRC field zeroed; the value is stored BE.
    zeroed = NLB_EXAMPLE[:31] + bytes(4) + NLB_EXAMPLE[35:]  # value at 16 + 12 + 3
    assert crc32c(zeroed) == int.from_bytes(NLB_EXAMPLE[31:35], "big")
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value
    rebuilt = build(("172.31.7.113", 51442), ("172.31.10.31", 80), tlvs=parse(NLB_EXAMPLE).tlvs)
    assert rebuilt == NLB_EXAMPLE


def test_signature_constants() -> None:
    assert SIGNATURE == SIG
    assert (PREFIX_LEN, MAX_HEADER) == (16, 1040)


def test_build_bytes_are_exact() -> None:
    assert build(("203.0.113.7", 51234), ("10.0.0.5", 8443), vpce_id="vpce-0abc") == (
        SIG + bytes.fromhex("21110019") + IPV4_ADDRS + bytes.fromhex("ea000a01") + b"vpce-0abc"
    )
    assert build(local=True) == SIG + bytes.fromhex("20000000")
    assert build() == SIG + bytes.fromhex("21000000")
    assert build(("2001:db8::7", 51234), ("2001:db8::5", 8443)) == raw(0x21, 0x21, IPV6_ADDRS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"src": ("10.0.0.1", 1)}, "both"),
        ({"src": ("10.0.0.1", 1), "dst": ("::1", 2)}, "same IP version"),
        ({"src": ("10.0.0.1", 70000), "dst": ("10.0.0.2", 2)}, "out of range"),
        ({"local": True, "src": ("10.0.0.1", 1), "dst": ("10.0.0.2", 2)}, "LOCAL"),
        ({"tlvs": [(256, b"")]}, "cannot be encoded"),
        ({"tlvs": [(1, bytes(70000))]}, "cannot be encoded"),
        ({"tlvs": [(1, bytes(40000)), (2, bytes(40000))]}, "16-bit"),
    ],
)
def test_build_rejects_unencodable_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def client_hello() -> bytes:
    """A real TLS ClientHello, as the NLB forwards it right after its PROXY header."""
    outgoing = ssl.MemoryBIO()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="api.test")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


V1_LINE = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8443\r\n"
IPV4 = raw(0x21, 0x11, IPV4_ADDRS)

REJECTED = {
    # not_proxy: anything without the signature
    "tls_client_hello": (client_hello(), "not_proxy"),
    "http_request": (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", "not_proxy"),
    "zeros": (bytes(16), "not_proxy"),
    "signature_last_byte_off": (SIG[:11] + b"\x0b" + IPV4[12:], "not_proxy"),
    "proxy_without_space": (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not_proxy"),
    # v1
    "v1_line": (V1_LINE, "v1"),
    "v1_unknown": (b"PROXY UNKNOWN\r\n\x16\x03\x01", "v1"),
    # bad_version
    "version_1": (raw(0x11, 0x11, IPV4_ADDRS), "bad_version"),
    "version_3": (raw(0x31, 0x11, IPV4_ADDRS), "bad_version"),
    "version_0": (raw(0x01, 0x11, IPV4_ADDRS), "bad_version"),
    # bad_command
    "command_2": (raw(0x22, 0x11, IPV4_ADDRS), "bad_command"),
    "command_f": (raw(0x2F, 0x00), "bad_command"),
    # bad_family (PROXY only)
    "family_4": (raw(0x21, 0x41, IPV4_ADDRS), "bad_family"),
    "transport_3": (raw(0x21, 0x13, IPV4_ADDRS), "bad_family"),
    "ipv4_dgram": (raw(0x21, 0x12, IPV4_ADDRS), "bad_family"),
    "ipv6_dgram": (raw(0x21, 0x22, IPV6_ADDRS), "bad_family"),
    "unspec_dgram": (raw(0x21, 0x02), "bad_family"),
    "ipv4_unspec_transport": (raw(0x21, 0x10, IPV4_ADDRS), "bad_family"),
    "unix_unspec_transport": (raw(0x21, 0x30, bytes(216)), "bad_family"),
    # oversized: announced total over 16 + 1024, refused from the prefix alone (no body needed)
    "announced_1025": (raw(0x21, 0x11, length=1025), "oversized"),
    "announced_65535_local": (raw(0x20, 0x00, length=0xFFFF), "oversized"),
    "trailing_byte": (IPV4 + b"\x16", "oversized"),
    "header_then_client_hello": (IPV4 + client_hello(), "oversized"),
    # truncated
    "empty": (b"", "truncated"),
    "signature_only": (SIG, "truncated"),
    "fifteen_bytes": (IPV4[:15], "truncated"),
    "body_short": (IPV4[:-1], "truncated"),
    "announced_1024_body_missing": (raw(0x21, 0x11, length=1024), "truncated"),
    # bad_address: the address block must fit in the announced length
    "ipv4_11_bytes": (raw(0x21, 0x11, IPV4_ADDRS[:11]), "bad_address"),
    "ipv4_empty": (raw(0x21, 0x11), "bad_address"),
    "ipv6_35_bytes": (raw(0x21, 0x21, IPV6_ADDRS[:35]), "bad_address"),
    "ipv6_with_ipv4_block": (raw(0x21, 0x21, IPV4_ADDRS), "bad_address"),
    "unix_215_bytes": (raw(0x21, 0x31, bytes(215)), "bad_address"),
    # bad_tlv: TLVs must fill the remainder exactly
    "one_stray_byte": (raw(0x21, 0x11, IPV4_ADDRS + b"\x04"), "bad_tlv"),
    "two_stray_bytes": (raw(0x21, 0x11, IPV4_ADDRS + b"\x04\x00"), "bad_tlv"),
    "tlv_overruns": (raw(0x21, 0x11, IPV4_ADDRS + b"\x04\x00\x02\x00"), "bad_tlv"),
    "tlv_then_stray": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0x04, b"") + b"\xea"), "bad_tlv"),
    "aws_tlv_empty": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"")), "bad_tlv"),
    "unspec_garbage": (raw(0x21, 0x00, b"\x01"), "bad_tlv"),
    # bad_vpce: strict vpce-[0-9a-f]{1,32}
    "vpce_uppercase": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-08D2")), "bad_vpce"),
    "vpce_prefix_uppercase": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01VPCE-08d2")), "bad_vpce"),
    "vpce_no_hex": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-")), "bad_vpce"),
    "vpce_33_hex": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-" + b"a" * 33)), "bad_vpce"),
    "vpce_empty": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01")), "bad_vpce"),
    "vpce_trailing_newline": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-0abc\n")), "bad_vpce"),
    "vpce_header_injection": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-0abc\r\nx: y")), "bad_vpce"),
    "vpce_nul": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-0abc\x00")), "bad_vpce"),
    "vpce_non_ascii": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, "\x01vpce-0abc\u00e9".encode())), "bad_vpce"),
    "vpce_non_hex_letter": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01vpce-0abg")), "bad_vpce"),
    "vpce_space": (raw(0x21, 0x11, IPV4_ADDRS + tlv(0xEA, b"\x01 vpce-0abc")), "bad_vpce"),
    "vpce_duplicate_same": (raw(0x21, 0x11, IPV4_ADDRS + tlv(*AWS_TLV) + tlv(*AWS_TLV)), "bad_vpce"),
    "vpce_duplicate_different": (
        raw(0x21, 0x11, IPV4_ADDRS + tlv(*AWS_TLV) + tlv(0x04, b"") + tlv(0xEA, b"\x01vpce-1")),
        "bad_vpce",
    ),
}


@pytest.mark.parametrize(("data", "reason"), REJECTED.values(), ids=REJECTED.keys())
def test_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProxyProtocolError) as excinfo:
        parse(data)
    assert excinfo.value.reason == reason
    assert str(excinfo.value).startswith(reason)


def test_every_reason_is_covered_by_the_table() -> None:
    assert {reason for _, reason in REJECTED.values()} == pp.REASONS


PREFIX_REJECTED = {
    "not_proxy": client_hello()[:16],
    "v1": V1_LINE[:16],
    "bad_version": raw(0x11, 0x11, length=12),
    "bad_command": raw(0x22, 0x11, length=12),
    "bad_family": raw(0x21, 0x12, length=12),
    "oversized": raw(0x21, 0x11, length=1025),
    "truncated": IPV4[:15],
}


@pytest.mark.parametrize(("reason", "prefix"), PREFIX_REJECTED.items(), ids=PREFIX_REJECTED.keys())
def test_remaining_length_rejects_from_the_prefix_alone(reason: str, prefix: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as excinfo:
        remaining_length(prefix)
    assert excinfo.value.reason == reason


def test_remaining_length_wants_exactly_the_prefix() -> None:
    with pytest.raises(ProxyProtocolError) as excinfo:
        remaining_length(IPV4)  # the caller read past the prefix
    assert excinfo.value.reason == "oversized"
    assert remaining_length(IPV4[:16]) == 12


@pytest.mark.parametrize(("max_header", "ok"), [(16 + 12, True), (16 + 11, False), (16, False), (0, False)])
def test_max_header_override(max_header: int, ok: bool) -> None:
    if ok:
        assert remaining_length(IPV4[:16], max_header) == 12
        assert parse(IPV4, max_header).src_addr == "203.0.113.7"
        return
    for call in (lambda: remaining_length(IPV4[:16], max_header), lambda: parse(IPV4, max_header)):
        with pytest.raises(ProxyProtocolError) as excinfo:
            call()
        assert excinfo.value.reason == "oversized"


def test_default_max_header_boundary() -> None:
    assert remaining_length(raw(0x21, 0x11, length=1024)) == 1024
    body = IPV4_ADDRS + tlv(0x04, bytes(1024 - 12 - 3))
    assert len(parse(raw(0x21, 0x11, body)).tlvs[0][1]) == 1009


def read_header(stream: io.BufferedReader) -> ProxyInfo:
    """What the IO shell does: exactly 16 bytes, then exactly the announced length, never more."""
    prefix = stream.read(PREFIX_LEN)
    return parse(prefix + stream.read(remaining_length(prefix)))


@pytest.mark.parametrize("header", [NLB_EXAMPLE, IPV4, raw(0x20, 0x00), build(vpce_id="vpce-1")])
def test_exact_consumption_before_client_hello(header: bytes) -> None:
    hello = client_hello()
    # A client may put its own PROXY header inside its stream: it is TLS data, never a second header.
    spoofed = build(("198.51.100.66", 1), ("10.0.0.5", 443), vpce_id="vpce-deadbeef")
    stream = io.BufferedReader(io.BytesIO(header + spoofed + hello))
    assert read_header(stream) == parse(header)
    assert stream.read() == spoofed + hello
    stream = io.BufferedReader(io.BytesIO(header + hello))
    read_header(stream)
    assert stream.read() == hello


def test_client_hello_without_header_is_refused_from_its_first_16_bytes() -> None:
    with pytest.raises(ProxyProtocolError) as excinfo:
        remaining_length(client_hello()[:16])
    assert excinfo.value.reason == "not_proxy"


def test_error_is_a_value_error_with_a_known_reason() -> None:
    assert issubclass(ProxyProtocolError, ValueError)
    with pytest.raises(AssertionError):
        ProxyProtocolError("no_such_reason")
    copy = pickle.loads(pickle.dumps(ProxyProtocolError("bad_vpce", "two ids")))
    assert (copy.reason, copy.detail, str(copy)) == ("bad_vpce", "two ids", "bad_vpce: two ids")
    assert str(ProxyProtocolError("truncated")) == "truncated"


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 0xFFFF)
vpce_ids = st.from_regex(r"vpce-[0-9a-f]{1,32}", fullmatch=True)
# Free TLVs: any type but AWS, plus AWS TLVs of subtypes other than the VPCE id (ignored by the parser).
free_tlvs = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 0xFF).filter(lambda t: t != 0xEA), st.binary(max_size=40)),
        st.tuples(st.just(0xEA), st.binary(min_size=1, max_size=20).filter(lambda v: v[0] != 0x01)),
    ),
    max_size=6,
)


@settings(max_examples=300)
@given(
    family=st.sampled_from(["ipv4", "ipv6", "unspec"]),
    data=st.data(),
    vpce_id=st.none() | vpce_ids,
    tlvs=free_tlvs,
)
def test_build_parse_round_trip(family: str, data: st.DataObject, vpce_id: str | None, tlvs: list) -> None:
    addrs = {"ipv4": ipv4, "ipv6": ipv6}.get(family)
    src = dst = None
    if addrs is not None:
        src, dst = data.draw(st.tuples(addrs, ports)), data.draw(st.tuples(addrs, ports))
    header = build(src, dst, vpce_id=vpce_id, tlvs=tlvs)
    expected_tlvs = ([(0xEA, b"\x01" + vpce_id.encode())] if vpce_id else []) + tlvs
    got = parse(header)
    assert got == ProxyInfo(
        False,
        src and src[0], src and src[1], dst and dst[0], dst and dst[1],
        vpce_id, tuple(expected_tlvs),
    )
    assert remaining_length(header[:PREFIX_LEN]) == len(header) - PREFIX_LEN
    assert parse(build(local=True, tlvs=tlvs)) == ProxyInfo(True, None, None, None, None, None, ())


@settings(max_examples=500)
@given(st.binary(max_size=300) | st.binary(max_size=300).map(lambda tail: SIG + tail))
def test_parse_arbitrary_bytes_only_raises_proxy_protocol_error(data: bytes) -> None:
    for call in (lambda: parse(data), lambda: remaining_length(data[:16]), lambda: parse(data, 20)):
        try:
            call()
        except ProxyProtocolError as exc:
            assert exc.reason in pp.REASONS


@settings(max_examples=300)
@given(header=st.sampled_from(sorted(h for h, _ in ACCEPTED.values())), index=st.data(), byte=st.integers(0, 255))
def test_mutated_headers_only_raise_proxy_protocol_error(header: bytes, index: st.DataObject, byte: int) -> None:
    i = index.draw(st.integers(0, len(header) - 1))
    fuzz_proxy_protocol.fuzz_one_input(header[:i] + bytes([byte]) + header[i + 1 :])


SEEDS = sorted(fuzz_proxy_protocol.CORPUS_DIR.iterdir())


@pytest.mark.parametrize("seed", SEEDS, ids=[p.name for p in SEEDS])
def test_fuzz_target_over_seed_corpus(seed: Path) -> None:
    fuzz_proxy_protocol.fuzz_one_input(seed.read_bytes())


def test_seed_corpus_has_valid_and_invalid_headers() -> None:
    outcomes = {}
    for seed in SEEDS:
        try:
            outcomes[seed.stem] = parse(seed.read_bytes()).vpce_id or "ok"
        except ProxyProtocolError as exc:
            outcomes[seed.stem] = exc.reason
    assert outcomes["nlb_aws_example"] == "vpce-08d2bf15fac5001c9"
    assert outcomes["local_nlb_health_check"] == "ok"
    assert outcomes["tls_client_hello"] == "not_proxy"
    assert outcomes["bad_vpce_uppercase"] == "bad_vpce"
    assert sum(value not in pp.REASONS for value in outcomes.values()) >= 5


@pytest.mark.parametrize("header", [IPV4, NLB_EXAMPLE, raw(0x20, 0x00)])
def test_fuzz_oracle_catches_a_parser_that_reads_past_the_header(
    header: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The oracle must fail if parse ever tolerated trailing bytes (the "trust only the first header" rule).
    real_parse = pp.parse
    monkeypatch.setattr(pp, "parse", lambda data, max_header=MAX_HEADER: real_parse(
        data[: PREFIX_LEN + remaining_length(data[:PREFIX_LEN])] if len(data) >= PREFIX_LEN else data, max_header))
    with pytest.raises(AssertionError, match="accepted"):
        fuzz_proxy_protocol.fuzz_one_input(header)
