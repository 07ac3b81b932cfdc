"""Measuring one running target: its CPU and memory from /proc, and the load generators (wrk, ab, curl).

Owns: reading /proc (a process tree's CPU time, VmRSS/VmHWM, resetting the peak), the machine-wide CPU figure
that tells how busy *other* processes were (noise), running one generator pinned to the generator CPUs and
turning its output into numbers, and the four phases (keep-alive, handshakes, upload, download).

Must not: start or stop targets or the upstream (``run.py`` does), print tables (``report.py``), or judge the
figures against the issue's targets.  Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAYLOAD_BYTES = 10_000_000  # "10 MB" in both directions; MB/s below is 10^6 bytes per second


# --- /proc ------------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2:].split()


def process_tree(root: int | None) -> list[int]:
    """``root`` and all its descendants that are alive now (nginx workers, mtls-proxy worker processes)."""
    if not root:
        return []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime (proc(5) fields 14 and 15) summed over ``pids``."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def memory_kb(pids: Sequence[int], field: str) -> tuple[int, int]:
    """(sum, largest single process) of a /proc/PID/status field such as VmRSS or VmHWM, in kB."""
    total = largest = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        value = int(line.split()[1])
                        total += value
                        largest = max(largest, value)
        except OSError:
            pass
    return total, largest


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0), so the peak is this run's."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def io_syscalls(pids: Sequence[int]) -> tuple[int, int]:
    """(read-family, write-family) system calls so far (/proc/PID/io syscr, syscw), summed over ``pids``."""
    reads = writes = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                for line in f:
                    if line.startswith("syscr:"):
                        reads += int(line.split()[1])
                    elif line.startswith("syscw:"):
                        writes += int(line.split()[1])
        except OSError:
            pass  # not ours to read (another user's process), or gone
    return reads, writes


def machine_busy_seconds() -> float:
    """user + nice + system time of all CPUs (/proc/stat); interrupts are left out, as in process CPU time."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return (values[0] + values[1] + values[2]) / CLK_TCK


# --- generators -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ToolRun:
    rc: int
    output: str
    cpu_s: float  # CPU time of the generator process itself (from wait4), so it can be told apart from noise


def run_tool(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> ToolRun:
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                rc = -9
                break
            time.sleep(0.02)
        proc.returncode = rc  # already reaped: keep Popen from waiting again
        out.seek(0)
        return ToolRun(rc, out.read().decode(errors="replace"), usage.ru_utime + usage.ru_stime)


@dataclass(frozen=True, slots=True)
class Client:
    """What every generator needs to reach a target: where, with which certificate, pinned where."""

    host: str
    port: int
    pki: str  # directory from `mtls-proxy certs init` (+ client.pem)
    shim: str  # the compiled tools/client_cert_shim.c
    gen_cpus: str | None
    tls_max: str = "1.2"

    def pinned(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", self.gen_cpus, *argv] if self.gen_cpus else argv

    def url(self, path: str) -> str:
        return f"https://{self.host}:{self.port}{path}"

    def curl(self, *, cert: bool = True) -> list[str]:
        argv = ["curl", "-sS", "--max-time", "120", "--cacert", os.path.join(self.pki, "server-ca.crt"),
                "--tlsv1.2", "--tls-max", self.tls_max]
        if cert:
            argv += ["--cert", os.path.join(self.pki, "client.crt"), "--key", os.path.join(self.pki, "client.key")]
        return argv

    def wrk_env(self) -> dict[str, str]:
        return dict(os.environ, LD_PRELOAD=self.shim, MTLS_BENCH_CERT=os.path.join(self.pki, "client.crt"),
                    MTLS_BENCH_KEY=os.path.join(self.pki, "client.key"), MTLS_BENCH_TLS_MAX=self.tls_max)


# --- accounting -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PhaseCost:
    cpu_s: float  # target process tree, utime + stime
    io_calls: int  # target process tree, read-family + write-family system calls


def accounted(target: Callable[[], list[int]], upstream: Callable[[], list[int]],
              work: Callable[[], tuple[dict[str, object], float]]) -> tuple[dict[str, object], PhaseCost]:
    """Run ``work`` (returns its figures and the generator's CPU seconds), add the CPU picture of the phase,
    and return the figures with what the phase cost the target.

    ``other_pct`` is CPU used by processes that are neither the target, the upstream, the generator nor this
    harness, as a percentage of all CPUs over the phase: other engineers' test suites on a shared machine.
    """
    t_pids, u_pids = set(target()), set(upstream())
    busy0, t0, u0, me0, wall0 = (machine_busy_seconds(), cpu_seconds(list(t_pids)), cpu_seconds(list(u_pids)),
                                 os.times(), time.monotonic())
    sys0 = io_syscalls(list(t_pids))
    result, gen_cpu = work()
    wall = time.monotonic() - wall0
    t_all = list(t_pids | set(target()))  # workers started meanwhile count from zero
    t_cpu = cpu_seconds(t_all) - t0
    sys1 = io_syscalls(t_all)
    u_cpu = cpu_seconds(list(u_pids)) - u0
    me1 = os.times()
    harness = (me1.user - me0.user) + (me1.system - me0.system)
    other = max(0.0, machine_busy_seconds() - busy0 - t_cpu - u_cpu - gen_cpu - harness)
    ncpu = os.cpu_count() or 1
    result.update({
        "wall_s": round(wall, 2), "cpu_target_s": round(t_cpu, 3), "cpu_upstream_s": round(u_cpu, 3),
        "cpu_gen_s": round(gen_cpu, 3), "target_read_calls": sys1[0] - sys0[0],
        "target_write_calls": sys1[1] - sys0[1], "target_core_util": round(t_cpu / wall, 2) if wall else None,
        "other_pct": round(100 * other / (wall * ncpu), 1) if wall else None,
    })
    return result, PhaseCost(t_cpu, sys1[0] - sys0[0] + sys1[1] - sys0[1])


def _per(amount: float, count: object, scale: float) -> float | None:
    """``amount`` per unit of work (CPU µs per request: scale 1e6), or None when nothing was done."""
    return round(scale * amount / count, 2) if isinstance(count, int) and count > 0 else None


def _prefixed(prefix: str, figures: dict[str, object]) -> dict[str, object]:
    return {k if k.startswith(prefix) else prefix + k: v for k, v in figures.items()}


# --- keep-alive: wrk --------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> dict[str, object]:
    """Figures from `wrk --latency` output (no Lua script needed); raises ValueError when it has none."""
    m = re.search(r"^\s*(\d+) requests in ([\d.]+(?:us|ms|s|m)),", output, re.M)
    if m is None:
        raise ValueError("no request count in wrk output")
    requests, seconds = int(m.group(1)), _ms(m.group(2)) / 1e3
    pct = {p: _ms(v) for p, v in re.findall(r"^\s*(50|75|90|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", output, re.M)}
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = (sum(int(x) for x in sock.groups()) if sock else 0) + (int(non2xx.group(1)) if non2xx else 0)
    return {"requests": requests, "rps": round(requests / seconds, 1) if seconds else None, "errors": errors,
            "p50_ms": pct.get("50"), "p90_ms": pct.get("90"), "p99_ms": pct.get("99")}


def phase_keepalive(client: Client, target: Callable[[], list[int]], upstream: Callable[[], list[int]],
                    conns: int, seconds: float, warmup: float) -> dict[str, object]:
    def wrk(secs: float) -> list[str]:
        return client.pinned(["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(secs))}s", "--timeout", "10s",
                              "--latency", client.url("/")])

    if warmup > 0:  # fills the upstream pools and the allocator; not recorded
        run_tool(wrk(warmup), warmup + 60, client.wrk_env())

    def work() -> tuple[dict[str, object], float]:
        run = run_tool(wrk(seconds), seconds + 60, client.wrk_env())
        try:
            figures = parse_wrk(run.output)
        except ValueError:
            return {"ok": False, "failure": f"wrk rc={run.rc}: {run.output[-500:]}"}, run.cpu_s
        figures["ok"] = run.rc == 0 and figures["errors"] == 0 and figures["requests"] != 0
        if not figures["ok"]:
            figures["failure"] = f"wrk rc={run.rc}, {figures['errors']} errors"
        return figures, run.cpu_s

    r, cost = accounted(target, upstream, work)
    r["cpu_us_per_req"] = _per(cost.cpu_s, r.get("requests"), 1e6)
    # read + write family calls per request: a proxy needs at least 2 + 2 (client side and upstream side).
    r["io_calls_per_req"] = _per(cost.io_calls, r.get("requests"), 1.0)
    return _prefixed("ka_", r)


# --- full handshakes: ab without -k -----------------------------------------------------------------------
def parse_ab(output: str) -> dict[str, object]:
    def number(pattern: str) -> float | None:
        m = re.search(pattern, output, re.M)
        return float(m.group(1)) if m else None

    done = int(number(r"^Complete requests:\s+(\d+)") or 0)
    failed = int(number(r"^Failed requests:\s+(\d+)") or 0)
    non2xx = int(number(r"^Non-2xx responses:\s+(\d+)") or 0)
    taken = number(r"^Time taken for tests:\s+([\d.]+)")
    tls = re.search(r"^SSL/TLS Protocol:\s+(\S+)", output, re.M)
    pct = dict(re.findall(r"^\s*(50|90|99)%\s+(\d+)", output, re.M))
    return {"requests": done, "failed": failed, "non2xx": non2xx,
            "cps": round(done / taken, 1) if taken else None, "tls": tls.group(1) if tls else None,
            "p50_ms": float(pct["50"]) if "50" in pct else None,
            "p99_ms": float(pct["99"]) if "99" in pct else None}


def phase_handshakes(client: Client, target: Callable[[], list[int]], upstream: Callable[[], list[int]],
                     conns: int, seconds: float) -> dict[str, object]:
    """ab opens a new connection with a new SSL object for every request and never offers a session, so each
    request is one full TLS 1.2 handshake with the client certificate, one GET and a close."""

    def work() -> tuple[dict[str, object], float]:
        argv = client.pinned(["ab", "-q", "-r", "-c", str(conns), "-t", str(max(1, round(seconds))),
                              "-n", "10000000", "-E", os.path.join(client.pki, "client.pem"),
                              "-f", "TLS1.2", client.url("/")])
        run = run_tool(argv, seconds + 60)
        figures = parse_ab(run.output)
        figures["ok"] = (run.rc == 0 and figures["requests"] != 0 and figures["failed"] == 0
                         and figures["non2xx"] == 0)
        if not figures["ok"]:
            figures["failure"] = f"ab rc={run.rc}: {run.output[-500:]}"
        return figures, run.cpu_s

    r, cost = accounted(target, upstream, work)
    r["cpu_us_per_conn"] = _per(cost.cpu_s, r.get("requests"), 1e6)
    r["io_calls_per_conn"] = _per(cost.io_calls, r.get("requests"), 1.0)
    return _prefixed("hs_", r)


# --- 10 MB transfers: curl --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Payload:
    path: str
    sha256: str
    md5: str


def make_payload(path: str) -> Payload:
    """The same 10,000,000 pseudo-random bytes on every run (incompressible, reproducible)."""
    if not (os.path.exists(path) and os.path.getsize(path) == PAYLOAD_BYTES):
        data = hashlib.shake_256(b"mtls-proxy bench payload").digest(PAYLOAD_BYTES)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    with open(path, "rb") as f:
        data = f.read()
    return Payload(path, hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())


_CURL_TIMES = "\n%{http_code} %{size_download} %{size_upload} %{time_pretransfer} %{time_total}"


def _one_transfer(client: Client, payload: Payload, direction: str, scratch: str) -> tuple[float | None, str, float]:
    """(MB/s or None, failure text, generator CPU seconds) of one 10 MB transfer, its content checked."""
    body = os.path.join(scratch, "transfer.out")
    if direction == "down":
        argv = client.curl() + ["-o", body, "-w", _CURL_TIMES, client.url("/large")]
    else:
        # "Expect:" switches off curl's 100-continue wait, which NGINX answers at once but would cost a
        # round trip; the data path is what is measured here.
        argv = client.curl() + ["-X", "POST", "--data-binary", "@" + payload.path, "-H", "Expect:",
                                "-H", "Content-Type: application/octet-stream", "-o", body, "-w", _CURL_TIMES,
                                client.url("/upload")]
    run = run_tool(client.pinned(argv), 150)
    try:
        code, size_down, size_up, pre, total = run.output.strip().splitlines()[-1].split()
    except (ValueError, IndexError):
        return None, f"curl rc={run.rc}: {run.output[-300:]}", run.cpu_s
    if run.rc != 0 or code != "200":
        return None, f"curl rc={run.rc}, HTTP {code}", run.cpu_s
    if direction == "down":
        with open(body, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if int(size_down) != PAYLOAD_BYTES or digest != payload.sha256:
            return None, f"download damaged: {size_down} bytes, sha256 {digest[:16]}...", run.cpu_s
    else:
        try:
            with open(body) as f:
                seen = json.load(f)
        except (OSError, ValueError):
            return None, "upload: upstream reply is not JSON", run.cpu_s
        if int(float(size_up)) != PAYLOAD_BYTES or seen != {"bytes": PAYLOAD_BYTES, "md5": payload.md5}:
            return None, f"upload damaged: upstream saw {seen}", run.cpu_s
    seconds = float(total) - float(pre)  # the transfer itself: connection and handshake excluded
    return (PAYLOAD_BYTES / 1e6 / seconds if seconds > 0 else None), "", run.cpu_s


def phase_bulk(client: Client, target: Callable[[], list[int]], upstream: Callable[[], list[int]],
               payload: Payload, direction: str, seconds: float, scratch: str,
               min_transfers: int = 3, max_transfers: int = 40) -> dict[str, object]:
    """Sequential 10 MB transfers for ``seconds`` (at least ``min_transfers``); median MB/s of the good ones."""

    def work() -> tuple[dict[str, object], float]:
        rates: list[float] = []
        failures: list[str] = []
        gen_cpu, n, start = 0.0, 0, time.monotonic()
        while n < max_transfers and (n < min_transfers or time.monotonic() - start < seconds):
            n += 1
            rate, failure, cpu = _one_transfer(client, payload, direction, scratch)
            gen_cpu += cpu
            if rate is None:
                failures.append(failure)
            else:
                rates.append(rate)
        figures: dict[str, object] = {
            "transfers": n, "good": len(rates), "bad": len(failures), "ok": bool(rates) and not failures,
            "MBps": round(statistics.median(rates), 1) if rates else None,
            "MBps_min": round(min(rates), 1) if rates else None,
            "MBps_max": round(max(rates), 1) if rates else None,
        }
        if failures:
            figures["failure"] = failures[0]
        return figures, gen_cpu

    r, cost = accounted(target, upstream, work)
    good = r.get("good")
    r["cpu_ms_per_MB"] = _per(cost.cpu_s, good * PAYLOAD_BYTES // 1_000_000 if isinstance(good, int) else None, 1e3)
    return _prefixed(f"{direction}_", r)


# --- preflight --------------------------------------------------------------------------------------------
def preflight(client: Client, expected_body: bytes) -> tuple[bool, str, str]:
    """(GET / with the certificate returns 200 and the exact body, failure text, what happens without one)."""
    ok_run = subprocess.run(client.curl() + ["-o", "-", "-w", "\n%{http_code}", client.url("/")],
                            capture_output=True, timeout=60)
    body, _, code = ok_run.stdout.rpartition(b"\n")
    ok = ok_run.returncode == 0 and code == b"200" and body == expected_body
    failure = "" if ok else (f"GET / -> curl rc={ok_run.returncode}, HTTP {code.decode(errors='replace')}, "
                             f"{ok_run.stderr.decode(errors='replace')[:200]} body={body[:100]!r}")
    anon = subprocess.run(client.curl(cert=False) + ["-o", "/dev/null", "-w", "%{http_code}", client.url("/")],
                          capture_output=True, timeout=60)
    no_cert = (f"handshake refused (curl rc {anon.returncode})" if anon.returncode
               else f"HTTP {anon.stdout.decode(errors='replace')}")
    return ok, failure, no_cert
