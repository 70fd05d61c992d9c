"""The commands the docs show are commands nlm accepts: drift fails a build instead of a user.

Every `nlm ...` line in a shell block of README.md and docs/*.md (and the job lines in
cluster.yaml's header) is parsed by the real `nlm` argument parser; every `--flag` an inline
`nlm <command> ...` span of prose names must exist on that command; every `python jobs/X.py`,
`scripts/...` and `configs/...` path they name must exist in the repository. Running each command
end to end is the other tests' job (the demo, the pipeline and serving tests run the same ones).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nlm import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(
    r"(?:^|&&|;|\||\bexec)\s*(?:[A-Z_]+=\S+\s+)*((?:\.venv/bin/)?nlm\s[^'&;|]*|python\s+jobs/[^'&;|]*)"
)
PLACEHOLDER = re.compile(r"…|\.\.\.|<[^>]*>|\bRUN\b|\bSHARDS\b")


def shell_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of each command in the file's ``` blocks (continuations joined).

    In cluster.yaml, the header's commented command lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, block, pending, start = [], path.suffix == ".yaml", "", 0
    for number, raw in enumerate(lines, 1):
        if path.suffix == ".md" and raw.lstrip().startswith("```"):
            block = not block
            continue
        if not block:
            continue
        line = raw.strip()
        if path.suffix == ".yaml":
            if not line.startswith("#"):
                break  # the header ends where the YAML starts
            line = line.lstrip("#").strip()
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        line = line.split(" # ")[0].strip()
        if line:
            out.append((start, line))
    return out


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """The argv of each nlm / jobs / scripts command in `path`'s shell blocks."""
    found = []
    for number, line in shell_lines(path):
        if PLACEHOLDER.search(line):
            continue
        # a command starts the line, or follows `&&`, `;`, `|` or `exec` (inside `bash -c '...'`)
        for match in COMMAND.finditer(line):
            try:
                found.append((number, shlex.split(match.group(1))))
            except ValueError:
                continue  # an unbalanced quote belongs to the surrounding shell
    return found


def parse_nlm(argv: list[str]) -> None:
    """Parse `nlm ARGS` with the real parser; raises AssertionError with argparse's message."""
    command = argv[1]
    old_argv = sys.argv
    sys.argv = argv  # `nlm bench` picks its target's flags from sys.argv
    try:
        parser = cli._parser(command)
        parser.exit = _no_exit  # type: ignore[method-assign]
        parser.error = _no_exit_error  # type: ignore[method-assign]
        for action in parser._subparsers._group_actions if parser._subparsers else []:
            for sub in action.choices.values():
                _wire(sub)
        parser.parse_args(argv[1:])
    finally:
        sys.argv = old_argv


def _wire(parser: argparse.ArgumentParser) -> None:
    parser.exit = _no_exit  # type: ignore[method-assign]
    parser.error = _no_exit_error  # type: ignore[method-assign]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _wire(sub)


def _no_exit(status: int = 0, message: str | None = None) -> None:
    raise AssertionError(message or f"exit {status}")


def _no_exit_error(message: str) -> None:
    raise AssertionError(message)


CASES = [
    (path, number, argv)
    for path in [*DOCS, ROOT / "cluster.yaml"]
    for number, argv in commands(path)
]


def test_the_docs_show_commands() -> None:
    assert len(CASES) >= 15, "the command extraction found too few commands"


@pytest.mark.parametrize(
    ("path", "number", "argv"),
    CASES,
    ids=[f"{p.name}:{n}" for p, n, _ in CASES],
)
def test_a_documented_command_parses(path: Path, number: int, argv: list[str]) -> None:
    where = f"{path.relative_to(ROOT)}:{number}: {shlex.join(argv)}"
    if argv[0] in ("nlm", ".venv/bin/nlm"):
        try:
            parse_nlm(["nlm", *argv[1:]])
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
    else:  # python jobs/X.py ...: the job's own argument handling, up to `--help`
        assert (ROOT / argv[1]).is_file(), f"{where}: {argv[1]} does not exist"
        job = subprocess.run(
            [sys.executable, *argv[1:], "--help"], cwd=ROOT, capture_output=True, text=True
        )
        assert job.returncode == 0, f"{where}: {job.stderr.strip().splitlines()[-1:]}"
    for word in argv:
        if word.startswith(("configs/", "scripts/", "jobs/")):
            assert (ROOT / word).exists(), f"{where}: {word} does not exist"


INLINE = re.compile(r"`nlm ([a-z-]+)((?: [^`]*)?)`")


def inline_spans() -> list[tuple[Path, int, str, list[str], list[str]]]:
    """(path, line, command, its words, the flags among them) of each inline `nlm ...` span."""
    spans = []
    for path in DOCS:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in INLINE.finditer(line):
                words = match.group(2).split()
                flags = re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2))
                spans.append((path, number, match.group(1), words, flags))
    return spans


def test_inline_nlm_spans_name_real_commands_and_flags() -> None:
    problems = []
    for path, number, command, words, flags in inline_spans():
        where = f"{path.relative_to(ROOT)}:{number}"
        if command not in cli.COMMANDS:
            problems.append(f"{where}: `nlm {command}` is not a command")
            continue
        known = set()
        old_argv = sys.argv
        sys.argv = ["nlm", command, *words]  # `nlm bench` picks its target's flags from sys.argv
        try:
            parser = cli._parser(command)
        finally:
            sys.argv = old_argv
        stack = [parser]
        while stack:  # every option of the command and of its sub-commands
            p = stack.pop()
            known |= set(p._option_string_actions)
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
        problems += [f"{where}: `nlm {command}` has no {f}" for f in flags if f not in known]
    assert not problems, "\n".join(problems)
