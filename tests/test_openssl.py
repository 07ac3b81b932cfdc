"""proxy.openssl, the OpenSSL bridge: which libssl it finds, each capability on this Python, and that a pointer it
cannot prove is never written through.

Effects are checked through OpenSSL itself or through real TLS connections on a socketpair (read-ahead: whole
records wait inside OpenSSL; depth: read back with the library's own getter), never by asking the bridge alone.
"""

from __future__ import annotations

import ctypes
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import _ssl
import pytest

from proxy import openssl, tls
from proxy.errors import ConfigError
from tests.pki import Pki
from tests.test_tls import openssl_session_cache_size, openssl_verify_depth, server_cfg, upstream_cfg


@pytest.fixture
def fresh_bridge() -> Iterator[None]:
    """Forget the cached library handle and symbols around a test that changes what the bridge would find."""
    openssl._lib.cache_clear()
    openssl._fn.cache_clear()
    yield
    openssl._lib.cache_clear()
    openssl._fn.cache_clear()


def mapped_libssl() -> set[str]:
    with open("/proc/self/maps") as fh:
        return {os.path.realpath(line.rsplit(None, 1)[-1]) for line in fh if "/libssl.so" in line}


def server_context(pki: Pki) -> ssl.SSLContext:
    return tls.build_server_context(server_cfg(pki, crl=None))[0]


def tls_pair(pki: Pki, server_ctx: ssl.SSLContext) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """A server and a client SSLSocket over a socketpair, handshake done (blocking sockets, client in a thread)."""
    a, b = socket.socketpair()
    server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False)
    client = pki.client_context(pki.clients["good"]).wrap_socket(b, server_hostname="localhost",
                                                                  do_handshake_on_connect=False)
    t = threading.Thread(target=client.do_handshake)
    t.start()
    server.do_handshake()
    t.join(10)
    return server, client


# ---- finding libssl -------------------------------------------------------------------------------------------


def test_libssl_is_the_one_the_ssl_module_links() -> None:
    path = openssl.libssl_path()
    assert path is not None
    assert os.path.realpath(path) in mapped_libssl()
    # and it is a dependency of the _ssl extension itself, not merely some libssl on the system
    assert Path(_ssl.__file__).exists()


def test_a_builtin_ssl_module_makes_every_capability_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                                 fresh_bridge: None, pki: Pki) -> None:
    monkeypatch.delattr(_ssl, "__file__")
    probed = openssl.probe()
    assert probed.pop("sslobj_io") is None  # plain Python attributes: no libssl needed
    assert all(reason is not None and "built into the interpreter" in reason for reason in probed.values()), probed
    with pytest.raises(ConfigError) as info:  # security: refuse to start, naming the key
        server_context(pki)
    assert info.value.key == "server.verify_depth"
    assert openssl.enable_read_ahead(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)) is False  # fast path: just off


# ---- each capability on this Python ---------------------------------------------------------------------------


def test_every_capability_works_on_this_python() -> None:
    assert openssl.probe() == {cap.name: None for cap in openssl.CAPABILITIES}


def test_the_capability_table() -> None:
    names = [cap.name for cap in openssl.CAPABILITIES]
    assert names == ["verify_depth", "client_ca_names", "client_sigalgs", "read_ahead", "has_pending", "sslobj_io",
                     "session_cache"]
    assert [cap.name for cap in openssl.CAPABILITIES if cap.security] == ["verify_depth", "client_ca_names",
                                                                          "client_sigalgs"]
    assert all(cap.does and cap.without for cap in openssl.CAPABILITIES)


@pytest.mark.parametrize("mode", [ssl.CERT_NONE, ssl.CERT_OPTIONAL, ssl.CERT_REQUIRED])
def test_verify_depth_is_written_and_read_back_for_every_verify_mode(mode: ssl.VerifyMode) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = mode
    openssl.set_verify_depth(ctx, 5)
    assert openssl_verify_depth(ctx) == 5  # read through a libssl handle of the test's own


def test_read_ahead_is_set_and_read_back() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert openssl.read_ahead_enabled(ctx) is False
    assert openssl.enable_read_ahead(ctx) is True
    assert openssl.read_ahead_enabled(ctx) is True


@pytest.mark.parametrize("read_ahead", [True, False])
def test_read_ahead_pulls_every_queued_record_into_openssl(pki: Pki, read_ahead: bool) -> None:
    """Three records in one write: with read-ahead one SSL_read takes all of them off the socket, so two wait in
    OpenSSL (SSL_has_pending says so); without it OpenSSL reads exactly one record and nothing waits."""
    ctx = server_context(pki)  # the proxy's builder turns read-ahead on
    assert openssl.read_ahead_enabled(ctx)
    if not read_ahead:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
    server, client = tls_pair(pki, ctx)
    try:
        pending = openssl.pending_function(server)
        assert pending is not None
        for record in (b"A" * 100, b"B" * 100, b"C" * 100):
            client.sendall(record)  # one TLS record each
        deadline = time.monotonic() + 10
        while _queued(server) < 3 * 100:  # all three records are in the kernel's receive buffer
            assert time.monotonic() < deadline
            time.sleep(0.001)
        assert server.recv(1000) == b"A" * 100
        assert pending() == (1 if read_ahead else 0)
    finally:
        server.close()
        client.close()


def _queued(sock: socket.socket) -> int:
    import fcntl
    import termios

    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(buf, "little")


def test_pending_function_works_on_sockets_and_memory_objects(pki: Pki) -> None:
    server, client = tls_pair(pki, server_context(pki))
    try:
        assert openssl.pending_function(server) is not None
        assert openssl.pending_function(client) is not None
    finally:
        server.close()
        client.close()
    obj = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="x")
    fn = openssl.pending_function(obj)
    assert fn is not None and fn() == 0


def test_sslobj_io_only_for_sockets_that_report_truncation(pki: Pki) -> None:
    server, client = tls_pair(pki, server_context(pki))  # server: suppress_ragged_eofs=False
    try:
        io = openssl.sslobj_io(server)
        assert io is not None
        read, write = io
        assert write(b"ping") == 4
        assert client.recv(10) == b"ping"
        assert openssl.sslobj_io(client) is None  # the default suppress_ragged_eofs=True hides truncation
    finally:
        server.close()
        client.close()


def test_fast_paths_of_the_proxys_own_contexts(pki: Pki) -> None:
    fast = openssl.fast_paths(server_context(pki), tls.build_upstream_context(upstream_cfg()))
    assert fast == {"read_ahead": "on", "has_pending": "on", "sslobj_io": "on", "session_cache": "on"}


def test_fast_paths_name_a_context_without_read_ahead_and_the_fallback(pki: Pki) -> None:
    fast = openssl.fast_paths(server_context(pki), ssl.create_default_context())
    assert fast["read_ahead"] == "off: not set on the upstream context; two read() calls per record"


def test_session_cache_size_is_set_and_read_back() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    assert openssl.session_cache_size(ctx) == openssl_session_cache_size(ctx) == 1024 * 20  # OpenSSL's default
    openssl.set_session_cache_size(ctx)
    assert openssl_session_cache_size(ctx) == openssl.SESSION_CACHE_SIZE == 256
    openssl.set_session_cache_size(ctx, 17)
    assert openssl.session_cache_size(ctx) == openssl_session_cache_size(ctx) == 17


def test_fast_paths_name_a_server_context_without_the_session_cache_limit(pki: Pki) -> None:
    fast = openssl.fast_paths(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), tls.build_upstream_context(upstream_cfg()))
    assert fast["session_cache"] == ("off: not set on the server context; OpenSSL's default cache of up to 20480 "
                                     "sessions per worker (more memory)")


def test_a_session_cache_that_cannot_be_sized_is_a_check_warning_not_a_failure(
        monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    def unavailable(ctx: ssl.SSLContext, size: int = 0) -> None:
        raise openssl.Unavailable("SSL_CTX_ctrl is not exported by the libssl that _ssl uses")

    monkeypatch.setattr(openssl, "set_session_cache_size", unavailable)
    ctx = server_context(pki)  # still built: the limit is a fast path
    assert openssl_session_cache_size(ctx) == 1024 * 20
    assert openssl.probe()["session_cache"] is not None
    fast = openssl.fast_paths(ctx, tls.build_upstream_context(upstream_cfg()))
    assert fast["session_cache"].startswith("off: SSL_CTX_ctrl is not exported")


def test_sslobj_handshake_is_the_c_level_step(pki: Pki) -> None:
    a, b = socket.socketpair()
    with b, server_context(pki).wrap_socket(a, server_side=True, do_handshake_on_connect=False) as sock:
        step = openssl.sslobj_handshake(sock)
        assert step == sock._sslobj.do_handshake  # type: ignore[attr-defined]
        sock.setblocking(False)
        with pytest.raises(ssl.SSLWantReadError):  # nothing from the client yet
            step()


# ---- pointers that cannot be proven are refused, and nothing is written through them ---------------------------


def test_a_forged_context_pointer_is_refused_and_left_untouched(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    forged = ctypes.create_string_buffer(64 * 1024)  # zeroed memory posing as an SSL_CTX
    monkeypatch.setattr(openssl, "_ctx_address", lambda ctx: ctypes.addressof(forged))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    with pytest.raises(openssl.Unavailable, match="options"):
        openssl.set_verify_depth(ctx, 3)
    assert openssl.enable_read_ahead(ctx) is False
    assert openssl.read_ahead_enabled(ctx) is False
    assert forged.raw == bytes(len(forged))  # not one byte written
    with pytest.raises(ConfigError) as info:
        server_context(pki)
    assert info.value.key == "server.verify_depth"
    assert "cannot enforce the chain depth limit" in info.value.message


def test_another_contexts_pointer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # default options and CERT_NONE
    target = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    target.options |= ssl.OP_NO_RENEGOTIATION
    target.verify_mode = ssl.CERT_REQUIRED
    real = openssl._ctx_address
    monkeypatch.setattr(openssl, "_ctx_address", lambda ctx: real(other))
    with pytest.raises(openssl.Unavailable):
        openssl.set_verify_depth(target, 3)
    assert openssl.enable_read_ahead(target) is False
    monkeypatch.undo()
    assert openssl_verify_depth(other) == -1  # the other context was not changed either
    assert openssl.read_ahead_enabled(other) is False


def test_a_forged_connection_pointer_is_refused(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    forged = ctypes.create_string_buffer(64 * 1024)
    server, client = tls_pair(pki, server_context(pki))
    try:
        monkeypatch.setattr(openssl, "_ssl_address", lambda tls_obj: ctypes.addressof(forged))
        assert openssl.pending_function(server) is None
        assert forged.raw == bytes(len(forged))
    finally:
        server.close()
        client.close()


def test_a_connection_of_another_context_is_refused(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    server, client = tls_pair(pki, server_context(pki))
    try:
        real = openssl._ssl_address
        # the client's SSL* belongs to the client context, not to the server socket's context
        monkeypatch.setattr(openssl, "_ssl_address", lambda tls_obj: real(client._sslobj))
        assert openssl.pending_function(server) is None
    finally:
        server.close()
        client.close()


def test_an_unchecked_python_layout_gets_no_pointer(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    monkeypatch.setattr(openssl, "_LAYOUT_VERSIONS", ((3, 0), (3, 1)))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert openssl.enable_read_ahead(ctx) is False
    with pytest.raises(openssl.Unavailable, match="layout not checked"):
        openssl.set_verify_depth(ctx, 2)
    probed = openssl.probe()
    assert probed["sslobj_io"] is None  # no pointer involved
    assert all("layout not checked" in (probed[n] or "") for n in ("verify_depth", "read_ahead", "has_pending"))
    monkeypatch.undo()
    assert openssl.read_ahead_enabled(ctx) is False


def test_objects_that_are_not_ssl_contexts_are_refused() -> None:
    with pytest.raises(openssl.Unavailable, match="not an ssl.SSLContext"):
        openssl.set_verify_depth(object(), 2)  # type: ignore[arg-type]


# --- client CA names and client signature algorithms -------------------------------------------------------------


def _der(path: Path) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(path.read_bytes())]


def test_client_ca_names_are_added_and_read_back(pki: Pki) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    assert openssl.client_ca_names_count(ctx) == 0
    cas = _der(pki.client_ca)
    openssl.set_client_ca_names(ctx, cas)
    assert openssl.client_ca_names_count(ctx) == len(cas) >= 2


def test_the_proxys_server_context_sends_every_client_ca_by_default(pki: Pki) -> None:
    assert openssl.client_ca_names_count(server_context(pki)) == len(_der(pki.client_ca))
    private = tls.build_server_context(server_cfg(pki, crl=None, send_client_ca_names=False))[0]
    assert openssl.client_ca_names_count(private) == 0


def test_a_bad_client_ca_certificate_is_refused() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(openssl.Unavailable, match="d2i_X509"):
        openssl.set_client_ca_names(ctx, [b"\x30\x03\x02\x01\x00"])
    assert openssl.client_ca_names_count(ctx) == 0


def test_client_sigalgs_that_openssl_refuses_are_a_config_error_naming_the_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="NOPE"):
        openssl.set_client_sigalgs(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "RSA+NOPE")
    with pytest.raises(ConfigError) as info:
        tls.build_server_context(server_cfg(pki, crl=None, client_sigalgs="RSA+NOPE"))
    assert info.value.key == "server.client_sigalgs"


def test_a_forged_context_gets_no_ca_names_and_no_sigalgs(monkeypatch: pytest.MonkeyPatch, pki: Pki) -> None:
    forged = ctypes.create_string_buffer(64 * 1024)
    monkeypatch.setattr(openssl, "_ctx_address", lambda ctx: ctypes.addressof(forged))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    with pytest.raises(openssl.Unavailable):
        openssl.set_client_ca_names(ctx, _der(pki.client_ca))
    with pytest.raises(openssl.Unavailable):
        openssl.set_client_sigalgs(ctx, "ECDSA+SHA256")
    with pytest.raises(openssl.Unavailable):
        openssl.set_session_cache_size(ctx)
    assert openssl.session_cache_size(ctx) is None
    assert forged.raw == bytes(len(forged))
