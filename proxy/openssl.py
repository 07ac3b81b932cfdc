"""The OpenSSL bridge: every call the proxy makes into OpenSSL past Python's ``ssl`` module.

Owns: finding the libssl that the ``_ssl`` extension actually links (``ctypes.CDLL(_ssl.__file__)``: the dynamic
loader resolves each symbol through ``_ssl``'s own dependencies, so it is the same library, whatever else is
installed), locating the ``SSL_CTX*`` / ``SSL*`` behind Python objects, proving each pointer before anything is
written through it, one small function per capability, and the table of capabilities (``CAPABILITIES``) that the
start-up log line and ``check`` report.

Why ctypes at all: Python's ``ssl`` has no ``set_verify_depth`` (OpenSSL's default of 100 would accept arbitrarily
long client chains), no way to name the acceptable client CAs in the CertificateRequest (Java's key manager,
SChannel, browsers and Go pick the client certificate from that list), no client signature algorithm list, no
read-ahead switch, no ``SSL_has_pending`` and no way to size the server's session cache.

Two kinds of capability:

* **security** (``verify_depth``, ``client_ca_names``, ``client_sigalgs``): without it the proxy would run with a weaker check than configured, so the
  function raises ``Unavailable`` and the caller refuses to start, naming the config key.
* **fast path** (``read_ahead``, ``has_pending``, ``sslobj_io``, ``session_cache``): without it the proxy does more
  work (or, for ``session_cache``, may keep more sessions in memory) but stays correct.  Each function answers
  False/None when it cannot prove what it would touch, and the caller takes the slow path; nothing is assumed.

Pointer proofs (a pointer is read from CPython's object layout, which is private): an ``SSL_CTX*`` must report the
same options and verify mode that Python reports for that context; an ``SSL*`` must belong to the proven
``SSL_CTX*`` of its socket and be on the same side (server/client).  Every check reads one field of the struct the
pointer claims to be; a write happens only after both checks pass.

Must not: keep per-connection state, log, or be imported by ``proxy.wire`` (the sans-IO package).
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["CAPABILITIES", "SESSION_CACHE_SIZE", "Capability", "Unavailable", "client_ca_names_count",
           "enable_read_ahead", "fast_paths", "libssl_path", "pending_function", "probe", "read_ahead_enabled",
           "session_cache_size", "set_client_ca_names", "set_client_sigalgs", "set_session_cache_size",
           "set_verify_depth", "sslobj_handshake", "sslobj_io"]


class Unavailable(OSError):
    """A capability cannot be used on this Python / OpenSSL; the message says why."""


# --- finding libssl --------------------------------------------------------------------------------------------

# name -> (argtypes, restype).  Declared once; a symbol missing from this OpenSSL makes only the capabilities that
# need it unavailable.
_PROTOTYPES: dict[str, tuple[list[Any], Any]] = {
    "SSL_CTX_ctrl": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p], ctypes.c_long),
    "SSL_CTX_get_options": ([ctypes.c_void_p], ctypes.c_uint64),
    "SSL_CTX_get_verify_mode": ([ctypes.c_void_p], ctypes.c_int),
    "SSL_CTX_get_verify_depth": ([ctypes.c_void_p], ctypes.c_int),
    "SSL_CTX_set_verify_depth": ([ctypes.c_void_p, ctypes.c_int], None),
    "SSL_get_SSL_CTX": ([ctypes.c_void_p], ctypes.c_void_p),
    "SSL_is_server": ([ctypes.c_void_p], ctypes.c_int),
    "SSL_has_pending": ([ctypes.c_void_p], ctypes.c_int),
    "SSL_CTX_add_client_CA": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    "SSL_CTX_get_client_CA_list": ([ctypes.c_void_p], ctypes.c_void_p),
    # libcrypto, reached through the same handle (the dynamic loader searches _ssl's dependencies in order).
    "OPENSSL_sk_num": ([ctypes.c_void_p], ctypes.c_int),
    "d2i_X509": ([ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_long], ctypes.c_void_p),
    "X509_free": ([ctypes.c_void_p], None),
}

# ssl.h control codes (SSL_CTX_get_read_ahead / SSL_CTX_set_read_ahead are macros over SSL_CTX_ctrl).
_SSL_CTRL_GET_READ_AHEAD = 40
_SSL_CTRL_SET_READ_AHEAD = 41
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42  # SSL_CTX_sess_set_cache_size
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43  # SSL_CTX_sess_get_cache_size
_SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102  # SSL_CTX_set1_client_sigalgs_list
# What CPython's _ssl sets for each verify mode (Modules/_ssl.c, _set_verify_mode): SSL_VERIFY_PEER = 1,
# SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 2.
_VERIFY_MODES = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}

_POINTER = ctypes.sizeof(ctypes.c_void_p)
# CPython's C structs (Modules/_ssl.c): PySSLContext is PyObject_HEAD then ``SSL_CTX *ctx``; PySSLSocket (the
# ``_sslobj`` of an SSLSocket or SSLObject) is PyObject_HEAD, ``PyObject *Socket`` (a weak reference), ``SSL *ssl``.
# Checked for CPython 3.11-3.13; another version may lay them out differently, so it gets no pointer at all.
_CTX_OFFSET = object.__basicsize__
_SSL_OFFSET = object.__basicsize__ + _POINTER
_LAYOUT_VERSIONS = ((3, 11), (3, 13))


@functools.cache
def _lib() -> ctypes.CDLL:
    """The libssl ``_ssl`` links, through ``_ssl``'s own handle (loaded once per process)."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    if not path:
        raise Unavailable("the _ssl module is built into the interpreter: no shared object to resolve libssl from")
    try:
        return ctypes.CDLL(path)
    except OSError as exc:  # pragma: no cover - the loader already has it mapped
        raise Unavailable(f"cannot open {path}: {exc}") from None


@functools.cache
def _fn(name: str) -> Any:
    try:
        fn = getattr(_lib(), name)
    except AttributeError:
        raise Unavailable(f"{name} is not exported by the libssl that _ssl uses") from None
    fn.argtypes, fn.restype = _PROTOTYPES[name]
    return fn


def libssl_path() -> str | None:
    """Where the libssl ``_ssl`` uses lives (for the start-up log), or None if it cannot be told."""
    try:
        fn = _fn("SSL_CTX_ctrl")
    except Unavailable:
        return None
    info = _DlInfo()
    try:
        libc = ctypes.CDLL(None)
        libc.dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        if not libc.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
    except (OSError, AttributeError):  # pragma: no cover - no dladdr (not glibc/musl)
        return None
    return info.dli_fname.decode(errors="replace") if info.dli_fname else None


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


# --- pointers and their proofs ---------------------------------------------------------------------------------


def _check_layout() -> None:
    import _ssl

    if sys.implementation.name != "cpython":
        raise Unavailable(f"{sys.implementation.name} is not CPython: its ssl objects have another layout")
    low, high = _LAYOUT_VERSIONS
    if not low <= sys.version_info[:2] <= high:
        raise Unavailable(f"CPython {sys.version_info[0]}.{sys.version_info[1]}: ssl object layout not checked "
                          f"for this version")
    if (_ssl._SSLContext.__basicsize__ < _CTX_OFFSET + _POINTER
            or _ssl._SSLSocket.__basicsize__ < _SSL_OFFSET + _POINTER):  # type: ignore[attr-defined]
        raise Unavailable("the _ssl objects are smaller than the layout this bridge reads")


def _ctx_address(ctx: ssl.SSLContext) -> int:
    """The SSL_CTX* stored in a context object (unproven)."""
    return ctypes.c_void_p.from_address(id(ctx) + _CTX_OFFSET).value or 0


def _ssl_address(tls: object) -> int:
    """The SSL* stored in a ``_ssl._SSLSocket`` (unproven)."""
    return ctypes.c_void_p.from_address(id(tls) + _SSL_OFFSET).value or 0


def _proven_ctx(ctx: ssl.SSLContext) -> int:
    """The context's SSL_CTX*, proven to be it, or Unavailable."""
    if not isinstance(ctx, ssl.SSLContext):
        raise Unavailable(f"not an ssl.SSLContext: {type(ctx).__name__}")
    _check_layout()
    ptr = _ctx_address(ctx)
    if not ptr:
        raise Unavailable("the SSLContext holds no SSL_CTX pointer")
    # Two fields Python also reports for this context: a pointer to anything else, or into another layout, does not
    # match both (the options word alone has a dozen bits set by ssl.SSLContext's defaults).
    if _fn("SSL_CTX_get_options")(ptr) != int(ctx.options):
        raise Unavailable("the SSL_CTX pointer does not report this context's options")
    if _fn("SSL_CTX_get_verify_mode")(ptr) != _VERIFY_MODES[ctx.verify_mode]:
        raise Unavailable("the SSL_CTX pointer does not report this context's verify mode")
    return ptr


def _proven_ssl(sock: ssl.SSLSocket | ssl.SSLObject) -> int:
    """The connection's SSL*, proven to belong to its (proven) SSL_CTX and side, or Unavailable."""
    tls = getattr(sock, "_sslobj", None)
    if tls is None:
        raise Unavailable("the socket has no TLS object yet")
    import _ssl

    if type(tls) is not _ssl._SSLSocket:  # type: ignore[attr-defined]
        raise Unavailable(f"unexpected TLS object type {type(tls).__name__}")
    ctx_ptr = _proven_ctx(sock.context)
    ptr = _ssl_address(tls)
    if not ptr or _fn("SSL_get_SSL_CTX")(ptr) != ctx_ptr:
        raise Unavailable("the SSL pointer does not belong to this socket's SSL_CTX")
    if bool(_fn("SSL_is_server")(ptr)) != bool(sock.server_side):
        raise Unavailable("the SSL pointer is not on this socket's side of the connection")
    return ptr


# --- capabilities: one small function each ---------------------------------------------------------------------


def set_verify_depth(ctx: ssl.SSLContext, depth: int) -> None:
    """Limit client chains to ``depth`` intermediates (OpenSSL semantics), read back; Unavailable if impossible."""
    ptr = _proven_ctx(ctx)
    _fn("SSL_CTX_set_verify_depth")(ptr, depth)
    if _fn("SSL_CTX_get_verify_depth")(ptr) != depth:
        raise Unavailable("SSL_CTX_set_verify_depth did not take effect")


def set_client_ca_names(ctx: ssl.SSLContext, certificates: list[bytes]) -> None:
    """Send the subject of each certificate (DER) as an acceptable client CA: the ``certificate_authorities`` of a
    TLS 1.2 CertificateRequest (RFC 5246 section 7.4.4) and the TLS 1.3 ``certificate_authorities`` extension
    (RFC 8446 section 4.2.4); OpenSSL uses one list for both.  Read back; Unavailable if it cannot be done.

    Only for a fresh context (the proxy builds one per snapshot, so a reload replaces the whole list)."""
    ptr = _proven_ctx(ctx)
    before = _ca_list_size(ptr)
    for der in certificates:
        buf = ctypes.create_string_buffer(der, len(der))
        cursor = ctypes.c_void_p(ctypes.addressof(buf))
        x509 = _fn("d2i_X509")(None, ctypes.byref(cursor), len(der))
        if not x509:
            raise Unavailable("d2i_X509 could not read a client CA certificate")
        try:
            # Copies the subject name into the context's list; the certificate itself is ours to free.
            if _fn("SSL_CTX_add_client_CA")(ptr, x509) != 1:
                raise Unavailable("SSL_CTX_add_client_CA failed")
        finally:
            _fn("X509_free")(x509)
    if _ca_list_size(ptr) != before + len(certificates):
        raise Unavailable("the client CA list does not hold the names just added")


def _ca_list_size(ptr: int) -> int:
    names = _fn("SSL_CTX_get_client_CA_list")(ptr)
    return _fn("OPENSSL_sk_num")(names) if names else 0


def client_ca_names_count(ctx: ssl.SSLContext) -> int:
    """How many client CA names the context sends (for tests and ``check``)."""
    return _ca_list_size(_proven_ctx(ctx))


def set_client_sigalgs(ctx: ssl.SSLContext, sigalgs: str) -> None:
    """The signature algorithms the CertificateRequest offers for client certificates
    (``SSL_CTX_set1_client_sigalgs_list``).  ValueError when OpenSSL refuses the list; Unavailable if the call
    cannot be made."""
    ptr = _proven_ctx(ctx)
    value = ctypes.create_string_buffer(sigalgs.encode("ascii"))
    if _fn("SSL_CTX_ctrl")(ptr, _SSL_CTRL_SET_CLIENT_SIGALGS_LIST, 0, ctypes.addressof(value)) != 1:
        raise ValueError(f"OpenSSL does not accept the signature algorithm list {sigalgs!r}")


def enable_read_ahead(ctx: ssl.SSLContext) -> bool:
    """Let OpenSSL read everything the socket has in one read() instead of a 5-byte header and then the body of
    each record (what NGINX does): half the read calls per request, a fifth during a handshake.  True only when
    it was set and read back; on False the context is unchanged and nothing relies on read-ahead.

    With read-ahead, whole records can wait inside OpenSSL where epoll cannot see them, so a reader must ask
    ``pending_function`` before it waits for readiness (or, without it, always try one read)."""
    try:
        _set_read_ahead(ctx)
    except Unavailable:
        return False
    return True


def _set_read_ahead(ctx: ssl.SSLContext) -> None:
    ptr = _proven_ctx(ctx)
    ctrl = _fn("SSL_CTX_ctrl")
    ctrl(ptr, _SSL_CTRL_SET_READ_AHEAD, 1, None)
    if ctrl(ptr, _SSL_CTRL_GET_READ_AHEAD, 0, None) != 1:  # pragma: no cover - a proven SSL_CTX always takes it
        ctrl(ptr, _SSL_CTRL_SET_READ_AHEAD, 0, None)
        raise Unavailable("SSL_CTX_set_read_ahead did not take effect")


def read_ahead_enabled(ctx: ssl.SSLContext) -> bool:
    """Whether OpenSSL reads ahead on this context (False when that cannot be proven)."""
    try:
        return bool(_fn("SSL_CTX_ctrl")(_proven_ctx(ctx), _SSL_CTRL_GET_READ_AHEAD, 0, None))
    except Unavailable:
        return False


# Sessions the server keeps for resumption, per context (so per worker and per reload).  A session with a client
# certificate holds the certificate and the chain it sent, a few KB; OpenSSL's default of 20480 would let one
# worker grow by tens of MB, while 256 still resumes every partner connection of a typical deployment.
SESSION_CACHE_SIZE = 256


def set_session_cache_size(ctx: ssl.SSLContext, size: int = SESSION_CACHE_SIZE) -> None:
    """At most ``size`` sessions in the context's server-side session cache (``SSL_CTX_sess_set_cache_size``; the
    oldest are dropped first), read back; Unavailable if it cannot be done (then OpenSSL's default stands)."""
    ptr = _proven_ctx(ctx)
    ctrl = _fn("SSL_CTX_ctrl")
    ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    if ctrl(ptr, _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None) != size:  # pragma: no cover - a proven SSL_CTX takes it
        raise Unavailable("SSL_CTX_sess_set_cache_size did not take effect")


def session_cache_size(ctx: ssl.SSLContext) -> int | None:
    """The context's session cache limit (``SSL_CTX_sess_get_cache_size``), or None when it cannot be proven."""
    try:
        return int(_fn("SSL_CTX_ctrl")(_proven_ctx(ctx), _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None))
    except Unavailable:
        return None


def pending_function(sock: ssl.SSLSocket | ssl.SSLObject) -> Callable[[], int] | None:
    """``SSL_has_pending`` bound to this connection (decrypted *or* still-encrypted buffered bytes), or None when
    its SSL* cannot be proven (then the caller must not rely on readiness alone: it tries a read instead)."""
    try:
        return _bound_has_pending(sock)
    except Unavailable:
        return None


def _bound_has_pending(sock: ssl.SSLSocket | ssl.SSLObject) -> Callable[[], int]:
    ptr = _proven_ssl(sock)
    # Per TLS read: the GIL kept (PYFUNCTYPE) and a ready c_void_p, ~360 instructions less per call than through _fn.
    fn = ctypes.PYFUNCTYPE(ctypes.c_int)(ctypes.cast(_fn("SSL_has_pending"), ctypes.c_void_p).value)
    return functools.partial(fn, ctypes.c_void_p(ptr))


def sslobj_io(sock: ssl.SSLSocket) -> tuple[Callable[[int], bytes], Callable[[Any], int]] | None:
    """The C-level ``read``/``write`` behind an SSLSocket, or None.  ``SSLSocket.recv``/``send`` only add Python-level
    checks that cannot fail for a socket with no flags and ``suppress_ragged_eofs=False``; on the per-record hot
    path they are a measurable share of the work."""
    tls = getattr(sock, "_sslobj", None)
    if tls is None or getattr(sock, "suppress_ragged_eofs", True):
        return None
    read, write = getattr(tls, "read", None), getattr(tls, "write", None)
    if not callable(read) or not callable(write):
        return None
    return read, write


def sslobj_handshake(sock: ssl.SSLSocket) -> Callable[[], None]:
    """The C-level ``do_handshake`` behind an SSLSocket, else ``sock.do_handshake``.  ``SSLSocket.do_handshake``
    adds a connected check and a ``gettimeout``/``settimeout`` pair around every step, which change nothing for a
    connected non-blocking socket (the ``settimeout(0.0)`` it restores is a system call each time)."""
    tls = getattr(sock, "_sslobj", None)
    fn = getattr(tls, "do_handshake", None)
    return fn if callable(fn) else sock.do_handshake


# --- the table -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    security: bool  # True: the proxy refuses to start without it; False: a fast path with a safe fallback
    does: str
    without: str  # what happens when it is unavailable
    probe: Callable[[], object]  # raises Unavailable (or returns a falsy value) when it cannot be used here


def _probe_verify_depth() -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.verify_mode = ssl.CERT_REQUIRED
    set_verify_depth(ctx, 4)
    return True


def _probe_client_ca_names() -> bool:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _ca_list_size(_proven_ctx(ctx))
    _fn("d2i_X509")
    _fn("X509_free")
    _fn("SSL_CTX_add_client_CA")
    return True


def _probe_client_sigalgs() -> bool:
    set_client_sigalgs(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "ECDSA+SHA256")
    return True


def _probe_read_ahead() -> bool:
    _set_read_ahead(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    return True


def _probe_tls_object() -> ssl.SSLObject:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)


def _probe_has_pending() -> bool:
    _bound_has_pending(_probe_tls_object())
    return True


def _probe_sslobj_io() -> bool:
    tls = getattr(_probe_tls_object(), "_sslobj", None)
    return all(callable(getattr(tls, name, None)) for name in ("read", "write", "do_handshake"))


def _probe_session_cache() -> bool:
    set_session_cache_size(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    return True


CAPABILITIES: tuple[Capability, ...] = (
    Capability("verify_depth", True, "SSL_CTX_set_verify_depth: client chains limited to server.verify_depth",
               "refuse to start (server.verify_depth cannot be enforced)", _probe_verify_depth),
    Capability("client_ca_names", True, "SSL_CTX_add_client_CA: the client CA names sent in the CertificateRequest",
               "refuse to start unless server.send_client_ca_names = false", _probe_client_ca_names),
    Capability("client_sigalgs", True, "SSL_CTX_set1_client_sigalgs_list: server.client_sigalgs offered to clients",
               "refuse to start (server.client_sigalgs cannot be enforced)", _probe_client_sigalgs),
    Capability("read_ahead", False, "SSL_CTX_set_read_ahead: one read() per batch of TLS records",
               "two read() calls per record", _probe_read_ahead),
    Capability("has_pending", False, "SSL_has_pending: records buffered inside OpenSSL are seen without a read",
               "one extra read attempt whenever reading resumes", _probe_has_pending),
    Capability("sslobj_io", False, "the C-level read/write/do_handshake of the SSL object, without SSLSocket's "
               "Python checks", "SSLSocket.recv/send/do_handshake", _probe_sslobj_io),
    Capability("session_cache", False, f"SSL_CTX_sess_set_cache_size: at most {SESSION_CACHE_SIZE} sessions kept "
               f"for resumption per worker", "OpenSSL's default cache of up to 20480 sessions per worker (more "
               "memory)", _probe_session_cache),
)


def probe(capabilities: tuple[Capability, ...] = CAPABILITIES) -> dict[str, str | None]:
    """Each capability's name -> None when it works on this Python and OpenSSL, else the reason it does not."""
    out: dict[str, str | None] = {}
    for cap in capabilities:
        try:
            ok = cap.probe()
        except Unavailable as exc:
            out[cap.name] = str(exc)
            continue
        out[cap.name] = None if ok else "cannot be proven on this build"
    return out


def fast_paths(server_ctx: ssl.SSLContext, upstream_ctx: ssl.SSLContext) -> dict[str, str]:
    """The start-up log's fields: for the running contexts, each fast path "on" or "off: <why, and the fallback>"."""
    probed = probe(tuple(c for c in CAPABILITIES if not c.security))
    out: dict[str, str] = {}
    for cap in CAPABILITIES:
        if cap.security:
            continue
        reason = probed[cap.name]
        if cap.name == "read_ahead" and reason is None:
            sides = [side for side, ctx in (("server", server_ctx), ("upstream", upstream_ctx))
                     if not read_ahead_enabled(ctx)]
            reason = f"not set on the {' and '.join(sides)} context" if sides else None
        if cap.name == "session_cache" and reason is None and session_cache_size(server_ctx) != SESSION_CACHE_SIZE:
            reason = "not set on the server context"
        out[cap.name] = "on" if reason is None else f"off: {reason}; {cap.without}"
    return out
