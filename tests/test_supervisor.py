"""supervisor: the control channel between the supervisor and a worker, over a real socketpair on a real loop.

WorkerControl (the worker side) answers every request byte with a length-prefixed JSON snapshot; Worker.poll (the
supervisor side) asks, reads the answer, and keeps the last good metrics when the worker does not answer.  The
worker process itself is stood in for by an object with a ``returncode`` (poll only looks at that); starting real
workers is covered end to end in tests/e2e/test_workers.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from proxy.cert_tracker import CertTable
from proxy.metrics import Metrics
from proxy.supervisor import Worker, WorkerControl

LEN = struct.Struct("!I")


class Channel:
    """A socketpair wired as the supervisor wires it: ``worker`` is a Worker, ``control`` the worker's side."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        parent, child = socket.socketpair()
        parent.setblocking(False)
        self.state: dict[str, Any] = {"ready": True, "metrics": Metrics()}
        self.answers = 0
        self.fulls = 0
        self.control = WorkerControl(child.detach(), self.snapshot)
        self.worker = Worker(0)
        self.worker.control = parent
        self.worker.proc = SimpleNamespace(returncode=None)  # type: ignore[assignment]
        self.listening = False

    def snapshot(self, full: bool = False) -> dict[str, Any]:
        self.answers += 1
        self.fulls += full
        return {"ready": self.state["ready"], "metrics": self.state["metrics"].snapshot()}

    def start(self) -> None:
        self.control.start(self.loop)
        self.listening = True

    def stop_answering(self) -> None:
        self.loop.remove_reader(self.control.sock.fileno())
        self.listening = False

    def close(self) -> None:
        self.worker.close()
        if self.control.sock.fileno() >= 0:
            self.control.close(self.loop)


@pytest.fixture
async def channel() -> AsyncIterator[Channel]:
    ch = Channel(asyncio.get_running_loop())
    ch.start()
    yield ch
    ch.close()


async def read_frame(sock: socket.socket) -> Any:
    loop = asyncio.get_running_loop()
    buf = b""
    async with asyncio.timeout(10):
        while len(buf) < LEN.size:
            buf += await loop.sock_recv(sock, LEN.size - len(buf))
        (n,) = LEN.unpack(buf)
        body = b""
        while len(body) < n:
            body += await loop.sock_recv(sock, n - len(body))
    return json.loads(body)


async def test_poll_gets_the_workers_snapshot(channel: Channel) -> None:
    m: Metrics = channel.state["metrics"]
    m.request("GET", 200, "partner-a", 0.01, 0.005)
    m.connections_active = 3
    answer = await channel.worker.poll()
    assert answer == {"ready": True, "metrics": json.loads(json.dumps(m.snapshot()))}
    assert channel.worker.last == answer


async def test_each_poll_is_a_fresh_snapshot(channel: Channel) -> None:
    m: Metrics = channel.state["metrics"]
    seen = []
    for n in range(5):
        m.connections_total = n
        channel.state["ready"] = n % 2 == 0
        answer = await channel.worker.poll()
        seen.append((answer["ready"], answer["metrics"]["connections_total"]))
    assert seen == [(True, 0), (False, 1), (True, 2), (False, 3), (True, 4)]
    assert channel.answers == 5


async def test_every_request_byte_gets_one_length_prefixed_answer(channel: Channel) -> None:
    parent = channel.worker.control
    assert parent is not None
    parent.send(b"???")  # three requests in one segment
    frames = [await read_frame(parent) for _ in range(3)]
    assert all(f["ready"] is True and "requests" in f["metrics"] for f in frames)


async def test_a_large_snapshot_arrives_whole(channel: Channel) -> None:
    m: Metrics = channel.state["metrics"]
    for status in range(100, 600):  # ~500 label sets x 8 rules: a snapshot of well over 64 KiB
        for rule in range(8):
            m.request("GET", status, f"rule-{rule}", 0.01, None)
    answer = await channel.worker.poll()
    assert len(json.dumps(answer)) > 65536
    assert len(answer["metrics"]["requests"]) == 500 * 8


async def test_a_silent_worker_keeps_the_last_good_metrics_and_is_not_ready(channel: Channel) -> None:
    m: Metrics = channel.state["metrics"]
    m.connections_total = 7
    good = await channel.worker.poll()
    assert good["ready"] is True
    channel.stop_answering()  # e.g. its event loop is blocked
    answer = await channel.worker.poll(timeout=0.2)
    assert answer == {"ready": False, "metrics": good["metrics"]}
    assert channel.worker.last == good


async def test_a_late_answer_is_not_taken_for_the_next_one(channel: Channel) -> None:
    """After a poll gave up, the worker's late answer to it must not be read as the answer to a later poll."""
    channel.stop_answering()
    channel.state["ready"] = True
    assert (await channel.worker.poll(timeout=0.2))["ready"] is False  # gave up; the "?" stays queued
    channel.start()  # the worker recovers and answers the old request too
    await asyncio.sleep(0.05)
    channel.state["ready"] = False  # ... then starts draining
    assert (await channel.worker.poll())["ready"] is False
    channel.state["ready"] = True
    assert (await channel.worker.poll())["ready"] is True


async def test_a_closed_channel_is_not_ready_and_keeps_the_last_metrics(channel: Channel) -> None:
    good = await channel.worker.poll()
    channel.control.close(channel.loop)  # the worker went away
    answer = await channel.worker.poll()
    assert answer == {"ready": False, "metrics": good["metrics"]}


async def test_an_exited_worker_is_not_asked(channel: Channel) -> None:
    good = await channel.worker.poll()
    channel.worker.proc.returncode = 1  # type: ignore[union-attr]
    answer = await channel.worker.poll()
    assert answer == {"ready": False, "metrics": good["metrics"]}
    assert channel.answers == 1


async def test_a_worker_not_started_is_not_ready() -> None:
    assert await Worker(3).poll() == {"ready": False, "metrics": None}


async def test_garbage_from_the_worker_is_not_ready(channel: Channel) -> None:
    good = await channel.worker.poll()
    channel.stop_answering()
    raw = channel.control.sock
    raw.setblocking(True)
    payload = b"{not json"
    raw.sendall(LEN.pack(len(payload)) + payload)
    raw.setblocking(False)
    answer = await channel.worker.poll(timeout=1)
    assert answer == {"ready": False, "metrics": good["metrics"]}
    channel.start()  # the next answers are good again: the garbage does not stick
    assert (await channel.worker.poll())["ready"] is True
    assert (await channel.worker.poll())["ready"] is True


async def test_control_stops_listening_when_the_supervisor_goes_away(channel: Channel) -> None:
    channel.worker.close()  # the supervisor closed its end
    fd = channel.control.sock.fileno()
    selector = channel.loop._selector  # type: ignore[attr-defined]  # the default (selector) loop's registrations
    async with asyncio.timeout(10):
        while fd in selector.get_map():  # WorkerControl removes its reader at EOF: no readable-forever spin
            await asyncio.sleep(0.01)
    assert channel.answers == 0


# ---- certificate changes ride on the same answers (proxy.cert_tracker) -----------------------------------------


class CertChannel(Channel):
    """A channel whose worker side also answers with its certificate table's changes, as server.run() wires it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.table = CertTable()

    def snapshot(self, full: bool = False) -> dict[str, Any]:
        answer = super().snapshot(full)
        answer["certs"] = self.table.changes(full)
        return answer


@pytest.fixture
async def cert_channel() -> AsyncIterator[CertChannel]:
    ch = CertChannel(asyncio.get_running_loop())
    ch.start()
    yield ch
    ch.close()


async def test_certificates_arrive_as_changes_after_one_full_table(cert_channel: CertChannel) -> None:
    merged = CertTable()
    cert_channel.table.seen("partner-a", "fp-a", "CN=a", "0A", 2e9, 1e9)
    await cert_channel.worker.poll(merged)
    assert cert_channel.fulls == 1  # a new worker: the whole table first
    assert [e.fingerprint for e in merged] == ["fp-a"]
    cert_channel.table.seen("partner-b", "fp-b", "CN=b", "0B", 2e9, 1e9 + 1)
    answer = await cert_channel.worker.poll(merged)
    assert cert_channel.fulls == 1 and "certs" not in answer  # then only changes; the feed is not kept in .last
    assert sorted(e.fingerprint for e in merged) == ["fp-a", "fp-b"]


async def test_a_lost_answer_is_repaired_with_a_full_table(cert_channel: CertChannel) -> None:
    merged = CertTable()
    await cert_channel.worker.poll(merged)
    cert_channel.stop_answering()
    cert_channel.table.seen("partner-a", "fp-lost", "CN=l", "01", 2e9, 1e9)
    assert (await cert_channel.worker.poll(merged, timeout=0.2))["ready"] is False  # gave up waiting
    cert_channel.start()  # the worker answers the old request late: that answer is discarded unread
    await asyncio.sleep(0.05)
    await cert_channel.worker.poll(merged)  # numbering gap noticed
    await cert_channel.worker.poll(merged)  # ... so this one asked for the whole table
    assert cert_channel.fulls == 2
    assert [e.fingerprint for e in merged] == ["fp-lost"]
