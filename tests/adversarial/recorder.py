"""A strict, recording HTTPS origin in its own thread: what did the proxy really send upstream?

Owns: a TLS server (the test PKI's upstream certificate) on its own event loop in a daemon thread, an HTTP/1.1
request reader written independently of ``proxy.wire.http1`` and stricter than any real origin, and a record of
every upstream connection and every request on it:

* ``Received(kind="request")``: a complete, well-formed request (method, target, header lines, body);
* ``kind="incomplete"``: the connection ended inside a request (head or body): what a correctly aborted upload
  looks like from the origin's side;
* ``kind="anomaly"``: bytes that are not a valid request (two framing headers, a bare LF, bytes after a body,
  bytes while a response is pending...): what a desync or a dirty reused connection looks like.

Answers by target (after one optional stage segment, like ``/prod``): ``/hold/...`` waits until the test calls
``release()`` (a client "waiting for the upstream"), ``/big/<n>/...`` sends ``n`` bytes, anything else a small 200
whose body is the target.  Keep-alive, so the proxy
pools these connections like it pools API Gateway's.

Must not: tolerate anything a strict origin would refuse (a lenient reader would hide a smuggled request), or share
the test's event loop (the proxy under test is a separate process; tests of any scope can use one recorder).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from dataclasses import dataclass, field
from typing import Literal

from tests.pki import Pki

# RFC 9112 §3 / RFC 9110 §5.6.2, restated here on purpose (not imported from the proxy): origin-form only, and the
# proxy always speaks HTTP/1.1 upstream.
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") (/[!-~]*) HTTP/1\.1")
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*((?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
MAX_HEAD = 256 * 1024
BIG_PIECE = 64 * 1024

Kind = Literal["request", "incomplete", "anomaly"]


@dataclass(frozen=True, slots=True)
class Received:
    conn: int  # upstream connection number, from 1 in accept order
    kind: Kind
    method: str = ""
    target: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    detail: str = ""  # why incomplete / anomalous, with the first bytes

    def header(self, name: str) -> list[str]:
        n = name.lower()
        return [v for k, v in self.headers if k == n]


@dataclass(slots=True)
class Connection:
    id: int
    requests: int = 0
    end: str = "open"  # "eof", "reset", "closed-while-holding", "anomaly", "stopped"


class _Broken(Exception):
    """The byte stream is not a valid request: recorded as an anomaly, the connection is dropped."""


class _Ended(Exception):
    """The peer closed (``how``) before the current request was complete."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


@dataclass
class RecordingUpstream:
    pki: Pki
    port: int = 0  # 0: any free port; a fixed port lets a test start the upstream after the proxy
    _records: list[Received] = field(default_factory=list)
    _conns: list[Connection] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _gate: asyncio.Event | None = None
    _holding: int = 0
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _error: BaseException | None = None
    _bytes: int = 0

    # -- lifecycle (called from the test's thread) ---------------------------------------------------------------
    def start(self) -> RecordingUpstream:
        ready = threading.Event()
        ctx = self.pki.upstream_server_context("good")

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._gate = asyncio.Event()
                self._gate.set()
                server = loop.run_until_complete(
                    asyncio.start_server(self._on_conn, "127.0.0.1", self.port, ssl=ctx, backlog=1024))
                self.port = server.sockets[0].getsockname()[1]
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread below
                self._error = exc
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            server.close()
            for w in list(self._writers):
                w.transport.abort()
            loop.run_until_complete(server.wait_closed())
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=5))
            loop.close()

        self._thread = threading.Thread(target=run, name="recording-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self._error is not None:
            raise RuntimeError(f"recording upstream did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- what the test reads -------------------------------------------------------------------------------------
    def mark(self) -> int:
        with self._lock:
            return len(self._records)

    def since(self, mark: int = 0) -> list[Received]:
        with self._lock:
            return list(self._records[mark:])

    def connections(self) -> list[Connection]:
        with self._lock:
            return [Connection(c.id, c.requests, c.end) for c in self._conns]

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self._conns if c.end == "open")

    def bytes_received(self) -> int:
        """Every request byte read so far, on all connections (to wait until an upload is under way)."""
        with self._lock:
            return self._bytes

    @property
    def holding(self) -> int:
        return self._holding

    def hold(self) -> None:
        """From now on ``/hold/...`` requests wait for ``release()``."""
        assert self._loop is not None and self._gate is not None
        done = threading.Event()
        self._loop.call_soon_threadsafe(lambda: (self._gate.clear(), done.set()))  # type: ignore[union-attr]
        done.wait(5)

    def release(self) -> None:
        assert self._loop is not None and self._gate is not None
        self._loop.call_soon_threadsafe(self._gate.set)

    # -- the server (upstream thread) ----------------------------------------------------------------------------
    def _add(self, rec: Received) -> None:
        with self._lock:
            self._records.append(rec)

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            conn = Connection(len(self._conns) + 1)
            self._conns.append(conn)
        self._writers.add(writer)
        buf = bytearray()
        try:
            while True:
                if not buf and not await self._fill(reader, buf, allow_eof=True):
                    conn.end = "eof"
                    return
                try:
                    rec = await self._read_request(reader, buf, conn.id)
                except _Ended as end:
                    self._add(Received(conn.id, "incomplete", detail=f"{end.how} after {bytes(buf[:200])!r}"))
                    conn.end = end.how
                    return
                except _Broken as exc:
                    self._add(Received(conn.id, "anomaly", detail=f"{exc}: {bytes(buf[:200])!r}"))
                    conn.end = "anomaly"
                    return
                self._add(rec)
                with self._lock:
                    conn.requests += 1
                if not await self._answer(rec, reader, writer, buf, conn):
                    return
        except _Ended as end:
            conn.end = end.how
        except Exception as exc:  # noqa: BLE001 - a recorder bug must fail the test, not vanish in a log
            self._add(Received(conn.id, "anomaly", detail=f"recorder error {exc!r}"))
            conn.end = "anomaly"
        finally:
            self._writers.discard(writer)
            if conn.end == "open":
                conn.end = "stopped"
            writer.transport.abort()

    async def _answer(self, rec: Received, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      buf: bytearray, conn: Connection) -> bool:
        parts = rec.target.split("?")[0].split("/")[1:]
        if parts and parts[0] not in ("hold", "big"):
            parts = parts[1:]  # the stage prefix the proxy adds (upstream.url's path)
        if parts and parts[0] == "hold":
            assert self._gate is not None
            self._holding += 1
            try:
                still_open = await _wait_gate(self._gate, reader, buf)
            finally:
                self._holding -= 1
            if buf:
                self._add(Received(conn.id, "anomaly", detail=f"bytes while a response was pending: {bytes(buf)!r}"))
                conn.end = "anomaly"
                return False
            if not still_open:
                conn.end = "closed-while-holding"
                return False
        if len(parts) > 1 and parts[0] == "big" and parts[1].isdigit():
            n = int(parts[1])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % n)
            sent = 0
            while sent < n:
                piece = min(BIG_PIECE, n - sent)
                writer.write(b"x" * piece)
                sent += piece
                try:
                    await writer.drain()
                except (ConnectionError, ssl.SSLError):
                    conn.end = "reset"
                    return False
            return True
        body = rec.target.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            await writer.drain()
        except (ConnectionError, ssl.SSLError):
            conn.end = "reset"
            return False
        return True


    async def _fill(self, reader: asyncio.StreamReader, buf: bytearray, allow_eof: bool = False) -> bool:
        """Append the next bytes; False on a clean EOF where allowed, else ``_Ended``."""
        try:
            data = await reader.read(65536)
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            raise _Ended("reset") from exc
        if not data:
            if allow_eof:
                return False
            raise _Ended("eof")
        buf += data
        with self._lock:
            self._bytes += len(data)
        return True

    async def _read_request(self, reader: asyncio.StreamReader, buf: bytearray, conn: int) -> Received:
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > MAX_HEAD:
                raise _Broken("head too long")
            await self._fill(reader, buf)
        head = bytes(buf[:end])
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            raise _Broken("bad request line")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            f = _FIELD.fullmatch(line)
            if f is None:
                raise _Broken(f"bad header line {line[:80]!r}")
            headers.append((f.group(1).decode().lower(), f.group(2).decode("latin-1")))
        names = [k for k, _ in headers]
        if names.count("host") != 1:
            raise _Broken("not exactly one Host")
        cls = [v for k, v in headers if k == "content-length"]
        tes = [v for k, v in headers if k == "transfer-encoding"]
        if len(cls) > 1 or len(tes) > 1 or (cls and tes):
            raise _Broken("ambiguous framing")
        if tes and tes[0] != "chunked":
            raise _Broken(f"transfer-encoding {tes[0]!r}")
        if cls and not cls[0].isdigit():
            raise _Broken(f"content-length {cls[0]!r}")
        del buf[:end + 4]
        body = bytearray()
        if cls:
            n = int(cls[0])
            while len(buf) < n:
                await self._fill(reader, buf)
            body += buf[:n]
            del buf[:n]
        elif tes:
            while True:
                while (eol := buf.find(b"\r\n")) < 0:
                    if len(buf) > 64:
                        raise _Broken("chunk size line too long")
                    await self._fill(reader, buf)
                size_line = bytes(buf[:eol])
                if _CHUNK_SIZE.fullmatch(size_line) is None:
                    raise _Broken(f"bad chunk size {size_line!r}")  # the proxy re-frames: never an extension
                size = int(size_line, 16)
                while len(buf) < eol + 2 + size + 2:
                    await self._fill(reader, buf)
                if buf[eol + 2 + size:eol + 4 + size] != b"\r\n":
                    raise _Broken("chunk data not followed by CRLF")
                body += buf[eol + 2:eol + 2 + size]
                del buf[:eol + 4 + size]
                if size == 0:
                    # the last chunk's CRLF was the empty trailer section: the proxy never forwards trailers
                    break
        return Received(conn, "request", m.group(1).decode(), m.group(2).decode(), tuple(headers), bytes(body))


async def _wait_gate(gate: asyncio.Event, reader: asyncio.StreamReader, buf: bytearray) -> bool:
    """Wait for the gate; False if the connection ended first.  Bytes arriving meanwhile go into ``buf``."""
    opened = asyncio.ensure_future(gate.wait())
    read = asyncio.ensure_future(reader.read(65536))
    try:
        done, _ = await asyncio.wait({opened, read}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        if read in done:
            try:
                data = read.result()
            except (ConnectionError, ssl.SSLError, OSError):
                return False
            buf += data
            return bool(data) and opened in done
        return True
    finally:
        for t in (opened, read):
            t.cancel()
        await asyncio.gather(opened, read, return_exceptions=True)
