"""The package's shape, held against the code: layers, no import cycles, a sans-IO wire package, small modules,
and a test file for every module.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import`` counts, including
those under ``if TYPE_CHECKING:`` and inside functions (a lazy import is still a dependency, and a type-only cycle
still means two modules cannot be understood apart).  ``docs/architecture.md`` draws the same layers.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxy"

# Lowest first.  A module may import from its own layer or any layer below it, never above.  Read upwards it is the
# request's path inverted: the command line starts processes, a process owns listeners, a listener hands sockets to
# connections, a connection runs exchanges over the transport and the upstream pool, and those use the rules, TLS and
# metrics, which use the configuration, which uses the pure grammar of the wire and the error vocabulary.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"proxy", "errors", "cpus", "deadline", "globs", "ratelimit", "slots", "cert_tracker", "openssl",
              "sockets", "accesslog"}),
    ("wire (sans-IO)", {"wire", "wire.grammar", "wire.client_cert", "wire.paths", "wire.proxy_protocol",
                        "wire.headers", "wire.chunked", "wire.http1", "wire.responses"}),
    ("sources", {"sources", "sources.location", "sources.local", "sources.url", "sources.aws", "sources.material"}),
    ("config", {"config", "config.model", "config.values", "config.rules", "config.loader"}),
    ("rules, TLS, metrics", {"identity", "policy", "partners", "tls", "emf", "metrics"}),
    ("transport and upstream", {"transport", "upstream", "runtime"}),
    ("shared state and admin", {"state", "admin", "emf_output"}),
    ("per connection", {"exchange", "connection"}),
    ("accept", {"listener"}),
    ("process", {"server", "supervisor", "check"}),
    ("dev tools", {"dev", "dev.devpki", "dev.demo_upstream", "dev.demo"}),
    ("command line", {"cli", "__main__"}),
]

# Modules whose behaviour is tested through another file, and why that is the right place.
TESTED_ELSEWHERE = {
    "__main__": ("tests/test_cli.py", "two lines that call cli.main; every CLI test runs `python -m proxy`"),
    "exchange": ("tests/test_connection.py", "Exchange is ClientConnection's base class: one state machine"),
    "state": ("tests/test_connection.py", "a plain holder; the connection tests run on a real ServerState"),
    "listener": ("tests/e2e/test_tls_auth.py", "accepting and handshaking need real sockets and TLS"),
    "server": ("tests/e2e/test_lifecycle.py", "start, reload and drain of the real process"),
    "emf_output": ("tests/e2e/test_emf_output.py", "EMF lines from the real process, checked against the spec"),
    "dev.demo": ("tests/test_cli.py", "`mtls-proxy demo` and `certs init` run as the README says"),
    "dev.demo_upstream": ("tests/test_container.py", "the demo upstream command, as the container runs it"),
}

MAX_LINES = 450

# What "sans-IO" excludes: event loops, sockets, TLS, files and processes, threads, native calls, the network.
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "select", "os", "io", "subprocess", "threading",
              "multiprocessing", "ctypes", "signal", "urllib", "http", "uvloop", "aiohttp", "boto3", "botocore",
              "pathlib", "shutil", "tempfile", "logging"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _short(name: str) -> str:
    return name.removeprefix("proxy.") if name != "proxy" else "proxy"


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(proxy modules imported, top-level names of everything else imported) by module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "proxy":
                    target = alias.name
                    while target not in MODULES:
                        target = target.rpartition(".")[0]
                    inside.add(target)
                else:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "proxy":
                outside.add(target.split(".")[0])
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                inside.add(sub if sub in MODULES else target)
    inside.discard(name)
    outside.discard("__future__")
    return inside, outside


GRAPH = {name: _imports(name)[0] for name in MODULES}


def _layer_of(name: str) -> int:
    short = _short(name)
    for index, (_, members) in enumerate(LAYERS):
        if short in members:
            return index
    raise AssertionError(f"{name} is in no layer of tests/test_architecture.py (add it where it belongs)")


def test_every_module_is_in_exactly_one_layer() -> None:
    listed = [m for _, members in LAYERS for m in members]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    assert sorted(set(listed)) == sorted(_short(m) for m in MODULES), "LAYERS and the package differ"


def test_imports_point_down_the_layers() -> None:
    upward = [f"{_short(a)} ({LAYERS[_layer_of(a)][0]}) imports {_short(b)} ({LAYERS[_layer_of(b)][0]})"
              for a, targets in GRAPH.items() for b in targets if _layer_of(b) > _layer_of(a)]
    assert upward == []


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_among_proxy_modules() -> None:
    assert _cycles() == []


def test_the_cycle_finder_sees_a_cycle() -> None:
    # The check above is only as good as the finder: a two-module cycle must be reported.
    saved = dict(GRAPH)
    try:
        GRAPH["proxy.errors"] = {"proxy.cli"}
        assert any("proxy.errors" in c and "proxy.cli" in c for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_type_checking_imports_are_counted() -> None:
    # proxy.listener names ServerState only under TYPE_CHECKING; the graph must still hold that arrow.
    source = MODULES["proxy.listener"].read_text()
    assert "TYPE_CHECKING" in source and "proxy.state" in GRAPH["proxy.listener"]


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _short(m).startswith("wire")))
def test_wire_modules_import_no_io(name: str) -> None:
    inside, outside = _imports(name)
    assert outside & IO_MODULES == set(), f"{name} imports IO modules"
    assert {m for m in inside if not (_short(m).startswith("wire") or m == "proxy.errors")} == set()


def test_importing_the_wire_package_loads_no_io_module() -> None:
    # The static check reads the source; this one asks the interpreter what importing every wire module pulls in.
    wire = sorted(m for m in MODULES if _short(m).startswith("wire."))
    probe = ("import sys; before = set(sys.modules); " + "; ".join(f"import {m}" for m in wire)
             + "; print(' '.join(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in %r)))"
             % sorted(IO_MODULES - {"os", "io"}))  # the interpreter itself imports os and io at start
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_at_most_450_lines(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)}: {lines} lines (split it by concern)"


def _expected_test_file(name: str) -> Path:
    parts = _short(name).split(".")
    return ROOT / "tests" / Path(*parts[:-1]) / f"test_{parts[-1]}.py"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if MODULES[m].name != "__init__.py"))
def test_every_module_has_its_own_test_file(name: str) -> None:
    short = _short(name)
    if short in TESTED_ELSEWHERE:
        elsewhere, _why = TESTED_ELSEWHERE[short]
        assert not _expected_test_file(name).exists(), f"{short} has its own test file now: drop it from the list"
        assert (ROOT / elsewhere).is_file(), f"{elsewhere} (named for {short}) does not exist"
        return
    assert _expected_test_file(name).is_file(), f"{short}: no {_expected_test_file(name).relative_to(ROOT)}"


def test_docs_name_only_modules_that_exist_and_the_layers_table_names_them_all() -> None:
    readme, arch = (ROOT / "README.md").read_text(), (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(proxy/[a-z0-9_/]+(?:\.py)?)`", readme + arch))
    assert named and {p for p in named if not (ROOT / p).exists()} == set()
    layers_table = arch[arch.index("## Layers"):]
    cells = set(re.findall(r"`([a-z0-9_/]+)`", layers_table))
    expected = {_short(m).replace(".", "/") for m in MODULES if MODULES[m].name != "__init__.py"}
    assert expected - cells == set(), "docs/architecture.md's layers table misses modules"
