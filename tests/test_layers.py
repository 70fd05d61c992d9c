"""The import layers (pyproject.toml's import-linter contracts) hold, and they bite.

`make test` runs scripts/lint_imports.py on the real tree; here the same contracts are run on a
copy of the tree with one upward import added, for each kind of import the design forbids, and
must fail naming it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("lint_imports", ROOT / "scripts/lint_imports.py")
lint_imports = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lint_imports)


def lint(tree: Path) -> subprocess.CompletedProcess:
    command = [
        str(Path(sys.executable).with_name("lint-imports")),
        "--no-cache",
        "--no-logo",
        str(ROOT / "pyproject.toml"),
    ]
    return subprocess.run(command, cwd=tree, capture_output=True, text=True)


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    lint_imports.installed_tree(tmp_path)
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "added", "broken"),
    [
        # the upward imports issue 13 found: a workflow reaching into the CLI
        ("nlm/workflows/demo.py", "from nlm.cli import serve", "nlm.workflows is not allowed"),
        ("nlm/bench/data.py", "from nlm.cli.prepare import add_arguments", "nlm.bench is not"),
        # serving must not import training
        ("nlm/serve/app.py", "import nlm.cluster.launch", "nlm.serve is not allowed"),
        # the library must not import the layers above it, nor Ray, DeepSpeed, the web stack
        ("nlm/models/gpt.py", "import nlm.serve.app", "nlm.models is not allowed"),
        ("nlm/inference.py", "import ray", "nlm.inference is not allowed to import ray"),
        ("nlm/checkpoint.py", "import deepspeed", "nlm.checkpoint is not allowed"),
        ("nlm/evaluation.py", "import fastapi", "nlm.evaluation is not allowed"),
    ],
)
def test_an_upward_import_breaks_a_contract(
    tmp_path: Path, module: str, added: str, broken: str
) -> None:
    lint_imports.installed_tree(tmp_path)
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n{added}  # added by the test\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout


def test_a_new_module_must_be_placed_in_a_layer(tmp_path: Path) -> None:
    lint_imports.installed_tree(tmp_path)
    (tmp_path / "nlm/unplaced.py").write_text('"""A module no layer names."""\n')
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "nlm.unplaced" in result.stdout
