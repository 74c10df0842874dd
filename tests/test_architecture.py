"""The architecture as a contract (`[tool.importlinter]` in pyproject.toml): dependencies run one way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # the package under `root`, not the installed one
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_and_the_no_io_rule_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Contracts: 2 kept, 0 broken." in done.stdout


def lint_imports_with(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the package where `line` is added to `module` (a path under backend/)."""
    shutil.copytree(REPO / "backend", tmp_path / "backend", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    source = tmp_path / "backend" / module
    source.write_text(source.read_text() + f"\n{line}\n")
    return lint_imports(tmp_path)


def test_an_upward_import_breaks_the_contract(tmp_path):
    done = lint_imports_with(tmp_path, "spans/chunking.py", "from backend.tools import cli  # an upward import")
    assert done.returncode != 0
    assert "backend.spans.chunking -> backend.tools.cli" in done.stdout


def test_spans_may_not_reach_the_database(tmp_path):
    done = lint_imports_with(tmp_path, "spans/alignment.py", "import sqlite3  # I/O where there must be none")
    assert done.returncode != 0
    assert "backend.spans.alignment -> sqlite3" in done.stdout


def test_no_import_circles_inside_a_layer():
    # llm/ once went client <-> probe, protocol/ services -> rqworker -> server -> services:
    # a module of a circle cannot be read, imported or tested without all the others
    import itertools

    import grimp

    graph = grimp.build_graph("backend", include_external_packages=False)
    layers = sorted({".".join(m.split(".")[:2]) for m in graph.modules if m.count(".") >= 2})
    assert "backend.protocol" in layers and "backend.pipeline" in layers
    circles = [
        (a, b)
        for layer in layers
        for a, b in itertools.combinations(sorted(m for m in graph.modules if m.startswith(layer + ".")), 2)
        if graph.find_shortest_chain(a, b) and graph.find_shortest_chain(b, a)
    ]
    assert not circles, f"modules that import each other (directly or through others): {circles}"
