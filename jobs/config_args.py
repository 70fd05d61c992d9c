"""The one convention of the jobs/ entrypoints: `python jobs/X.py [CONFIG.yaml] [flags]`.

    ray job submit --working-dir . -- python jobs/pretrain.py configs/gpt-small.yaml --max-steps 500
    ray job submit --working-dir . -- python jobs/evaluate.py configs/cluster-evaluate-wt2.yaml

Each job runs one `nlm` subcommand (`run_job(command)`). A YAML file as the first argument
stands for that command's flags: each key is an option of `nlm <command>` (underscores or
dashes, as in the flag's name); flags given after the file override it. Without a YAML file
the arguments are the subcommand's own (`--config FILE` included, where it has one). An
unknown key, a bad value or unreadable YAML exits with status 2 and one
`nlm: error: FILE:LINE ...` line in the job's log.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nlm.errors import NLMError


def config_argv(command: str, path: str) -> list[str]:
    """The command line of `nlm <command>` that the YAML file at `path` stands for."""
    from nlm.cli import command_parser
    from nlm.config import read_yaml

    data = read_yaml(path, what="options")
    # argparse keeps its actions in `_actions` (it has no public listing)
    parser = command_parser(command)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    positional: list[str] = []
    flags: list[str] = []
    for key, value in data.items():
        where = f"{path}:{data.lines.get(str(key), '?')} (field '{key}')"
        action = actions.get(str(key).replace("-", "_"))
        if action is None:
            known = ", ".join(sorted(actions))
            raise NLMError(f"{where}: not an option of `nlm {command}` (known: {known})")
        if not action.option_strings:  # a positional argument, e.g. serve's checkpoints
            positional += [str(v) for v in (value if isinstance(value, list) else [value])]
            continue
        flags += _flag_args(action, value, where)
    return positional + flags


def _flag_args(action: argparse.Action, value: Any, where: str) -> list[str]:
    flag = next(s for s in action.option_strings if s.startswith("--"))
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        if not isinstance(value, bool):
            raise NLMError(f"{where}: expected true or false, got {value!r}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return [flag if value else f"--no-{flag[2:]}"]
        return [flag] if value else []  # store_true
    if value is None:
        return []
    if isinstance(value, dict):  # KEY=VALUE options, e.g. --worker-resource data=1
        return [arg for k, v in value.items() for arg in (flag, f"{k}={v}")]
    if isinstance(value, list):
        if isinstance(action, argparse._AppendAction):
            return [arg for item in value for arg in (flag, str(item))]
        if action.nargs in ("+", "*"):
            return [flag, *map(str, value)]
        return [flag, ",".join(map(str, value))]  # a comma-separated list, e.g. --betas
    return [flag, str(value)]


def run_job(command: str, argv: list[str] | None = None) -> None:
    """`python jobs/X.py [CONFIG.yaml] [flags]`: run `nlm <command>` with the file's flags."""
    from nlm.cli import main

    argv = sys.argv[1:] if argv is None else argv
    from_config: list[str] = []
    if argv and not argv[0].startswith("-") and argv[0].endswith((".yaml", ".yml")):
        try:
            from_config = config_argv(command, argv[0])
        except NLMError as exc:
            print(f"nlm: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        argv = argv[1:]
    main([command, *from_config, *argv])
