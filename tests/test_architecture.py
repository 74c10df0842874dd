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


def test_an_upward_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "backend", tmp_path / "backend", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    chunking = tmp_path / "backend" / "spans" / "chunking.py"
    chunking.write_text(chunking.read_text() + "\nfrom backend.tools import cli  # an upward import\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "backend.spans.chunking -> backend.tools.cli" in done.stdout


def test_spans_may_not_reach_the_database(tmp_path):
    shutil.copytree(REPO / "backend", tmp_path / "backend", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    alignment = tmp_path / "backend" / "spans" / "alignment.py"
    alignment.write_text(alignment.read_text() + "\nimport sqlite3  # I/O where there must be none\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "backend.spans.alignment -> sqlite3" in done.stdout
