"""End-to-end: certificate-bound identity for the API — RFC 9440 ``Client-Cert`` / ``Client-Cert-Chain`` and the
RFC 8705 ``X-Client-Cert-Thumbprint``, through the real ``python -m proxy serve`` and the API Gateway stand-in
(the demo upstream, which echoes every header it received).

Owns: the field values decoding to exactly the DER the client was given (leaf, and the intermediate it sent);
which certificates the chain carries (not the anchor, not a certificate validation did not use); the same values
on a resumed TLS session; the thumbprint against an independent hashlib computation; every client-sent copy
removed whatever the setting; and the 431 ``identity_too_large`` refusal, never forwarded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tests.e2e.kit import CountingUpstream, Echo, Ops, echo_of
from tests.harness import ProxyProcess, RawClient, client_ctx, get
from tests.pki import Pki

CLOSE = b"Connection: close\r\n"
ON = {"client_cert_header": True}
SPOOFS = (b"Client-Cert: :AAAA:\r\nclient_cert: :AAAA:\r\nCLIENT-CERT-CHAIN: :AAAA:\r\nclient_cert_chain: :AAAA:\r\n"
          b"X-Client-Cert-Thumbprint: forged\r\nx_client_cert_thumbprint: forged\r\n")


def byte_sequence(value: str) -> bytes:
    """A strict RFC 8941 §4.2.7 Byte Sequence parser: ``:base64:``, standard alphabet, padding required."""
    assert value.startswith(":") and value.endswith(":") and len(value) >= 2, value
    inner = value[1:-1]
    assert len(inner) % 4 == 0, value
    return base64.b64decode(inner, validate=True)


def byte_sequences(value: str) -> list[bytes]:
    """RFC 8941 List of Byte Sequences (members separated by "," and optional spaces)."""
    return [byte_sequence(member.strip(" ")) for member in value.split(",")]


def sent_chain(path: Path) -> list[bytes]:
    """The DER certificates in a client's certificate file, leaf first: exactly what the client sends."""
    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(path.read_bytes())]


async def spawn(ops: Ops, upstream: CountingUpstream, identity: dict[str, object] | None = None,
                **sections: object) -> ProxyProcess:
    return await ops.spawn(ops.config(upstream.port, top={"allow_all_verified": True}, rules=[], identity=identity,
                                      **sections))


async def echo(ops: Ops, proc: ProxyProcess, name: str = "good", extra: bytes = b"",
               ctx: ssl.SSLContext | None = None) -> Echo:
    c = await ops.client(proc.port, name) if ctx is None else await RawClient.connect(proc.port, ctx)
    resp = await c.request(get("/id", extra=extra + CLOSE))
    await c.close()
    assert resp.status == 200, resp.body
    return echo_of(resp.body)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_client_cert_and_chain_decode_to_the_clients_der(pki: Pki, ops: Ops, auth_upstream: CountingUpstream,
                                                             tls: str) -> None:
    proc = await spawn(ops, auth_upstream, ON, server={"tls_versions": [tls]})
    client = pki.clients["via_intermediate"]
    leaf, *intermediates = sent_chain(client.cert)
    assert leaf == client.der and len(intermediates) == 1  # the client sends leaf + intermediate
    got = await echo(ops, proc, "via_intermediate")
    assert byte_sequence(got.one("Client-Cert")) == client.der
    assert byte_sequences(got.one("Client-Cert-Chain")) == intermediates


async def test_no_chain_field_without_sent_intermediates(pki: Pki, ops: Ops, auth_upstream: CountingUpstream) -> None:
    proc = await spawn(ops, auth_upstream, ON)
    for name in ("good", "self_signed"):  # issued by the anchor; its own anchor
        got = await echo(ops, proc, name)
        assert byte_sequence(got.one("Client-Cert")) == pki.clients[name].der
        assert got.all("Client-Cert-Chain") == []


async def test_chain_leaves_out_the_anchor_and_certificates_validation_did_not_use(
        pki: Pki, ops: Ops, auth_upstream: CountingUpstream, tmp_path: Path) -> None:
    proc = await spawn(ops, auth_upstream, ON)
    client = pki.clients["via_intermediate"]
    leaf, intermediate = sent_chain(client.cert)
    bundle = tmp_path / "oversharing.crt"  # leaf, intermediate, an unrelated CA, and the root the proxy trusts
    bundle.write_bytes(client.cert.read_bytes() + pki.other_client_ca.read_bytes() + pki.client_ca_only.read_bytes())
    ctx = pki.client_context(None)
    ctx.load_cert_chain(bundle, client.key)
    got = await echo(ops, proc, ctx=ctx)
    assert byte_sequence(got.one("Client-Cert")) == leaf
    assert byte_sequences(got.one("Client-Cert-Chain")) == [intermediate]


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_a_resumed_session_sends_the_same_fields(pki: Pki, ops: Ops, auth_upstream: CountingUpstream,
                                                       tls: str) -> None:
    """OpenSSL keeps no chain in a resumed session; the proxy must not drop Client-Cert-Chain there."""
    proc = await spawn(ops, auth_upstream, ON, server={"tls_versions": [tls]})
    ctx = client_ctx(pki, "via_intermediate")

    def two_connections() -> list[tuple[bool, bytes]]:
        out, session = [], None
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as raw:
                with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls_sock:
                    tls_sock.sendall(get("/id", extra=CLOSE))
                    data = b""
                    while chunk := tls_sock.recv(65536):
                        data += chunk
                    out.append((tls_sock.session_reused, data))
                    session = tls_sock.session
        return out

    (first_reused, first), (second_reused, second) = await asyncio.to_thread(two_connections)
    assert not first_reused and second_reused  # the second handshake really was a resumption
    bodies = [echo_of(raw.split(b"\r\n\r\n", 1)[1]) for raw in (first, second)]
    client = pki.clients["via_intermediate"]
    for got in bodies:
        assert byte_sequence(got.one("Client-Cert")) == client.der
        assert byte_sequences(got.one("Client-Cert-Chain")) == sent_chain(client.cert)[1:]


@pytest.mark.parametrize("name", ["good", "rsa", "via_intermediate", "self_signed"])
async def test_thumbprint_matches_an_independent_computation(pki: Pki, ops: Ops, auth_upstream: CountingUpstream,
                                                            name: str) -> None:
    proc = await spawn(ops, auth_upstream)  # sent by default: it needs no setting
    got = await echo(ops, proc, name)
    der = x509.load_pem_x509_certificates(pki.clients[name].cert.read_bytes())[0].public_bytes(Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert got.one("X-Client-Cert-Thumbprint") == expected
    assert got.all("Client-Cert") == [] and got.all("Client-Cert-Chain") == []  # off unless configured


@pytest.mark.parametrize("setting", [None, ON], ids=["default", "client_cert_header"])
async def test_spoofed_fields_are_removed(pki: Pki, ops: Ops, auth_upstream: CountingUpstream,
                                          setting: dict[str, object] | None) -> None:
    proc = await spawn(ops, auth_upstream, setting)
    got = await echo(ops, proc, "good", extra=SPOOFS)
    names = [k.lower().replace("_", "-") for k, _ in got.headers]
    assert names.count("x-client-cert-thumbprint") == 1
    assert got.one("X-Client-Cert-Thumbprint") != "forged"
    expected_cert = 1 if setting else 0
    assert names.count("client-cert") == expected_cert and names.count("client-cert-chain") == 0
    if setting:
        assert byte_sequence(got.one("Client-Cert")) == pki.clients["good"].der
    assert "forged" not in json.dumps(got.headers) and ":AAAA:" not in json.dumps(got.headers)


def padded(total: int, pieces: int = 4) -> bytes:
    """A GET whose own head is exactly ``total`` bytes (padding split over several lines: the stand-in,
    aiohttp, refuses a single line over 8190 bytes)."""
    base = get("/pad", extra=CLOSE)
    room = total - len(base) - pieces * len(b"X-Pad-0: \r\n")
    assert room > 0
    lines = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * (room // pieces + (i < room % pieces)))
                     for i in range(pieces))
    request = base[:-2] + lines + b"\r\n"
    assert len(request) == total
    return request


async def test_certificate_headers_over_the_gateway_limit_are_refused_not_forwarded(
        pki: Pki, ops: Ops, auth_upstream: CountingUpstream) -> None:
    proc = await spawn(ops, auth_upstream, ON)
    c = await ops.client(proc.port, "via_intermediate")
    fits = await c.request(padded(2000, pieces=1))  # with the certificate fields well under 10,240 bytes
    assert fits.status == 200
    await c.close()
    seen = len(auth_upstream.requests)
    c = await ops.client(proc.port, "via_intermediate")
    resp = await c.request(padded(9800))  # fits alone; the certificate fields push it over
    body = resp.json()
    assert resp.status == 431 and body["error"] == "identity_too_large", resp.body
    assert "10240" in body["message"]
    assert len(auth_upstream.requests) == seen  # never forwarded, never truncated
    await c.close()
    c = await ops.client(proc.port, "via_intermediate")
    too_big_anyway = await c.request(padded(12000))  # over the limit on its own: left to the gateway, as before
    assert too_big_anyway.status == 200
    await c.close()
