"""The layering the README's "Architecture" section describes, checked: no import cycle
among the project's modules; the shared vocabulary at the bottom imports nothing of the
project; the engine and the model-file readers import no database code; `status`'s path
imports no SQLAlchemy (tests/test_reads.py times that)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "worker", "cli")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[f"nightshift.{name}"] = path  # installed under nightshift (pyproject.toml)
    return found


def import_graph() -> dict[str, set[str]]:
    """Which project modules each one imports, anywhere in it (inside functions too: a
    late import is still a dependency)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_the_projects_modules():
    assert cycles(import_graph()) == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_vocabulary_imports_nothing_of_the_project():
    assert import_graph()["nightshift.jobs.vocabulary"] == set()


def _loaded_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print(' '.join(sys.modules))"],
        capture_output=True, text=True, cwd=REPO, check=True)
    return set(out.stdout.split())


def test_the_engine_and_the_model_file_readers_import_no_database_code():
    for module in ("nightshift.worker.engine", "nightshift.worker.memory"):
        loaded = _loaded_by(module)
        database = {"sqlalchemy", "nightshift.jobs.store", "nightshift.jobs.schema"}
        assert not database & loaded, module
    assert not {"mlx", "mlx_lm"} & _loaded_by("nightshift.worker.memory")
