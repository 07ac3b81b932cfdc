"""End-to-end: the partner certificate lifecycle on the admin port — ``GET /certs`` and
``mtls_proxy_client_cert_expiry_timestamp_seconds{rule}`` — through the real process, and with ``workers = 2``
through the supervisor (its admin port shows the certificates every worker saw).

Owns: two partners with different certificates (one of them rotating: two certificates, different notAfter) and
what the admin port reports about each rule; a refused certificate not reported; the same with two workers, where
the connections are spread over both processes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.e2e.kit import Ops, admin_addr, admin_request, eventually, scrape
from tests.e2e.test_workers import workers_of
from tests.harness import ProxyProcess, RawClient, get
from tests.pki import ClientCert, Pki

RULES = [{"name": "partner-a", "subject_cn": ["client-a"]}, {"name": "partner-b", "subject_cn": ["client-b"]}]
CLOSE = b"Connection: close\r\n"


def expected(pki: Pki, *names: str) -> list[dict[str, Any]]:
    certs: list[ClientCert] = [pki.clients[n] for n in names]
    certs.sort(key=lambda c: (c.leaf.not_valid_after_utc.timestamp(), c.fingerprint))
    return [{"subject": c.subject, "fingerprint": c.fingerprint, "serial": c.serial_hex,
             "not_after": c.leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
             "not_after_timestamp": c.leaf.not_valid_after_utc.timestamp()} for c in certs]


def without_last_seen(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {rule: [{k: v for k, v in e.items() if not k.startswith("last_seen")} for e in entries]
            for rule, entries in report["rules"].items()}


async def certs_of(proc: ProxyProcess) -> dict[str, Any]:
    reply = await admin_request(admin_addr(proc), "/certs")
    assert reply.status == 200 and reply.content_type == "application/json", reply
    return json.loads(reply.body)  # type: ignore[no-any-return]


async def one_request(ops: Ops, proc: ProxyProcess, name: str) -> int:
    c = await ops.client(proc.port, name)
    status = (await c.request(get("/lifecycle", extra=CLOSE))).status
    await c.close()
    return status


async def test_certs_and_expiry_metric_after_two_partners(pki: Pki, ops: Ops) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream(), rules=RULES))
    assert (await certs_of(proc))["rules"] == {}
    for name in ("good", "renewed", "other", "good"):  # partner A rotating (two certificates), partner B
        assert await one_request(ops, proc, name) == 200
    assert await one_request(ops, proc, "rsa") == 403  # no rule lets it in: not a certificate of any rule

    report = await certs_of(proc)
    assert without_last_seen(report) == {"partner-a": expected(pki, "good", "renewed"),
                                         "partner-b": expected(pki, "other")}
    assert report["dropped"] == 0
    good, renewed = pki.clients["good"], pki.clients["renewed"]
    assert good.leaf.not_valid_after_utc < renewed.leaf.not_valid_after_utc  # the test means something

    samples = await scrape(admin_addr(proc))
    metric = "mtls_proxy_client_cert_expiry_timestamp_seconds"
    assert samples.series(metric) == {
        frozenset({("rule", "partner-a")}): good.leaf.not_valid_after_utc.timestamp(),  # the earliest of the two
        frozenset({("rule", "partner-b")}): pki.clients["other"].leaf.not_valid_after_utc.timestamp()}
    assert samples.get("mtls_proxy_cert_tracking_dropped_total") == 0


def worker_holding(client: RawClient, proxy_port: int, kids: list[int]) -> int:
    """The worker process whose socket is the other end of ``client``'s connection (from /proc)."""
    client_port = client.writer.get_extra_info("sockname")[1]
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if (int(parts[1].rsplit(":", 1)[1], 16) == proxy_port
                    and int(parts[2].rsplit(":", 1)[1], 16) == client_port):
                inode = parts[9]
    assert inode is not None
    for kid in kids:
        for fd in os.listdir(f"/proc/{kid}/fd"):
            try:
                if os.readlink(f"/proc/{kid}/fd/{fd}") == f"socket:[{inode}]":
                    return kid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


async def test_two_workers_the_supervisor_shows_every_workers_certificates(pki: Pki, ops: Ops) -> None:
    proc = await ops.spawn(ops.config(await ops.upstream(), rules=RULES, server={"workers": 2}))
    kids = await workers_of(proc)
    # Each certificate is used on exactly one worker ("good" and "other" on the first, "renewed" on the second):
    # a connection the kernel gave to the other worker is closed before any request, so that worker never
    # records it.  Only a supervisor that merges both workers can then show all three.
    placement = {"good": kids[0], "other": kids[0], "renewed": kids[1]}
    held: list[RawClient] = []
    for name, kid in placement.items():
        for _ in range(50):
            c = await ops.client(proc.port, name)
            if worker_holding(c, proc.port, kids) == kid:
                assert (await c.request(get("/lifecycle"))).status == 200
                held.append(c)
                break
            await c.close()
        else:
            raise AssertionError(f"no connection of {name} reached worker {kid} in 50 tries")

    want = {"partner-a": expected(pki, "good", "renewed"), "partner-b": expected(pki, "other")}

    async def merged() -> bool:
        return without_last_seen(await certs_of(proc)) == want

    await eventually(merged, timeout=10)  # the supervisor polls the workers about twice a second
    samples = await scrape(admin_addr(proc))
    assert samples.get("mtls_proxy_client_cert_expiry_timestamp_seconds", rule="partner-a") == \
        pki.clients["good"].leaf.not_valid_after_utc.timestamp()
    assert samples.get("mtls_proxy_client_cert_expiry_timestamp_seconds", rule="partner-b") == \
        pki.clients["other"].leaf.not_valid_after_utc.timestamp()
    for c in held:
        await c.close()
