"""The package's layering, checked from the source: layers import downward only, and no module
imports itself in a circle.

The layers, lowest first (CONTRIBUTING.md, Layout):
- `wire`: the msgpack protocol as pure objects;
- `config`: settings from defaults, the TOML file and the command line;
- `inference`: everything that touches a model;
- `transport`: sockets and the asyncio shell around msgpack conversations;
- `http`: the HTTP front;
- `daemon`: what each op does, the composition root, the service manager's contract;
- `index`: the search index as a library, a client of the daemon;
- `cli`: the command and the tools that are clients of the daemon;
- `ray`: the optional extra that runs daemons on a Ray cluster.
A module may import its own layer and any layer below it, never one above; some layers are
further kept apart from layers below them (SEPARATE).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "embedd"
# The package root's own modules: `__init__` (the version) sits below everything, `__main__`
# (the `python -m embedd` entry point) above everything.
LAYERS = (
    "__init__", "wire", "config", "inference", "transport", "http", "daemon", "index", "cli", "ray"
)  # fmt: skip
# Layers that must not import some layers below them: the index is a client of the daemon (it
# talks to it through `embedd_client`, never through its insides), and Ray's steps are built on
# the index's library, not on the command that prints.
SEPARATE = {
    "index": {"inference", "transport", "http", "daemon", "cli"},
    "ray": {"cli"},
}
TOP = "__main__"
# Modules whose rules must run without sockets, asyncio, threads or llama.cpp.
PURE = (
    "wire.framing",
    "wire.messages",
    "wire.conversation",
    "transport.counters",
    "wire.errors",
    "wire.options",
    "index.records",
    "inference.scheduler",
    "inference.cache",
    "inference.admission",
    "inference.chunking",
    "inference.threads",
    "inference.tokenizer",
    "http.parser",
    "http.api",
    "http.conversation",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The embedd modules an import statement names (`from ..wire import errors` names
    `wire.errors`)."""
    if node.level:
        base = module.split(".")
        # A package's own __init__ counts as inside the package.
        package = base[:-1] if not (PACKAGE / Path(*base)).is_dir() else base
        anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        stem = [*anchor, *(node.module.split(".") if node.module else [])]
    elif node.module and (node.module == "embedd" or node.module.startswith("embedd.")):
        stem = node.module.split(".")[1:]
    else:
        return []
    out = []
    for alias in node.names:
        candidate = [*stem, alias.name]
        if _exists(candidate):
            out.append(".".join(candidate))
        elif stem and _exists(stem):
            out.append(".".join(stem))
        elif not stem:
            out.append("__init__")
    return out


def _exists(parts: list[str]) -> bool:
    return bool(parts) and (
        (PACKAGE / Path(*parts)).with_suffix(".py").exists()
        or (PACKAGE / Path(*parts) / "__init__.py").exists()
    )


def _imports() -> dict[str, set[str]]:
    """Module name -> the embedd modules it imports (at any level, TYPE_CHECKING included: a
    cycle or an upward arrow hidden behind it is still one in the design)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                deps.update(_resolve(name, node))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("embedd."):
                        deps.add(alias.name.removeprefix("embedd."))
        graph[name] = {d for d in deps if d != name}
    return graph


def _layer(module: str) -> int:
    if module == TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[0])


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        for dep in deps
        if _layer(dep) > _layer(module)
    )


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_belongs_to_a_layer() -> None:
    for module in _imports():
        assert module == TOP or module.split(".")[0] in LAYERS, module


def test_the_package_has_no_import_cycles() -> None:
    cycle = _cycle(_imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_go_only_downward_between_layers() -> None:
    assert _upward(_imports()) == []


def _crossings(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {dep}"
        for module, deps in graph.items()
        for dep in deps
        if dep.split(".")[0] in SEPARATE.get(module.split(".")[0], set())
    )


def test_layers_kept_apart_never_import_each_other() -> None:
    assert _crossings(_imports()) == []


def test_the_separation_check_finds_ray_importing_the_cli() -> None:
    graph = {"ray.steps": {"cli.index", "index.records"}, "index.ingest": {"daemon.ops"}}
    assert _crossings(graph) == ["index.ingest -> daemon.ops", "ray.steps -> cli.index"]


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"wire.messages": {"config"}, "daemon.ops": {"inference.worker"}}
    assert _upward(graph) == ["wire.messages -> config"]


def test_relative_imports_resolve_to_modules() -> None:
    graph = _imports()
    assert "wire.errors" in graph["transport.msgpack_server"]
    assert "config" in graph["inference.models"]
    assert "__init__" in graph["daemon.ops"]  # `from .. import __version__`


def test_pure_modules_import_no_io_threads_or_llama() -> None:
    """The protocol rules and policies run without sockets, asyncio, threads or llama.cpp
    (bytes in, actions out), so they are tested without any of them."""
    for module in PURE:
        path = (PACKAGE / Path(*module.split("."))).with_suffix(".py")
        tree = ast.parse(path.read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert not names & {"asyncio", "socket", "llama_cpp", "threading"}, module


def test_the_contributing_layout_table_is_the_tree() -> None:
    """Every module has a row in CONTRIBUTING.md's Layout table, and every row is a module."""
    contributing = (PACKAGE.parent / "CONTRIBUTING.md").read_text()
    section = contributing.split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = {
        cell.strip("`*")
        for line in section.splitlines()
        if (cell := line.split("|")[1].strip() if line.startswith("|") else "")
        and cell.strip("`*").startswith("embedd/")
    }
    listed = {row for row in rows if row.endswith(".py")}
    tree = {
        path.relative_to(PACKAGE.parent).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }
    assert listed == tree
    folders = {row.rstrip("/") for row in rows if row.endswith("/")}
    assert folders == {f"embedd/{layer}" for layer in LAYERS if layer not in ("__init__", "config")}


# The optional extra: only its own package may import Ray (docs/ray.md).
OPTIONAL = "ray"


def _core_modules() -> list[str]:
    return sorted(
        "embedd" if name == "__init__" else f"embedd.{name}"
        for name in _imports()
        if name != TOP and name.split(".")[0] != OPTIONAL
    )


def test_no_core_module_names_ray_in_an_import() -> None:
    """Statically: no `import ray` / `from ray ...` outside embedd/ray/, at any level."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if _module_name(path).split(".")[0] == OPTIONAL:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [f"{_module_name(path)}: {n}" for n in names if n.split(".")[0] == "ray"]
    assert offenders == []


def test_importing_every_core_module_loads_no_ray() -> None:
    """At run time, through every dependency: the core works where Ray is not installed."""
    code = (
        "import importlib, sys\n"
        f"for name in {_core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
