"""What must exist before a benchmark run: system packages, the interpreter for mtls-proxy, a throw-away PKI,
the wrk client-certificate shim, and the configurations rendered from ``bench/conf/``.

Owns: the list of Debian/Ubuntu packages the benchmark needs and installing them (root only; otherwise the error
says the exact ``apt-get`` command), creating the project's ``.venv`` when no interpreter can run mtls-proxy,
``mtls-proxy certs init`` into the scratch directory, compiling ``tools/client_cert_shim.c``, and filling the
``@NAME@`` placeholders of a template.

Must not: start services or measure anything (``run.py`` and ``measure.py`` do).  Standard library only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# binary -> Debian/Ubuntu package; plus files that only a package provides
APT_BINARIES = {"nginx": "nginx", "wrk": "wrk", "ab": "apache2-utils", "curl": "curl", "gcc": "gcc",
                "taskset": "util-linux"}
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")  # load order matters: NDK first


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """The benchmark cannot run; the message says what to do."""


# --- packages, interpreter, PKI, shim, configs ------------------------------------------------------------------------------------------------
def lua_module_dir() -> str | None:
    for d in MODULE_DIRS:
        if all(os.path.exists(os.path.join(d, m)) for m in LUA_MODULES):
            return d
    return None


def missing_packages() -> list[str]:
    missing = {pkg for binary, pkg in APT_BINARIES.items() if shutil.which(binary) is None}
    if not os.path.exists("/usr/include/openssl/ssl.h"):
        missing.add("libssl-dev")
    if lua_module_dir() is None:
        missing.add("libnginx-mod-http-lua")  # the upstream's /upload answers with the body's size and MD5
    return sorted(missing)


def apt_install(packages: list[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"apt-get install {' '.join(packages)}")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], check=True, env=env)


def ensure_packages(install: bool) -> None:
    missing = missing_packages()
    if not missing:
        return
    command = f"sudo apt-get update && sudo apt-get install -y {' '.join(missing)}"
    if not install:
        raise BenchError(f"missing: {', '.join(missing)}; install them with:\n    {command}")
    if os.geteuid() != 0:
        raise BenchError(f"missing: {', '.join(missing)}; not root, so install them yourself:\n    {command}")
    apt_install(missing)
    if missing_packages():
        raise BenchError(f"still missing after apt-get: {', '.join(missing_packages())}")


def proxy_importable(python: str) -> bool:
    r = subprocess.run([python, "-c", "import proxy.cli, aiohttp, uvloop, cryptography"], cwd=ROOT,
                       capture_output=True)
    return r.returncode == 0


def ensure_python(requested: str | None, install: bool) -> str:
    """The interpreter that runs mtls-proxy (from the working tree: ``python -m proxy`` with cwd = repo root)."""
    candidates = [requested] if requested else [str(ROOT / ".venv/bin/python"), sys.executable]
    for python in candidates:
        if python and os.path.exists(python) and proxy_importable(python):
            return python
    if requested or not install:
        raise BenchError("no Python with mtls-proxy's dependencies; create one with:\n"
                         f"    python3 -m venv {ROOT}/.venv && {ROOT}/.venv/bin/pip install -e {ROOT}")
    venv = ROOT / ".venv"
    log(f"creating {venv} and installing mtls-proxy into it")
    if subprocess.run([sys.executable, "-m", "venv", str(venv)]).returncode != 0:
        if os.geteuid() != 0:
            raise BenchError("python3 -m venv failed; install python3-venv (sudo apt-get install -y python3-venv)")
        apt_install(["python3-venv"])
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "-e", str(ROOT)], check=True)
    python = str(venv / "bin/python")
    if not proxy_importable(python):
        raise BenchError(f"{python} still cannot import mtls-proxy")
    return python


def make_pki(python: str, pki: Path) -> None:
    """A fresh throw-away PKI from the project's own `certs init` (client CA, server, upstream CA + cert)."""
    subprocess.run([python, "-m", "proxy", "certs", "init", str(pki), "--force"], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    pem = pki / "client.pem"  # ab -E wants certificate and key in one file
    fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write((pki / "client.crt").read_bytes() + (pki / "client.key").read_bytes())


def build_shim(work: Path) -> str:
    src = HERE / "tools/client_cert_shim.c"
    out = work / "client_cert_shim.so"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl", "-lssl", "-lcrypto"],
                       check=True)
    return str(out)


def render(template: str, dest: Path, values: dict[str, object]) -> Path:
    text = (HERE / "conf" / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    left = re.findall(r"@[A-Z_]+@", text)
    if left:
        raise BenchError(f"{template}: no value for {', '.join(sorted(set(left)))}")
    dest.write_text(text)
    return dest
