"""What the benchmarks that drive nlm's own commands share: running `nlm ...` as a subprocess,
and the markdown tables of their reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from nlm.errors import NLMError


def run_nlm(*argv: str) -> str:
    """Run `python -m nlm ARGV...` (the interpreter running this) and return the last line of its
    stdout (the commands print their JSON result there). A failure raises NLMError with the
    command's last stderr line, its own "nlm: error: " prefix dropped."""
    done = subprocess.run([sys.executable, "-m", "nlm", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        while last.startswith("nlm: error: "):  # the inner command's prefix, once is enough
            last = last.removeprefix("nlm: error: ")
        raise NLMError(f"nlm {argv[0]} failed: {last}")
    return done.stdout.strip().splitlines()[-1]


def scored_text(test: Path, work: Path, lines: int) -> Path:
    """The file `nlm eval` scores: the test text, or (`lines` > 0) its first `lines` documents,
    written once into WORK."""
    if not lines:
        return test
    from nlm.evaluation import read_documents

    path = work / f"test-{lines}-lines.txt"
    path.write_text("\n".join(read_documents(test)[:lines]) + "\n", encoding="utf-8")
    return path


def markdown_table(
    rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], right_from: int | None = None
) -> str:
    """A markdown table: one line per row, columns (header, key, format spec; "-" for None);
    columns from index `right_from` on are right-aligned."""
    right = len(columns) if right_from is None else right_from
    lines = [
        "| " + " | ".join(h for h, _, _ in columns) + " |",
        "| " + " | ".join("---" if i < right else "---:" for i in range(len(columns))) + " |",
    ]
    for r in rows:
        cells = ("-" if r.get(k) is None else format(r[k], f) for _, k, f in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
