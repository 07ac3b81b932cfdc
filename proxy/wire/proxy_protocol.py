"""Sans-IO parser (and a small encoder) for the binary PROXY protocol v2 header that an AWS NLB sends.

Owns: the wire format of HAProxy's PROXY protocol v2 (proxy-protocol.txt, section 2.2) as the NLB uses it:
validating the 16-byte prefix and saying how many bytes follow (``remaining_length``), turning one complete
header into a frozen ``ProxyInfo`` (``parse``), strict validation of the AWS VPC endpoint id TLV, and an encoder
(``build``) for tests and benchmarks.

Must not: do IO, read past the header, look at what follows it, log, or raise anything but
``ProxyProtocolError`` from ``remaining_length``/``parse`` for any bytes.  The IO shell reads exactly
``PREFIX_LEN`` bytes, asks ``remaining_length``, reads exactly that many more, calls ``parse`` on the
concatenation, and only then starts TLS on the same socket.  Only that first header is trusted: a client
can send PROXY bytes of its own after it, and those belong to the TLS stream, not to us.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MAX_HEADER",
    "PREFIX_LEN",
    "REASONS",
    "SIGNATURE",
    "VPCE_ID",
    "ProxyInfo",
    "ProxyProtocolError",
    "build",
    "parse",
    "remaining_length",
]

# Section 2.2: the 12-byte signature, chosen so it can never start a valid v1 line, HTTP request or TLS record.
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PREFIX_LEN = 16
# The NLB's header is ~100 bytes (addresses + CRC32C + VPCE id + NOOP padding); 1 KiB leaves room for future
# TLVs while bounding what an unauthenticated peer can make us buffer before TLS starts.
MAX_HEADER = PREFIX_LEN + 1024

REASONS = frozenset(
    {
        "not_proxy",
        "v1",
        "bad_version",
        "bad_command",
        "bad_family",
        "oversized",
        "truncated",
        "bad_address",
        "bad_tlv",
        "bad_vpce",
    }
)

_V1_PREFIX = b"PROXY "  # section 2.1: a v1 header starts with these 6 US-ASCII bytes
_VERSION_2 = 0x2
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_TRANSPORT_UNSPEC, _TRANSPORT_STREAM, _TRANSPORT_DGRAM = 0x0, 0x1, 0x2
# Section 2.2: address block sizes per family (UNSPEC carries none).
_ADDRESS_LEN = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}

# Section 2.2.1: TLV types we give meaning to; everything else is kept raw in ProxyInfo.tlvs.
PP2_TYPE_NOOP = 0x04
PP2_TYPE_AWS = 0xEA  # AWS ELB docs, "Proxy protocol" -> "VPC endpoint ID"
PP2_SUBTYPE_AWS_VPCE_ID = 0x01
# The shape of a VPC endpoint id (``vpce-`` and up to 32 lowercase hex digits; AWS issues 17 today).  The one
# definition: the id goes into an upstream header and into logs, and allow rules compare against it, so the
# config and the policy check rule values with this same pattern.  fullmatch, so no trailing newline sneaks past.
VPCE_ID = "vpce-[0-9a-f]{1,32}"
_VPCE_RE = re.compile(VPCE_ID.encode("ascii"))

_PREFIX = struct.Struct("!12sBBH")
_TLV_HEAD = struct.Struct("!BH")


class ProxyProtocolError(ValueError):
    """The bytes are not one acceptable PROXY v2 header; ``reason`` is a short code from ``REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:  # a typo here would silently create a new metric label
            raise AssertionError(f"unknown PROXY protocol error reason {reason!r}")
        super().__init__(reason, detail)  # both in args, so the error survives pickling to another process
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """What the first PROXY header of a connection says."""

    local: bool  # LOCAL command (NLB health checks): use the real socket endpoints
    src_addr: str | None  # None for LOCAL, UNSPEC and UNIX
    src_port: int | None
    dst_addr: str | None
    dst_port: int | None
    vpce_id: str | None  # AWS PrivateLink endpoint id, validated against VPCE_ID
    tlvs: tuple[tuple[int, bytes], ...]  # every TLV in wire order, raw (LOCAL: always empty)


def remaining_length(prefix: bytes, max_header: int = MAX_HEADER) -> int:
    """Validate exactly the first ``PREFIX_LEN`` bytes and return how many more bytes the header has.

    Raises ``ProxyProtocolError`` with reason ``truncated`` (fewer than 16 bytes), ``oversized`` (more than 16
    bytes given, or the announced total exceeds ``max_header``), ``v1``, ``not_proxy``, ``bad_version``,
    ``bad_command`` or ``bad_family``.  Checked before the rest is read, so a peer cannot make us buffer it.
    """
    prefix = _as_bytes(prefix)
    if len(prefix) < PREFIX_LEN:
        raise ProxyProtocolError("truncated", f"{len(prefix)} of {PREFIX_LEN} prefix bytes")
    if len(prefix) > PREFIX_LEN:
        # Being handed more than the prefix means the caller read past it: refuse rather than guess.
        raise ProxyProtocolError("oversized", f"{len(prefix)} bytes given for the {PREFIX_LEN}-byte prefix")
    signature, ver_cmd, fam, length = _PREFIX.unpack(prefix)
    if signature != SIGNATURE:
        if prefix.startswith(_V1_PREFIX):
            raise ProxyProtocolError("v1", "text PROXY v1 header; only v2 is accepted")
        raise ProxyProtocolError("not_proxy", "no PROXY v2 signature")
    version, command = ver_cmd >> 4, ver_cmd & 0x0F
    if version != _VERSION_2:
        raise ProxyProtocolError("bad_version", f"version {version}")
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError("bad_command", f"command {command}")
    # Section 2.2: with LOCAL the receiver "must discard the protocol block including the family", so the
    # family byte is only validated for PROXY.
    if command == _CMD_PROXY:
        _check_family(fam)
    if PREFIX_LEN + length > max_header:
        raise ProxyProtocolError("oversized", f"header of {PREFIX_LEN + length} bytes, limit {max_header}")
    return length


def _as_bytes(data: bytes) -> bytes:
    # memoryview, not bytes(): bytes(5) would silently be five NULs instead of a TypeError.
    return data if type(data) is bytes else memoryview(data).tobytes()


def _check_family(fam: int) -> None:
    family, transport = fam >> 4, fam & 0x0F
    if family not in _ADDRESS_LEN or transport > _TRANSPORT_DGRAM:
        raise ProxyProtocolError("bad_family", f"family/transport byte {fam:#04x}")
    if transport == _TRANSPORT_DGRAM:
        raise ProxyProtocolError("bad_family", "DGRAM transport: only TCP is proxied")
    if family != _AF_UNSPEC and transport != _TRANSPORT_STREAM:
        # An address without a transport is ambiguous; the NLB always says STREAM for TCP.
        raise ProxyProtocolError("bad_family", f"family {family} without STREAM transport")


def parse(header: bytes, max_header: int = MAX_HEADER) -> ProxyInfo:
    """Parse exactly one complete header: the 16-byte prefix plus exactly the announced length.

    Fewer bytes raise ``truncated``; more bytes raise ``oversized`` (the input is bigger than the header says
    it is: the caller read past the header, which must never happen).  Other reasons: as for
    ``remaining_length``, plus ``bad_address`` (address block longer than the announced length), ``bad_tlv``
    (TLVs do not fill the rest exactly, or an empty AWS TLV) and ``bad_vpce``.  ``header`` must be bytes-like.
    """
    data = _as_bytes(header)
    length = remaining_length(data[:PREFIX_LEN], max_header)
    total = PREFIX_LEN + length
    if len(data) < total:
        raise ProxyProtocolError("truncated", f"{len(data)} of {total} header bytes")
    if len(data) > total:
        raise ProxyProtocolError("oversized", f"{len(data)} bytes given for a {total}-byte header")
    if data[12] & 0x0F == _CMD_LOCAL:
        # Section 2.2: LOCAL (NLB health checks) -- addresses and TLVs are discarded, never trusted.
        return ProxyInfo(True, None, None, None, None, None, ())
    family = data[13] >> 4
    body = memoryview(data)[PREFIX_LEN:]
    addr_len = _ADDRESS_LEN[family]
    if len(body) < addr_len:
        raise ProxyProtocolError("bad_address", f"{len(body)} bytes for a {addr_len}-byte address block")
    src_addr = dst_addr = None
    src_port = dst_port = None
    if family == _AF_INET:
        src_addr = str(ipaddress.IPv4Address(bytes(body[0:4])))
        dst_addr = str(ipaddress.IPv4Address(bytes(body[4:8])))
        src_port, dst_port = struct.unpack_from("!HH", body, 8)
    elif family == _AF_INET6:
        src_addr = str(ipaddress.IPv6Address(bytes(body[0:16])))
        dst_addr = str(ipaddress.IPv6Address(bytes(body[16:32])))
        src_port, dst_port = struct.unpack_from("!HH", body, 32)
    tlvs = _parse_tlvs(body[addr_len:])
    return ProxyInfo(False, src_addr, src_port, dst_addr, dst_port, _vpce_id(tlvs), tlvs)


def _parse_tlvs(block: memoryview) -> tuple[tuple[int, bytes], ...]:
    # Section 2.2.1: TLVs must fill the remainder exactly; a partial TLV means the length field lies.
    tlvs = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < _TLV_HEAD.size:
            raise ProxyProtocolError("bad_tlv", f"{len(block) - offset} stray bytes after the last TLV")
        tlv_type, tlv_len = _TLV_HEAD.unpack_from(block, offset)
        offset += _TLV_HEAD.size
        if tlv_len > len(block) - offset:
            raise ProxyProtocolError("bad_tlv", f"TLV {tlv_type:#04x} of {tlv_len} bytes overruns the header")
        tlvs.append((tlv_type, bytes(block[offset : offset + tlv_len])))
        offset += tlv_len
    return tuple(tlvs)


def _vpce_id(tlvs: tuple[tuple[int, bytes], ...]) -> str | None:
    found: str | None = None
    for tlv_type, value in tlvs:
        if tlv_type != PP2_TYPE_AWS:
            continue  # NOOP (0x04) and all other types: kept raw, no meaning here
        if not value:
            raise ProxyProtocolError("bad_tlv", "AWS TLV without a subtype")
        if value[0] != PP2_SUBTYPE_AWS_VPCE_ID:
            continue  # other AWS subtypes: ignored, as AWS may add some
        if found is not None:
            # Two ids would let whichever one a consumer picks decide the policy: refuse the ambiguity.
            raise ProxyProtocolError("bad_vpce", "more than one VPC endpoint id")
        if _VPCE_RE.fullmatch(value, 1) is None:
            raise ProxyProtocolError("bad_vpce", f"malformed VPC endpoint id {value[1:65]!r}")
        found = value[1:].decode("ascii")
    return found


def build(
    src: tuple[str, int] | None = None,
    dst: tuple[str, int] | None = None,
    *,
    vpce_id: str | None = None,
    local: bool = False,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """Encode one PROXY v2 header (for tests and benchmarks; the proxy itself never sends one).

    ``local=True`` gives LOCAL/UNSPEC as the NLB sends for health checks (src/dst must be None; TLVs are still
    written so tests can show they are discarded).  Otherwise both src and dst give an INET or INET6 STREAM
    header, or both None give PROXY/UNSPEC.  ``vpce_id`` is written as the first TLV (0xEA, subtype 0x01)
    *without* validation, so tests can produce headers the parser must reject; ``tlvs`` follow in order.
    Raises ``ValueError`` for arguments that cannot be encoded.
    """
    if local and (src is not None or dst is not None):
        raise ValueError("a LOCAL header carries no addresses")
    if (src is None) != (dst is None):
        raise ValueError("give both src and dst, or neither")
    body = bytearray()
    fam = (_AF_UNSPEC << 4) | _TRANSPORT_UNSPEC
    if src is not None and dst is not None:
        src_ip, dst_ip = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
        if src_ip.version != dst_ip.version:
            raise ValueError("src and dst must be the same IP version")
        family = _AF_INET if src_ip.version == 4 else _AF_INET6
        fam = (family << 4) | _TRANSPORT_STREAM
        body += src_ip.packed + dst_ip.packed + _pack_ports(src[1], dst[1])
    all_tlvs = list(tlvs)
    if vpce_id is not None:
        all_tlvs.insert(0, (PP2_TYPE_AWS, bytes([PP2_SUBTYPE_AWS_VPCE_ID]) + vpce_id.encode()))
    for tlv_type, value in all_tlvs:
        if not 0 <= tlv_type <= 0xFF or len(value) > 0xFFFF:
            raise ValueError(f"TLV {tlv_type} with {len(value)} bytes cannot be encoded")
        body += _TLV_HEAD.pack(tlv_type, len(value)) + bytes(value)
    if len(body) > 0xFFFF:
        raise ValueError(f"header body of {len(body)} bytes exceeds the 16-bit length field")
    command = _CMD_LOCAL if local else _CMD_PROXY
    return _PREFIX.pack(SIGNATURE, (_VERSION_2 << 4) | command, fam, len(body)) + bytes(body)


def _pack_ports(src_port: int, dst_port: int) -> bytes:
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
        raise ValueError(f"ports {src_port}, {dst_port} out of range")
    return struct.pack("!HH", src_port, dst_port)
