"""One YAML config -> the flags of an `nlm` subcommand, for the jobs/ entrypoints.

    python jobs/evaluate.py configs/evaluate-wt2.yaml [--flag value ...]

Each key of the YAML file is an option of `nlm <command>` (underscores or dashes, as in the
flag's name); flags given after the file override it. An unknown key, a bad value or unreadable
YAML exits with status 2 and one `nlm: error: FILE:LINE ...` line in the job's log.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nlm.errors import NLMError


def _load(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """The YAML mapping and each top-level key's line number."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: cannot read the config ({exc})") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise NLMError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise NLMError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    return data, lines


def _subcommand_parser(command: str) -> argparse.ArgumentParser:
    from nlm.cli import _module

    parser = argparse.ArgumentParser(prog=f"nlm {command}")
    _module(command).add_arguments(parser)
    return parser


def config_argv(command: str, path: str) -> list[str]:
    """The command line of `nlm <command>` that the YAML file at `path` stands for."""
    data, lines = _load(path)
    actions = {a.dest: a for a in _subcommand_parser(command)._actions if a.dest != "help"}
    positional: list[str] = []
    flags: list[str] = []
    for key, value in data.items():
        where = f"{path}:{lines.get(key, '?')} (field '{key}')"
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            known = ", ".join(sorted(actions))
            raise NLMError(f"{where}: not an option of `nlm {command}` (known: {known})")
        if not action.option_strings:  # a positional argument, e.g. serve's checkpoints
            positional += [str(v) for v in (value if isinstance(value, list) else [value])]
            continue
        flag = next(s for s in action.option_strings if s.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                raise NLMError(f"{where}: expected true or false, got {value!r}")
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            if not isinstance(value, bool):
                raise NLMError(f"{where}: expected true or false, got {value!r}")
            if value:
                flags.append(flag)
        elif isinstance(value, list):
            if isinstance(action, argparse._AppendAction):
                for item in value:
                    flags += [flag, str(item)]
            else:
                flags += [flag, *map(str, value)]
        elif value is None:
            continue
        else:
            flags += [flag, str(value)]
    return positional + flags


def run_with_config(command: str, argv: list[str] | None = None) -> None:
    """`python jobs/X.py CONFIG.yaml [flags]`: run `nlm <command>` with the config's flags."""
    from nlm.cli import main

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(f"usage: python {sys.argv[0]} CONFIG.yaml [nlm {command} flags]", file=sys.stderr)
        raise SystemExit(2)
    try:
        from_config = config_argv(command, argv[0])
    except NLMError as exc:
        print(f"nlm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    main([command, *from_config, *argv[1:]])
