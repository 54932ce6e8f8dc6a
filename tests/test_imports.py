"""The package's import graph: one way, no cycles, DeepSpeed only under dsdpo/runtime/.

Imports are read from the source (ast), those inside functions too: a lazy import that closes a cycle
is still a cycle to a reader.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dsdpo

PACKAGE = Path(dsdpo.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The dsdpo modules `path` imports (a package's name stands for its __init__)."""
    found = set()
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module in modules and module != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    return {_module_name(path): _imports(path, modules) for path in paths}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state and (found := visit(imported)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    """Python in a fresh interpreter that imports this checkout's dsdpo."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    # Packages import their own submodules in __init__; a submodule importing its package's
    # __init__ back would be a cycle, and is reported like any other.
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["dsdpo.runtime.checkpoint"] = graph["dsdpo.runtime.checkpoint"] | {
        "dsdpo.runtime.export"
    }  # export -> checkpoint
    assert _cycle(graph) is not None


def test_checkpoint_reading_runs_one_way_models_then_export():
    graph = import_graph()
    assert "dsdpo.runtime.checkpoint" in graph["dsdpo.models.loading"]
    assert "dsdpo.runtime.export" not in graph["dsdpo.models.loading"]
    checkpoint = [name for name in graph if name.startswith("dsdpo.runtime.checkpoint")]  # its modules
    for name in checkpoint:
        assert {"dsdpo.models.loading", "dsdpo.runtime.export"}.isdisjoint(graph[name]), name


# DeepSpeed behind one door: only dsdpo/runtime/ imports it (engines, collectives, its config and
# checkpoints, the step mechanics and internals of runtime/zero.py, its model-state estimator).
RUNTIME = "dsdpo.runtime."


def test_deepspeed_is_imported_only_under_dsdpo_runtime():
    importers = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(name == "deepspeed" or name.startswith("deepspeed.") for name in names):
                importers.add(_module_name(path))
    assert "dsdpo.runtime.engine" in importers  # the scan sees imports at all
    assert all(name.startswith(RUNTIME) for name in importers), sorted(importers)


def test_scoring_losses_and_the_micro_step_load_without_deepspeed():
    """A fresh interpreter: importing the math and the micro-step must not pull DeepSpeed in."""
    modules = [
        "dsdpo.objective.elbo", "dsdpo.objective.draws", "dsdpo.objective.losses", "dsdpo.objective.gradient",
        "dsdpo.objective.scoring", "dsdpo.objective.sft", "dsdpo.reference.interface",
        "dsdpo.evaluation.reports", "dsdpo.evaluation.held_out", "dsdpo.models.loading",
    ]  # fmt: skip
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        "print('deepspeed' in sys.modules, __import__('dsdpo').__file__)"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", str(PACKAGE / "__init__.py")]


def test_every_module_imports():
    """All of them (but __main__, which runs the CLI) in one fresh interpreter, in name order."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = _run(code, *sorted(name for name in import_graph() if not name.endswith("__main__")))
    assert result.returncode == 0, result.stderr[-2000:]
