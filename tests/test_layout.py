"""The layout DESIGN.md promises, read from the code's own imports (no Ray, no torch: < 1 s).

    .venv/bin/python -m pytest -q tests/test_layout.py

- no import cycle among the project's modules (lazy imports inside functions count too);
- `system` imports nothing of `tune`, `serve` or `repforge`; `tune` and `serve` nothing of
  `repforge` (the entry point on top is the only code that imports them all);
- a package's members never import their own package's `__init__` (registries live in
  their own module, as timm's `_registry.py`);
- no source file over 450 lines, at most three functions over 80 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("repforge", "system", "tune", "serve")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
MAX_LONG_FUNCTIONS = 3


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports: `from a.b import c` names a.b.c when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = source_files()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("system", ("tune", "serve", "repforge")),
        ("tune", ("serve", "repforge")),
        ("serve", ("tune", "repforge")),
    ],
)
def test_imports_only_point_down(graph, package, forbidden):
    upward = [
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        if mod.split(".")[0] == package
        for dep in deps
        if dep.split(".")[0] in forbidden
    ]
    assert not upward, f"{package} imports upward: {upward}"


def test_members_never_import_their_package_face(graph):
    packages = {name for name, path in source_files().items() if path.name == "__init__.py"}
    offenders = [
        f"{mod} -> {dep}"
        for mod, deps in graph.items()
        for dep in deps
        if dep in packages and mod.startswith(dep + ".") and mod not in packages
    ]
    assert not offenders, offenders


def function_lengths(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [
        (f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def test_files_and_functions_stay_readable():
    files = source_files().values()
    too_long = [
        f"{p.relative_to(ROOT)} ({n})"
        for p in files
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not too_long, f"files over {MAX_FILE_LINES} lines: {too_long}"
    long_functions = [
        f"{name} ({n})" for p in files for name, n in function_lengths(p) if n > MAX_FUNCTION_LINES
    ]
    assert len(long_functions) <= MAX_LONG_FUNCTIONS, (
        f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"
    )
