"""The layout docs/architecture.md describes: one import root, imports pointing one way, one home per concept.

Read from the sources (every ``import``, at module level or inside a function), not from what happens to be
imported at run time, so a hidden dependency cannot slip through.
"""

from __future__ import annotations

import ast
import collections
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]

#: The agent's packages and top-level modules, lowest first: each may import only those before it (and
#: itself). docs/architecture.md has the same list.
AGENT_LAYERS = (
    "errors",
    "files",
    "records",
    "config",
    "models",
    "capture",
    "vision",
    "store",
    "learning",
    "federation",
    "training",
    "daemon",
    "cli",
)
#: What each distribution package may import of ours (besides itself).
ALLOWED = {
    "fedfer.security": set(),
    "fedfer.v1": set(),
    "fedfer.aggregator": {"fedfer.security", "fedfer.v1"},
    "fedfer.agent": {"fedfer.security", "fedfer.v1"},
    "fedfer.bench": {"fedfer.security", "fedfer.v1", "fedfer.aggregator", "fedfer.agent"},
}


def _modules() -> dict[str, Path]:
    """Every module of the distribution, by its ``fedfer.`` name (generated protobuf code left out)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imported(path: Path) -> Iterator[str]:
    """Every module name ``path`` imports, wherever the import statement is."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _ours(name: str) -> str | None:
    """The module of ours that ``name`` (a module, or a module's attribute) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = collections.defaultdict(set)
    for module, path in MODULES.items():
        for name in _imported(path):
            target = _ours(name)
            if target is not None and target != module:
                edges[module].add(target)
    return edges


GRAPH = _graph()


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _layer(module: str) -> int:
    parts = module.split(".")
    return AGENT_LAYERS.index(parts[2]) if len(parts) > 2 else -1


def test_the_packages_list_is_every_package_below_the_mapped_folders() -> None:
    packages = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert sorted(packages) == sorted(PYPROJECT["tool"]["setuptools"]["packages"])
    assert set(ALLOWED) == set(PACKAGE_DIRS)


def test_nothing_imports_the_folders_by_their_own_names() -> None:
    """One import root: ``fedfer.agent``, never ``agent`` (which would be a second copy of every module)."""
    bare = {"agent", "aggregator", "security", "bench", "protos"}
    offenders = []
    for path in [*MODULES.values(), *sorted((REPO / "tests").rglob("*.py"))]:
        offenders += [f"{path.relative_to(REPO)}: {n}" for n in _imported(path) if n.split(".")[0] in bare]
    assert offenders == []


def test_the_import_graph_has_no_cycle() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = [stack.pop()]
            while component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way_between_the_packages(package: str) -> None:
    """security imports nothing of ours, the aggregator never the agent, nothing but bench imports bench."""
    wrong = {
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _package(module) == package
        for target in targets
        if _package(target) != package and _package(target) not in ALLOWED[package]
    }
    assert wrong == set()


def test_imports_point_one_way_inside_the_agent() -> None:
    assert {m.split(".")[2] for m in MODULES if m.startswith("fedfer.agent.")} == set(AGENT_LAYERS)
    upward = {
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.startswith("fedfer.agent.")
        for target in targets
        if target.startswith("fedfer.agent.") and _layer(target) > _layer(module)
    }
    assert upward == set()


def test_no_module_is_imported_by_name() -> None:
    """Plain imports only: mypy checks them and the graph above sees them (an optional third party aside)."""
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "importlib.import_module",
                "__import__",
            ):
                argument = node.args[0]
                if not (isinstance(argument, ast.Constant) and argument.value == "keyring"):
                    found.append(f"{module}: {ast.unparse(node)}")
    assert found == []


def test_one_stage_enum_and_one_atomic_write() -> None:
    stage_enums, replaces = [], []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(item, ast.Assign) and "ADVERTISE_KEYS" in {ast.unparse(t) for t in item.targets}
                for item in node.body
            ):
                stage_enums.append(f"{module}.{node.name}")
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.replace", "os.rename"):
                replaces.append(module)
    assert stage_enums == ["fedfer.security.secagg.stage.Stage"]
    # write_atomic renames files; provisioning swaps a folder of model files as a whole.
    assert sorted(replaces) == ["fedfer.agent.models.provision"] * 2 + ["fedfer.security.files"]
