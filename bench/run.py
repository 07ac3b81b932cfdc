#!/usr/bin/env python3
"""mtls-proxy against NGINX with the same job, on this machine, in one run (the comparison table).

Owns: the command line, the values rendered into ``bench/conf/`` (the upstream, the NGINX being replaced,
mtls-proxy), starting and stopping the upstream and each target pinned to its CPUs, the run loop (``--repeat``
runs interleaved target by target), and writing the table and a JSON result file.  ``prepare.py`` installs
and builds what a run needs, ``measure.py`` measures, ``report.py`` summarises.

Must not: import from outside this directory and the standard library (it runs before anything is installed,
and the proxy runs as a separate process from the working tree), or change anything outside its scratch
directory, ``bench/results/`` and (when asked to install) the system packages and ``.venv``.

Run from the repository root:  bench/run.sh [--quick] [--repeat N] [--only ka,hs,up,down] [--skip-install]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import measure
import report
from prepare import (HERE, LUA_MODULES, ROOT, BenchError, build_shim, ensure_packages, ensure_python, log,
                     lua_module_dir, make_pki, render)

# The reference pattern's cipher list (docs: the NGINX container mtls-proxy replaces).
SEED_CIPHERS = "ECDH+AESGCM:ECDH+AES256:ECDH+AES128:DH+3DES:!ADH:!AECDH:!MD5"
UPSTREAM_HOST = "demo.execute-api.local"  # the upstream name `mtls-proxy certs init` puts in upstream.crt
SMALL_BODY = ('{"status":"ok","api":"orders","stage":"prod","region":"eu-west-1","items":[{"id":1,"sku":"A100",'
              '"qty":2},{"id":2,"sku":"B-200","qty":1}],"next":null,'
              '"note":"fixed 207-byte body for the mtls-proxy benchmark"}')
assert len(SMALL_BODY) == 207
DEFAULT_TARGETS = "nginx-1w,mtls-proxy-1w,mtls-proxy-2w"
PHASES = ("ka", "hs", "up", "down")


# --- processes --------------------------------------------------------------------------------------------
def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_until(check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if check():
            return True
        time.sleep(0.1)
    return False


def readyz(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def stop_stale(pidfile: Path) -> None:
    """A target or upstream left behind by an earlier run that was killed (each runs in its own session): end
    it, but only if that PID still runs with a configuration file from this scratch directory."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return
    if any(str(pidfile.parent).encode() + b"/" in part for part in cmdline):
        log(f"stopping PID {pid} left over from an earlier run ({pidfile})")
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not os.path.exists(f"/proc/{pid}"):
                break
            time.sleep(0.05)


class Service:
    """One process tree we started (nginx in the foreground, or mtls-proxy), in its own session."""

    def __init__(self, name: str, argv: list[str], cpus: str | None, logs: Path, cwd: Path | None = None,
                 stdout: Path | None = None) -> None:
        self.name = name
        if cpus:
            argv = ["taskset", "-c", cpus, *argv]  # taskset execs: the PID is the program's own
        err = open(logs, "ab")
        out = open(stdout, "wb") if stdout else err
        try:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=cwd, start_new_session=True)
        finally:
            err.close()
            if out is not err:
                out.close()

    def pids(self) -> list[int]:
        return measure.process_tree(self.proc.pid) if self.proc.poll() is None else []

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nginx: fast shutdown; mtls-proxy: drain (shutdown_timeout 5 s)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: no exit 15 s after SIGTERM, killing its process group")
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass(frozen=True, slots=True)
class TargetSpec:
    name: str  # nginx-1w, mtls-proxy-2w, ...
    kind: str  # "nginx" or "mtls-proxy"
    workers: int

    @classmethod
    def parse(cls, text: str) -> TargetSpec:
        kind, _, w = text.rpartition("-")
        if kind not in ("nginx", "mtls-proxy") or not (w.endswith("w") and w[:-1].isdigit() and int(w[:-1]) >= 1):
            raise BenchError(f"target {text!r}: use nginx-<N>w or mtls-proxy-<N>w, e.g. mtls-proxy-2w")
        return cls(text, kind, int(w[:-1]))


@dataclass(frozen=True, slots=True)
class Layout:
    """CPU pinning (taskset lists), or None everywhere when there is one CPU or --pin none."""

    gen: str | None
    upstream: str | None
    cpus: tuple[int, ...]

    def target(self, workers: int) -> str | None:
        if not self.cpus:
            return None
        # Each worker gets a CPU of its own when there are enough; otherwise (2 workers on 2 CPUs) the extra
        # worker has to share CPU 0 with the generator and the upstream.
        own = self.cpus[1:1 + workers] if len(self.cpus) > workers else self.cpus[:workers]
        return ",".join(map(str, own))


def make_layout(pin: str) -> Layout:
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if pin == "none" or len(cpus) < 2:
        return Layout(None, None, ())
    return Layout(str(cpus[0]), str(cpus[0]), cpus)


# --- one target run ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, python: str) -> None:
        self.args = args
        self.python = python
        self.work = Path(args.workdir)
        self.pki = self.work / "pki"
        self.layout = make_layout(args.pin)
        self.upstream: Service | None = None
        self.shim = ""
        self.payload: measure.Payload | None = None

    def setup(self) -> None:
        a = self.args
        for sub in ("tmp-upstream", "tmp-nginx", "logs"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        make_pki(self.python, self.pki)
        self.shim = build_shim(self.work)
        self.payload = measure.make_payload(str(self.work / "large.bin"))
        modules = lua_module_dir()
        values = self.values(workers=1)
        values["LOAD_MODULES"] = "\n".join(f"load_module {modules}/{m};" for m in LUA_MODULES)
        conf = render("upstream.conf.in", self.work / "upstream.conf", values)
        for pidfile in ("upstream.pid", "nginx-target.pid", "mtls-proxy.pid"):
            stop_stale(self.work / pidfile)
        self.check_port(a.upstream_port)
        self.upstream = Service("upstream", ["nginx", "-c", str(conf), "-p", str(self.work), "-g", "daemon off;"],
                                self.layout.upstream, self.work / "logs/upstream.log")
        if not wait_until(lambda: not port_free(a.upstream_port), 10, self.upstream.proc):
            raise BenchError(f"upstream nginx did not start; see {self.work}/logs/upstream.log")

    def values(self, workers: int) -> dict[str, object]:
        a = self.args
        return {"RUN": self.work, "PKI": self.pki, "UP_PORT": a.upstream_port, "UP_HOST": UPSTREAM_HOST,
                "SMALL_BODY": SMALL_BODY, "CIPHERS": SEED_CIPHERS, "WORKERS": workers,
                "ACCESS_LOG": f"{self.work}/logs/nginx-access.log" if a.nginx_access_log else "off",
                "ADMIN_PORT": a.admin_port}

    def check_port(self, port: int) -> None:
        if not port_free(port):
            who = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
            raise BenchError(f"127.0.0.1:{port} is already in use: {who.strip() or '?'} (see --port-base)")

    def start(self, spec: TargetSpec) -> tuple[Service, int, Path | None]:
        a = self.args
        cpus = self.layout.target(spec.workers)
        logs = self.work / "logs" / f"{spec.name}.log"
        if spec.kind == "nginx":
            port = a.nginx_port
            self.check_port(port)
            values = dict(self.values(spec.workers), PORT=port)
            conf = render("nginx-target.conf.in", self.work / f"{spec.name}.conf", values)
            svc = Service(spec.name, ["nginx", "-c", str(conf), "-p", str(self.work), "-g", "daemon off;"], cpus, logs)
            ready = lambda: not port_free(port)  # noqa: E731
            access = None
        else:
            port = a.proxy_port
            self.check_port(port)
            self.check_port(a.admin_port)
            values = dict(self.values(spec.workers), PORT=port)
            conf = render("mtls-proxy.toml.in", self.work / f"{spec.name}.toml", values)
            access = self.work / "logs" / f"{spec.name}-access.log"
            # The access log is the proxy's stdout: a file here, as behind a container runtime's log driver.
            svc = Service(spec.name, [self.python, "-m", "proxy", "serve", "--config", str(conf)], cpus, logs,
                          cwd=ROOT, stdout=access)
            (self.work / "mtls-proxy.pid").write_text(f"{svc.proc.pid}\n")  # for stop_stale after a crash
            ready = lambda: readyz(a.admin_port)  # noqa: E731
        if not wait_until(ready, a.start_timeout, svc.proc):
            svc.stop()
            raise BenchError(f"{spec.name} did not become ready; see {logs}")
        return svc, port, access

    def run_target(self, spec: TargetSpec, rep: int) -> report.Row:
        a = self.args
        assert self.upstream is not None and self.payload is not None
        svc, port, access = self.start(spec)
        row: report.Row = {"name": spec.name, "rep": rep, "kind": spec.kind, "workers": spec.workers,
                           "target_cpus": self.layout.target(spec.workers), "gen_cpus": self.layout.gen}
        client = measure.Client("127.0.0.1", port, str(self.pki), self.shim, self.layout.gen)
        upstream = self.upstream
        try:
            ok, failure, no_cert = measure.preflight(client, SMALL_BODY.encode())
            row.update(preflight_ok=ok, no_cert=no_cert)
            if not ok:
                row["failure"] = failure
                return row
            pids = svc.pids()
            row["procs"] = len(pids)
            row["rss_idle_mb"] = round(measure.memory_kb(pids, "VmRSS")[0] / 1024, 1)
            measure.reset_peak_rss(pids)
            if "ka" in a.only:
                row.update(measure.phase_keepalive(client, svc.pids, upstream.pids, a.conns, a.duration, a.warmup))
            if "hs" in a.only:
                row.update(measure.phase_handshakes(client, svc.pids, upstream.pids, a.conns, a.hs_duration))
            for direction in ("up", "down"):
                if direction in a.only:
                    row.update(measure.phase_bulk(client, svc.pids, upstream.pids, self.payload, direction,
                                                  a.bulk_seconds, str(self.work)))
            total, largest = measure.memory_kb(svc.pids(), "VmHWM")
            row["rss_peak_mb"] = round(total / 1024, 1)
            row["rss_peak_proc_mb"] = round(largest / 1024, 1)
        finally:
            svc.stop()
        if access is not None and access.exists():
            with open(access, "rb") as f:
                row["access_log_lines"] = sum(1 for _ in f)
        return row


def finish_row(row: report.Row, noisy_pct: float) -> report.Row:
    phase_ok = [bool(v) for k, v in row.items() if k.endswith("_ok")]
    row["ok"] = bool(phase_ok) and all(phase_ok)
    others = [float(v) for k, v in row.items() if k.endswith("_other_pct") and isinstance(v, (int, float))]
    row["other_pct_max"] = max(others) if others else None
    row["noisy"] = bool(others) and max(others) > noisy_pct
    return row


def one_line(row: report.Row) -> str:
    def f(key: str, fmt: str) -> str:
        v = row.get(key)
        return fmt.format(v) if isinstance(v, (int, float)) else "-"

    return (f"{row['name']} rep {row['rep']}: ka {f('ka_rps', '{:.0f}')} req/s ({f('ka_cpu_us_per_req', '{:.0f}')} "
            f"µs/req)  hs {f('hs_cps', '{:.0f}')}/s ({f('hs_cpu_us_per_conn', '{:.0f}')} µs/conn)  up/down "
            f"{f('up_MBps', '{:.0f}')}/{f('down_MBps', '{:.0f}')} MB/s  RSS {f('rss_idle_mb', '{:.0f}')}/"
            f"{f('rss_peak_mb', '{:.0f}')} MB  other {f('other_pct_max', '{:.0f}')}%  "
            f"{'ok' if row.get('ok') else 'FAILED: ' + str(row.get('failure') or _first_failure(row))}")


def _first_failure(row: report.Row) -> str:
    return next((str(v) for k, v in row.items() if k.endswith("_failure")), "see the JSON result")


# --- main -------------------------------------------------------------------------------------------------
def tool_version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    text = (r.stdout + r.stderr).strip()
    return text.splitlines()[0] if text else None


def metadata(args: argparse.Namespace, python: str, layout: Layout) -> dict[str, object]:
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), None)
    os_name = next((line.split("=", 1)[1].strip().strip('"') for line in open("/etc/os-release")
                    if line.startswith("PRETTY_NAME=")), None) if os.path.exists("/etc/os-release") else None
    commit = tool_version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "os": os_name, "kernel": platform.release(), "cpu_model": cpu_model,
        "cpus": os.cpu_count(), "commit": f"{commit}{'+dirty' if dirty else ''}" if commit else None,
        "pinning": {"generator": layout.gen, "upstream": layout.upstream,
                    "target_1w": layout.target(1), "target_2w": layout.target(2)},
        "options": {"quick": args.quick, "repeat": args.repeat, "only": sorted(args.only), "conns": args.conns,
                    "ka_s": args.duration, "warmup_s": args.warmup, "hs_s": args.hs_duration,
                    "bulk_s": args.bulk_seconds, "nginx_access_log": args.nginx_access_log},
        "versions": {"python": tool_version([python, "-VV"]), "nginx": tool_version(["nginx", "-v"]),
                     "wrk": tool_version(["wrk", "-v"]), "ab": tool_version(["ab", "-V"]),
                     "curl": tool_version(["curl", "-V"]), "openssl": tool_version(["openssl", "version"])},
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="mtls-proxy against NGINX; see bench/README.md.")
    p.add_argument("--quick", action="store_true", help="half durations (smoke test, ~1.5 min)")
    p.add_argument("--repeat", type=int, default=1, help="runs per target, interleaved (default 1; use 3)")
    p.add_argument("--only", default=",".join(PHASES), help="phases: ka,hs,up,down (default all)")
    p.add_argument("--targets", default=DEFAULT_TARGETS,
                   help=f"comma-separated nginx-<N>w / mtls-proxy-<N>w (default {DEFAULT_TARGETS})")
    p.add_argument("--skip-install", action="store_true", help="never run apt-get or create .venv; just check")
    p.add_argument("--python", help="interpreter for mtls-proxy (default: .venv/bin/python, else this one)")
    p.add_argument("--duration", type=float, default=10, help="keep-alive phase seconds (10)")
    p.add_argument("--warmup", type=float, default=2, help="keep-alive warm-up seconds, not recorded (2)")
    p.add_argument("--hs-duration", type=float, default=8, help="handshake phase seconds (8)")
    p.add_argument("--bulk-seconds", type=float, default=4, help="seconds of 10 MB transfers per direction (4)")
    p.add_argument("--conns", type=int, default=50, help="concurrent connections for ka and hs (50)")
    p.add_argument("--pin", choices=("split", "none"), default="split",
                   help="split: generator + upstream on the first CPU, the target on the next (default)")
    p.add_argument("--nginx-access-log", action="store_true",
                   help="let NGINX write an access log too (default off, as in the yardstick's baseline)")
    p.add_argument("--noisy-pct", type=float, default=10,
                   help="mark a run noisy when other processes used more than this %% of all CPUs (10)")
    p.add_argument("--port-base", type=int, default=28000,
                   help="ports: base+443 NGINX, base+444 mtls-proxy, base+1443 upstream, base+1100 admin")
    p.add_argument("--workdir", default="/tmp/mtls-proxy-bench", help="scratch directory (PKI, configs, logs)")
    p.add_argument("--json", help="result file (default bench/results/run-<UTC time>.json)")
    p.add_argument("--start-timeout", type=float, default=30, help="seconds a target may take to get ready")
    a = p.parse_args(argv)
    a.only = {x.strip() for x in a.only.split(",") if x.strip()}
    if not a.only or a.only - set(PHASES):
        p.error(f"--only: choose from {','.join(PHASES)}")
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    if a.quick:
        a.duration, a.warmup, a.hs_duration, a.bulk_seconds = (a.duration / 2, a.warmup / 2, a.hs_duration / 2,
                                                               a.bulk_seconds / 2)
    a.nginx_port, a.proxy_port = a.port_base + 443, a.port_base + 444
    a.upstream_port, a.admin_port = a.port_base + 1443, a.port_base + 1100
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        specs = [TargetSpec.parse(t.strip()) for t in args.targets.split(",") if t.strip()]
        ensure_packages(install=not args.skip_install)
        python = ensure_python(args.python, install=not args.skip_install)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench = Bench(args, python)
    meta = metadata(args, python, bench.layout)
    rows: list[report.Row] = []
    try:
        bench.setup()
        for rep in range(1, args.repeat + 1):
            for spec in specs:
                log(f"=== {spec.name} (run {rep}/{args.repeat}) on CPUs {bench.layout.target(spec.workers) or 'any'}")
                row = finish_row(bench.run_target(spec, rep), args.noisy_pct)
                rows.append(row)
                log(one_line(row))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted: reporting what was measured")
    finally:
        if bench.upstream is not None:
            bench.upstream.stop()
    return publish(args, meta, rows, time.monotonic() - started)


def publish(args: argparse.Namespace, meta: dict[str, object], rows: list[report.Row], elapsed: float) -> int:
    if not rows:
        return 1
    shown = rows if args.repeat == 1 else report.summarize(rows, "median") + report.summarize(rows, "best")
    basis = rows if args.repeat == 1 else report.summarize(rows, "median")
    by_name = {str(r["name"]): r for r in basis}
    nginx = by_name.get("nginx-1w") or next((r for r in basis if r.get("kind") == "nginx"
                                             or str(r["name"]).startswith("nginx")), None)
    ratios = []
    if nginx is not None:
        for how_rows in ([basis] if args.repeat == 1 else [report.summarize(rows, "median"),
                                                           report.summarize(rows, "best")]):
            ng = next(r for r in how_rows if r["name"] == nginx["name"])
            for r in how_rows:
                if str(r["name"]).startswith("mtls-proxy"):
                    ratio = report.ratio_row(r, ng)
                    if r.get("summary"):
                        ratio["name"] = f"{ratio['name']} ({r['summary']})"
                    ratios.append(ratio)
    verdicts = report.check_targets(nginx, by_name.get("mtls-proxy-1w"), by_name.get("mtls-proxy-2w"))
    noisy = sum(1 for r in rows if r.get("noisy"))
    print(f"\n# {meta['date']}  {meta['cpu_model']} x{meta['cpus']}  commit {meta['commit']}  "
          f"{'quick, ' if args.quick else ''}{args.repeat} run(s) per target, {elapsed:.0f} s; "
          f"{noisy} of {len(rows)} runs noisy (other processes > {args.noisy_pct:.0f}% of all CPUs)\n")
    print(report.markdown_table(shown + ratios))
    print(f"\ntargets ({'single run' if args.repeat == 1 else 'medians'}; "
          "the machine is noisy, so read them with the other % column):")
    print(report.verdict_lines(verdicts))
    path = Path(args.json) if args.json else (
        HERE / "results" / f"run-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "runs": rows, "ratios": ratios, "targets": [asdict(v) for v in verdicts]}
    if args.repeat > 1:
        result["median"] = report.summarize(rows, "median")
        result["best"] = report.summarize(rows, "best")
    path.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"\nresult: {path}")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
