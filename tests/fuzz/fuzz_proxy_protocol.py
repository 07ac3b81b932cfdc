"""Coverage-guided fuzz target for ``proxy.wire.proxy_protocol`` (atheris / libFuzzer).

Owns: the one-input oracle ``fuzz_one_input`` -- parse never raises anything but ProxyProtocolError with a
known reason, ``parse`` and ``remaining_length`` agree, and every accepted header re-encodes to the same bytes
and stops being accepted with one byte more or less -- plus the libFuzzer entry point.

Must not: be collected by pytest (the name does not start with ``test_``); need atheris when imported, so
``tests/test_proxy_protocol.py`` can replay the seed corpus through ``fuzz_one_input`` without it.

Run:  .venv/bin/python tests/fuzz/fuzz_proxy_protocol.py -max_total_time=20
Without a corpus directory argument the seeds in corpus_proxy_protocol/ are used read-only (-seed_inputs),
so a run never writes into the repository; crashes land in the current directory as crash-<sha1>.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus_proxy_protocol"
# Restated from the spec rather than imported, so the oracle does not share the parser's mistakes.
_VPCE = re.compile(r"vpce-[0-9a-f]{1,32}")
_ADDRESS_LEN = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}  # proxy-protocol.txt 2.2: UNSPEC, INET, INET6, UNIX

if __name__ == "__main__":
    # atheris instruments bytecode at import time, so the module under test must be imported inside the hook.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import atheris

    with atheris.instrument_imports(include=["proxy"]):
        from proxy.wire import proxy_protocol as pp
else:
    from proxy.wire import proxy_protocol as pp


def fuzz_one_input(data: bytes) -> None:
    """Check every invariant of the parser on one input; an AssertionError (or any other error) is a finding."""
    try:
        length = pp.remaining_length(data[: pp.PREFIX_LEN])
        prefix_reason = None
    except pp.ProxyProtocolError as exc:
        prefix_reason = exc.reason
    try:
        info = pp.parse(data)
    except pp.ProxyProtocolError as exc:
        assert exc.reason in pp.REASONS, exc.reason
        # A prefix the IO shell would already have refused must be refused by parse for the same reason.
        assert prefix_reason is None or exc.reason == prefix_reason, (prefix_reason, exc.reason)
        return
    assert prefix_reason is None, prefix_reason
    assert len(data) == pp.PREFIX_LEN + length
    _check_accepted(data, info)


def _check_accepted(data: bytes, info: pp.ProxyInfo) -> None:
    assert info.local == (data[12] == 0x20)
    if info.local:
        assert info == pp.ProxyInfo(True, None, None, None, None, None, ())
    if info.vpce_id is not None:
        assert _VPCE.fullmatch(info.vpce_id), info.vpce_id
    fam = data[13]
    if not info.local and fam in (0x00, 0x11, 0x21):
        src = None if info.src_addr is None else (info.src_addr, info.src_port)
        dst = None if info.dst_addr is None else (info.dst_addr, info.dst_port)
        assert pp.build(src, dst, tlvs=info.tlvs) == data
    elif not info.local:
        assert info.src_addr is info.dst_addr is info.src_port is info.dst_port is None
        tlv_bytes = sum(3 + len(value) for _, value in info.tlvs)
        assert tlv_bytes == len(data) - pp.PREFIX_LEN - _ADDRESS_LEN[fam >> 4]
    # Exactly one header from exactly its bytes: one byte more or less is never accepted.
    for wrong, reason in ((data + b"\x16", "oversized"), (data[:-1], "truncated")):
        try:
            pp.parse(wrong)
        except pp.ProxyProtocolError as exc:
            assert exc.reason == reason, (reason, exc.reason)
        else:
            raise AssertionError(f"accepted {len(wrong)} bytes for a {len(data)}-byte header")


def main(argv: list[str]) -> None:
    args = list(argv)
    if not any(not arg.startswith("-") for arg in args[1:]):
        seeds = sorted(str(path) for path in CORPUS_DIR.iterdir() if path.is_file())
        args.append("-seed_inputs=" + ",".join(seeds))
    atheris.Setup(args, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
