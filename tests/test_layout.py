"""The shape of the house: no import circle between modules, core/ imports nothing above it,
``import optbrain`` has no side effect, every source file opens with a docstring and stays small."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "optbrain"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (at any depth of the file, lazily too)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            target, names = "", [a.name for a in node.names]
        else:
            continue
        for name in [target, *names]:
            if name.startswith("optbrain"):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for name in _imports(path):
            # the longest prefix that is a module of ours (``from .x import y`` names x or x.y)
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != mod and name != "optbrain":
                deps.add(name)
        graph[mod] = deps
    return graph


def test_graph_sees_the_package():
    g = _graph()
    assert "optbrain.core.spec" in g and "optbrain.pipeline.compress" in g
    assert "optbrain.core.spec" in g["optbrain.core.layer"]  # relative imports resolved


def test_no_import_circle():
    g = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            # a package importing its own submodules (re-exports) is not a circle
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_core_imports_nothing_above_core():
    for mod, deps in _graph().items():
        if mod.startswith("optbrain.core"):
            above = sorted(d for d in deps if not d.startswith("optbrain.core"))
            assert not above, f"{mod} imports {above} from above core/"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_source_file_opens_with_a_docstring_and_is_small(path):
    text = path.read_text(encoding="utf-8")
    assert text.startswith('"""'), f"{path} does not open with a docstring"
    assert text.count("\n") <= MAX_LINES, f"{path} has {text.count(chr(10))} lines (> {MAX_LINES})"


def test_import_optbrain_has_no_side_effect():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (
        "import os, sys, optbrain; "
        "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules, optbrain.__version__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    policy, torch_loaded, version = out.stdout.split()
    assert policy == "None" and torch_loaded == "False" and version
