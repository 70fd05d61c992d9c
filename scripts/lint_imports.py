"""Check the import layers with import-linter (the contracts are in pyproject.toml).

`cluster/` and `serve/` install as `nlm.cluster` and `nlm.serve` (pyproject's package-dir), so
the source tree is not laid out as the package is imported, and import-linter (which walks the
package's directory) would not see them. This script copies the sources into a temporary tree
laid out as installed and runs `lint-imports` there. Exit status: lint-imports'.

    .venv/bin/python scripts/lint_imports.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def installed_tree(target: Path) -> None:
    """Copy every package-dir of pyproject.toml to where it is imported from, under `target`."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # Parents first, so that nlm/ exists before nlm.cluster is put inside it.
    for package, source in sorted(setuptools["package-dir"].items(), key=lambda kv: kv[0]):
        shutil.copytree(
            ROOT / source,
            target / package.replace(".", "/"),
            ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "*.json"),
            dirs_exist_ok=True,
        )


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nlm-lint-imports-") as tmp:
        installed_tree(Path(tmp))
        lint = Path(sys.executable).with_name("lint-imports")
        command = [str(lint), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")]
        return subprocess.run(command, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
