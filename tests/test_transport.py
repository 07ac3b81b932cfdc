"""transport: the handshake coroutine and TLSTransport over real TLS on loopback, on both event loops.

The server side is built the way proxy/listener.py builds it (the proxy's own server context with read-ahead,
``wrap_socket(server_side=True, do_handshake_on_connect=False, suppress_ragged_eofs=False)``, ``handshake()``,
then ``TLSTransport(...).start()``).  The client is a blocking socket in a thread driving an ``ssl.SSLObject``
over memory BIOs, so the test decides which TLS records share one TCP send and can tell a clean close_notify
(``recv() == b""``) from a FIN without one (``ssl.SSLEOFError``) and from a reset (``ConnectionResetError``).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import uvloop

from proxy import tls
from proxy.config import PemSource, ServerConfig
from proxy.sockets import Lingerer
from proxy.transport import TLSTransport, handshake
from tests.pki import Pki

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Run = Callable[[Callable[[], Awaitable[Any]]], Any]
HIGH = 256 * 1024  # TLSTransport's default high-water mark


@pytest.fixture(scope="module")
def server_ctx(pki: Pki) -> ssl.SSLContext:
    cfg = ServerConfig(cert=PemSource(pki.server_cert), key=PemSource(pki.server_key),
                       client_ca=PemSource(pki.client_ca), crl=PemSource(pki.crl_bundle))
    return tls.build_server_context(cfg)[0]  # CERT_REQUIRED, read-ahead on (as in production)


@pytest.fixture(scope="module")
def client_ctx(pki: Pki) -> ssl.SSLContext:
    return pki.client_context(pki.clients["good"])


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    """Runs a test coroutine on a fresh loop of each kind; an exception no callback could deliver fails it."""
    def run(fn: Callable[[], Awaitable[Any]]) -> Any:
        unhandled: list[dict[str, Any]] = []

        async def main() -> Any:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _loop, ctx: unhandled.append(ctx))
            return await asyncio.wait_for(fn(), 40)

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            result = runner.run(main())
        assert not unhandled, unhandled
        return result

    yield run


# ---- the client: blocking socket + SSLObject, used from a worker thread --------------------------------------


class Client:
    def __init__(self, ctx: ssl.SSLContext, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", port))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.buffer = b""  # plaintext read past what recv_exactly returned

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def handshake(self, flush: bool = True) -> None:
        """``flush=False`` keeps the last flight (TLS 1.3: the client Finished) for the next send."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                self._fill()
        if flush:
            self.flush()

    def send(self, *records: bytes) -> None:
        """Each argument becomes its own TLS record; all of them go out in one sendall (one TCP segment)."""
        for r in records:
            self.tls.write(r)
        self.flush()

    def recv(self) -> bytes:
        """Plaintext; b"" on close_notify; SSLEOFError on a FIN without close_notify; ConnectionResetError."""
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        while True:
            try:
                return self.tls.read(1 << 16)
            except ssl.SSLWantReadError:
                self.flush()
                self._fill()
            except ssl.SSLZeroReturnError:
                return b""

    def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.recv()
            if not chunk:
                raise EOFError(f"clean end after {len(buf)} of {n} bytes")
            buf += chunk
        self.buffer = bytes(buf[n:])
        return bytes(buf[:n])

    def recv_to_end(self) -> bytes:
        """Everything up to a clean close_notify (raises on a ragged end or a reset)."""
        buf = bytearray()
        while chunk := self.recv():
            buf += chunk
        return bytes(buf)

    def close_notify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is in the outgoing BIO; we do not wait for the peer's
        self.flush()

    def close(self) -> None:
        self.sock.close()


class Recorder(asyncio.Protocol):
    """Records every callback a transport makes."""

    def __init__(self) -> None:
        self.transport: TLSTransport | None = None
        self.data = bytearray()
        self.chunks = 0
        self.eofs = 0
        self.keep_open_on_eof = False
        self.pauses = 0
        self.resumes = 0
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.chunks += 1

    def eof_received(self) -> bool:
        self.eofs += 1
        return self.keep_open_on_eof

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def until(probe: Callable[[], object], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not probe():
            await asyncio.sleep(0.005)


async def turns(n: int = 10) -> None:
    """Let the loop run readiness callbacks for a while (used only to show that something does NOT happen)."""
    for _ in range(n):
        await asyncio.sleep(0.01)


async def accept_tls(server_ctx: ssl.SSLContext, connect: Callable[[int], Client], *,
                     sndbuf: int | None = None, timeout: float = 10.0) -> tuple[ssl.SSLSocket, Client]:
    """Accept one client and complete the handshake the way the listener does."""
    loop = asyncio.get_running_loop()
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.setblocking(False)
    client_task = asyncio.ensure_future(asyncio.to_thread(connect, lsock.getsockname()[1]))
    try:
        conn, _ = await loop.sock_accept(lsock)
    finally:
        lsock.close()
    conn.setblocking(False)
    if sndbuf is not None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    ssock = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False,
                                   suppress_ragged_eofs=False)
    try:
        await handshake(loop, ssock, timeout)
    except BaseException:
        ssock.close()
        (await client_task).close()  # the client thread ends: it reads our alert, or our close
        raise
    return ssock, await client_task


async def serve(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, proto: asyncio.Protocol, *,
                lingerer: Lingerer | None = None, sndbuf: int | None = None, rcvbuf: int | None = None,
                flush_handshake: bool = True, first: tuple[bytes, ...] = ()) -> tuple[TLSTransport, Client]:
    def connect(port: int) -> Client:
        c = Client(client_ctx, port, rcvbuf)
        c.handshake(flush=flush_handshake)
        if first:
            c.send(*first)
        return c

    ssock, client = await accept_tls(server_ctx, connect, sndbuf=sndbuf)
    transport = TLSTransport(asyncio.get_running_loop(), ssock, proto, lingerer=lingerer)
    transport.start()
    return transport, client


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


# ---- round trip ------------------------------------------------------------------------------------------------


class Echo(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        self.transport.write(data)


def test_echo_round_trip(run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, pki: Pki) -> None:
    async def main() -> None:
        proto = Echo()
        tr, c = await serve(server_ctx, client_ctx, proto)
        try:
            msg = os.urandom(100_000)
            await in_thread(c.send, b"ping")
            assert await in_thread(c.recv_exactly, 4) == b"ping"
            await in_thread(c.send, msg)
            assert await in_thread(c.recv_exactly, len(msg)) == msg
            assert tr.get_extra_info("peername") == c.sock.getsockname()
            ssl_object = tr.get_extra_info("ssl_object")
            assert ssl_object.getpeercert(binary_form=True) == pki.clients["good"].der
            assert tr.is_reading() and not tr.is_closing()
        finally:
            c.close()
        assert isinstance(await proto.lost, (ssl.SSLError, OSError))  # the client vanished without close_notify

    run(main)


# ---- writing: flow control ----------------------------------------------------------------------------------


class Pump(Recorder):
    """Writes ``payload`` in 64 KiB pieces, stopping while the transport says it is paused."""

    def __init__(self, payload: bytes) -> None:
        super().__init__()
        self.payload = payload
        self.offset = 0
        self.paused = False
        self.max_buffered = 0

    def pump(self) -> None:
        assert self.transport is not None
        while not self.paused and self.offset < len(self.payload):
            self.transport.write(self.payload[self.offset:self.offset + 65536])
            self.offset += 65536
            self.max_buffered = max(self.max_buffered, self.transport.get_write_buffer_size())

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused = True

    def resume_writing(self) -> None:
        super().resume_writing()
        self.paused = False
        self.pump()


def test_large_write_to_a_slow_reader_pauses_resumes_and_delivers_every_byte(
        run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        payload = os.urandom(5 * 1024 * 1024)
        proto = Pump(payload)
        tr, c = await serve(server_ctx, client_ctx, proto, sndbuf=32768, rcvbuf=32768)
        try:
            proto.pump()
            await until(lambda: proto.pauses)  # the client has not read a byte yet
            assert proto.offset < len(payload) and tr.get_write_buffer_size() > HIGH
            got = await in_thread(c.recv_exactly, len(payload))
            assert got == payload  # every byte, in order
            await until(lambda: tr.get_write_buffer_size() == 0)
            assert proto.resumes == proto.pauses >= 1 and not proto.paused
            assert proto.max_buffered <= HIGH + 65536  # the protocol stopped at the first pause
        finally:
            c.close()

    run(main)


def test_write_buffer_limits_are_configurable(run: Run, server_ctx: ssl.SSLContext,
                                              client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        proto = Pump(os.urandom(1024 * 1024))
        tr, c = await serve(server_ctx, client_ctx, proto, sndbuf=32768, rcvbuf=32768)
        try:
            tr.set_write_buffer_limits(high=65536)
            proto.pump()
            await until(lambda: proto.pauses)
            assert 65536 < proto.max_buffered <= 2 * 65536
            assert await in_thread(c.recv_exactly, len(proto.payload)) == proto.payload
            await until(lambda: proto.resumes == proto.pauses and tr.get_write_buffer_size() == 0)
        finally:
            c.close()

    run(main)


# ---- reading: pause/resume, read-ahead ----------------------------------------------------------------------


def test_pause_reading_holds_data_until_resume(run: Run, server_ctx: ssl.SSLContext,
                                               client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        proto = Recorder()
        tr, c = await serve(server_ctx, client_ctx, proto)
        try:
            tr.pause_reading()
            assert not tr.is_reading()
            await in_thread(c.send, b"x" * 1000)
            readable, _, _ = await in_thread(select.select, [tr.get_extra_info("socket").fileno()], [], [], 10)
            assert readable  # the record is in the kernel ...
            await turns()
            assert proto.data == b""  # ... and not delivered while paused
            tr.resume_reading()
            assert tr.is_reading()
            await until(lambda: len(proto.data) == 1000)
        finally:
            c.close()

    run(main)


class PauseOnFirst(Recorder):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.chunks == 1:
            assert self.transport is not None
            self.transport.pause_reading()


def test_resume_delivers_records_that_read_ahead_already_pulled_in(
        run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    """Three records in one TCP segment: OpenSSL reads all of them at once (read-ahead); the protocol pauses after
    the first, so two whole records wait inside OpenSSL where epoll cannot see them.  resume_reading must deliver
    them without any further bytes from the client (SSL_has_pending)."""
    async def main() -> None:
        proto = PauseOnFirst()
        tr, c = await serve(server_ctx, client_ctx, proto)
        try:
            assert tls.pending_function(tr.get_extra_info("ssl_object")) is not None
            await in_thread(c.send, b"A" * 100, b"B" * 100, b"C" * 100)
            await until(lambda: proto.chunks)
            await turns()
            assert proto.data == b"A" * 100
            tr.resume_reading()
            await until(lambda: len(proto.data) == 300)
            assert proto.data == b"A" * 100 + b"B" * 100 + b"C" * 100
        finally:
            c.close()

    run(main)


@pytest.mark.parametrize("count, size", [(1000, 40), (48, 16384)], ids=["1000x40B", "48x16KiB-over-budget"])
def test_many_pipelined_records_are_all_delivered_without_more_data(
        run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, count: int, size: int) -> None:
    async def main() -> None:
        proto = Recorder()
        tr, c = await serve(server_ctx, client_ctx, proto)
        try:
            records = [bytes([65 + i % 26]) * size for i in range(count)]
            await in_thread(c.send, *records)  # one sendall; nothing follows it
            await until(lambda: len(proto.data) == count * size)
            assert proto.data == b"".join(records)
        finally:
            c.close()

    run(main)


def _queued(sock: socket.socket) -> int:
    import fcntl
    import termios

    return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")


class MarkedTransport(TLSTransport):
    """Notes each readiness callback ("cb") and what each SSL read in it returned ("data" or "want")."""

    __slots__ = ("events",)

    def start(self) -> None:
        self.events: list[str] = []
        recv = self._recv

        def counting(n: int) -> bytes:
            try:
                data = recv(n)
            except ssl.SSLWantReadError:
                self.events.append("want")
                raise
            self.events.append("data")
            return data

        self._recv = counting
        super().start()

    def _read_ready(self) -> None:
        self.events.append("cb")
        super()._read_ready()

    def callbacks(self) -> list[list[str]]:
        out: list[list[str]] = []
        for event in self.events:
            if event == "cb":
                out.append([])
            else:
                out[-1].append(event)
        return out


@pytest.mark.parametrize("has_pending", [True, False], ids=["has_pending", "without_has_pending"])
def test_a_pipelined_burst_is_read_in_one_callback_without_a_wasted_read(
        run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch,
        has_pending: bool) -> None:
    """200 pipelined keep-alive requests (200 TLS records, ~13 KiB) are all in the kernel before the transport
    reads at all.  One callback delivers every byte, in order; with SSL_has_pending it stops on "OpenSSL holds
    nothing and poll() shows nothing" instead of a read that fails with SSLWantReadError; without it (the
    fallback) exactly that one failing read ends the loop."""
    if not has_pending:
        monkeypatch.setattr("proxy.transport.pending_function", lambda sock: None)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        requests = [b"GET /orders/%d HTTP/1.1\r\nHost: api.test\r\nAccept: */*\r\n\r\n" % i for i in range(200)]

        def connect(port: int) -> Client:
            c = Client(client_ctx, port)
            c.handshake()
            return c

        ssock, c = await accept_tls(server_ctx, connect)
        try:
            for r in requests:
                c.tls.write(r)
            wire = c.outgoing.read()
            await in_thread(c.sock.sendall, wire)
            await until(lambda: _queued(ssock) == len(wire))  # all of it waits in the kernel: nothing follows
            proto = Recorder()
            tr = MarkedTransport(loop, ssock, proto)
            tr.start()
            await until(lambda: len(proto.data) == sum(map(len, requests)))
            await turns()
            assert proto.data == b"".join(requests)
            with_data = [cb for cb in tr.callbacks() if "data" in cb]
            assert len(with_data) == 1, tr.callbacks()
            reads = with_data[0]
            assert reads == ["data"] * proto.chunks + ([] if has_pending else ["want"])
            assert proto.chunks > 1  # more than one record per read-ahead buffer, and more than one buffer
        finally:
            c.close()

    run(main)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
def test_data_sent_with_the_client_finished_is_delivered(run: Run, server_ctx: ssl.SSLContext, pki: Pki,
                                                        version: ssl.TLSVersion) -> None:
    """TLS 1.3: the client's Finished and its first request share a segment; the handshake's read-ahead pulls the
    request into OpenSSL, so start() must try a read before waiting for readiness."""
    async def main() -> None:
        proto = Recorder()
        ctx = pki.client_context(pki.clients["good"], tls_max=version)
        tr, c = await serve(server_ctx, ctx, proto, flush_handshake=False, first=(b"GET / HTTP/1.1\r\n\r\n",))
        try:
            await until(lambda: proto.data == b"GET / HTTP/1.1\r\n\r\n")
        finally:
            c.close()

    run(main)


# ---- endings ------------------------------------------------------------------------------------------------


def test_close_flushes_then_sends_close_notify(run: Run, server_ctx: ssl.SSLContext,
                                                client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        proto = Recorder()
        tr, c = await serve(server_ctx, client_ctx, proto, sndbuf=32768, rcvbuf=32768)
        try:
            payload = os.urandom(2 * 1024 * 1024)
            tr.write(payload)
            assert tr.get_write_buffer_size() > 0  # most of it is still ours to send
            tr.close()
            assert tr.is_closing()
            tr.write(b"ignored after close")
            assert not proto.lost.done()
            got = await in_thread(c.recv_to_end)  # raises on a reset or a FIN without close_notify
            assert got == payload
            assert await proto.lost is None
        finally:
            c.close()

    run(main)


def test_abort_resets_and_drops_buffered_data(run: Run, server_ctx: ssl.SSLContext,
                                              client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        proto = Recorder()
        tr, c = await serve(server_ctx, client_ctx, proto, sndbuf=32768, rcvbuf=32768)
        try:
            payload = os.urandom(2 * 1024 * 1024)
            tr.write(payload)
            tr.abort()
            assert tr.is_closing()
            assert await proto.lost is None

            def read_until_error() -> tuple[int, BaseException | None]:
                n = 0
                try:
                    while chunk := c.recv():
                        n += len(chunk)
                except (ssl.SSLError, OSError) as exc:
                    return n, exc
                return n, None  # a clean close_notify: wrong

            received, exc = await in_thread(read_until_error)
            assert isinstance(exc, ConnectionResetError), exc  # a TCP reset, not a FIN
            assert received < len(payload)  # what was still buffered was dropped
        finally:
            c.close()

    run(main)


REFUSAL = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"


class Refuse(Recorder):
    """Answers the first bytes with an error and closes lingering, as the proxy does for a refused upload."""

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.chunks == 1:
            assert self.transport is not None
            self.transport.write(REFUSAL)
            self.transport.close(linger=True)


def test_lingering_close_lets_the_client_keep_sending_then_ends_cleanly(
        run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        lingerer = Lingerer(asyncio.get_running_loop(), timeout=30)
        proto = Refuse()
        tr, c = await serve(server_ctx, client_ctx, proto, lingerer=lingerer)
        try:
            await in_thread(c.send, b"PUT /upload HTTP/1.1\r\n...")
            assert await proto.lost is None
            assert len(lingerer) == 1
            assert await in_thread(c.recv_exactly, len(REFUSAL)) == REFUSAL

            def upload_rest() -> None:  # still uploading after the answer: no reset may destroy the answer
                for _ in range(64):
                    c.send(b"b" * 16384)

            await in_thread(upload_rest)
            assert await in_thread(c.recv_to_end) == b""  # then close_notify, no reset
            c.close()
            await until(lambda: len(lingerer) == 0)  # the client's FIN ends the linger
        finally:
            c.close()
            lingerer.close_all()

    run(main)


def test_lingering_ends_after_its_budget(run: Run, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        lingerer = Lingerer(asyncio.get_running_loop(), timeout=30, budget=64 * 1024)
        proto = Refuse()
        tr, c = await serve(server_ctx, client_ctx, proto, lingerer=lingerer)
        try:
            await in_thread(c.send, b"x")
            await proto.lost

            def upload_forever() -> BaseException | None:
                try:
                    for _ in range(4096):  # up to 64 MiB: the reset comes long before
                        c.send(b"b" * 16384)
                except OSError as exc:
                    return exc
                return None

            assert isinstance(await in_thread(upload_forever), (ConnectionResetError, BrokenPipeError))
            assert len(lingerer) == 0
        finally:
            c.close()

    run(main)


def test_lingering_ends_after_its_timeout_and_close_all(run: Run, server_ctx: ssl.SSLContext,
                                                         client_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        short, long = Lingerer(loop, timeout=0.1), Lingerer(loop, timeout=3600)
        clients = []
        try:
            for lingerer in (short, long):
                proto = Refuse()
                tr, c = await serve(server_ctx, client_ctx, proto, lingerer=lingerer)
                clients.append(c)
                await in_thread(c.send, b"x")
                await proto.lost
                assert len(lingerer) == 1
            await until(lambda: len(short) == 0)  # a silent client does not hold the socket forever
            assert len(long) == 1
            long.close_all()
            assert len(long) == 0
            for c in clients:
                assert await in_thread(c.recv_to_end) == REFUSAL
        finally:
            for c in clients:
                c.close()

    run(main)


@pytest.mark.parametrize("keep_open", [False, True])
def test_close_notify_from_the_peer_calls_eof_received(run: Run, server_ctx: ssl.SSLContext,
                                                       client_ctx: ssl.SSLContext, keep_open: bool) -> None:
    async def main() -> None:
        proto = Recorder()
        proto.keep_open_on_eof = keep_open
        tr, c = await serve(server_ctx, client_ctx, proto)
        try:
            await in_thread(c.send, b"last words")
            await in_thread(c.close_notify)
            await until(lambda: proto.eofs)
            assert proto.eofs == 1 and proto.data == b"last words" and not tr.is_reading()
            if keep_open:  # the protocol may still answer (TLS 1.3 half-close), then close itself
                assert not tr.is_closing()
                tr.write(b"answer")
                tr.close()
            assert await proto.lost is None
            assert await in_thread(c.recv_to_end) == (b"answer" if keep_open else b"")
        finally:
            c.close()

    run(main)


def test_fin_without_close_notify_is_an_error_not_an_eof(run: Run, server_ctx: ssl.SSLContext,
                                                         client_ctx: ssl.SSLContext) -> None:
    """suppress_ragged_eofs=False: a truncating FIN must not look like a clean end (an upstream body cut short)."""
    async def main() -> None:
        proto = Recorder()
        tr, c = await serve(server_ctx, client_ctx, proto)
        try:
            await in_thread(c.send, b"partial")
            c.sock.shutdown(socket.SHUT_WR)
            exc = await proto.lost
            assert isinstance(exc, ssl.SSLEOFError), exc
            assert proto.eofs == 0 and proto.data == b"partial"
        finally:
            c.close()

    run(main)


# ---- handshake ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
@pytest.mark.parametrize("name, verify_code, alert", [
    ("other_ca_same_cn", 20, "TLSV1_ALERT_UNKNOWN_CA"),  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
    ("expired", 10, "SSLV3_ALERT_CERTIFICATE_EXPIRED"),  # X509_V_ERR_CERT_HAS_EXPIRED
    ("revoked", 23, "SSLV3_ALERT_CERTIFICATE_REVOKED"),  # X509_V_ERR_CERT_REVOKED
])
def test_handshake_raises_the_openssl_error_and_the_client_gets_the_alert(
        run: Run, server_ctx: ssl.SSLContext, pki: Pki, version: ssl.TLSVersion, name: str, verify_code: int,
        alert: str) -> None:
    async def main() -> None:
        ctx = pki.client_context(pki.clients[name], tls_max=version)
        seen: list[BaseException] = []
        ready = threading.Event()

        def connect(port: int) -> Client:
            c = Client(ctx, port)
            try:
                c.handshake()
                c.recv()  # TLS 1.3: the client finished first; the alert arrives as the answer
            except (ssl.SSLError, OSError) as exc:
                seen.append(exc)
            ready.set()
            return c

        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await accept_tls(server_ctx, connect)
        assert info.value.verify_code == verify_code
        await in_thread(ready.wait, 20)
        assert len(seen) == 1 and isinstance(seen[0], ssl.SSLError) and seen[0].reason == alert, seen

    run(main)


def test_handshake_without_a_client_certificate(run: Run, server_ctx: ssl.SSLContext, pki: Pki) -> None:
    async def main() -> None:
        ctx = pki.client_context(None)

        def connect(port: int) -> Client:
            c = Client(ctx, port)
            try:
                c.handshake()
                c.recv()
            except (ssl.SSLError, OSError):
                pass
            return c

        with pytest.raises(ssl.SSLError) as info:
            await accept_tls(server_ctx, connect)
        assert info.value.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"

    run(main)


@pytest.mark.parametrize("sends", [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],
                         ids=["silent", "half-a-client-hello"])
def test_handshake_times_out_on_a_silent_peer(run: Run, server_ctx: ssl.SSLContext, sends: bytes) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        peer = socket.create_connection(lsock.getsockname())
        try:
            peer.sendall(sends)
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            ssock = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False,
                                           suppress_ragged_eofs=False)
            try:
                with pytest.raises(TimeoutError):
                    await handshake(loop, ssock, 0.2)
                # The readiness callback went with the timeout: registering the fd again must work.
                fut = loop.create_future()
                loop.add_writer(ssock.fileno(), lambda: fut.done() or fut.set_result(None))
                await fut
                loop.remove_writer(ssock.fileno())
            finally:
                ssock.close()
        finally:
            peer.close()
            lsock.close()

    run(main)


def test_handshake_with_a_peer_that_is_not_tls(run: Run, server_ctx: ssl.SSLContext) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        peer = socket.create_connection(lsock.getsockname())
        try:
            peer.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            conn, _ = await loop.sock_accept(lsock)
            conn.setblocking(False)
            ssock = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False,
                                           suppress_ragged_eofs=False)
            try:
                with pytest.raises(ssl.SSLError):
                    await handshake(loop, ssock, 10)
            finally:
                ssock.close()
        finally:
            peer.close()
            lsock.close()

    run(main)
