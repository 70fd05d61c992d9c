"""`nlm` command-line entry point.

Each subcommand lives in its own module `nlm/cli/<name>.py` exposing
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int | None
Only the chosen subcommand's module is imported, so `nlm eval` never pays for importing Ray.
User errors (`NLMError`) become one line on stderr and exit status 2, never a traceback.
Before anything imports Ray, `nlm.cluster.local_ray.secure_environment()` sets up token
authentication and loopback binding for the local Ray instance a command may start.
"""

from __future__ import annotations

import argparse
import importlib
import keyword
import sys
from typing import NoReturn

from nlm.errors import NLMError

# name -> one-line help. The module is nlm.cli.<name> (dashes become underscores; a name that
# is a Python keyword gets a trailing underscore: `import` is nlm/cli/import_.py).
COMMANDS: dict[str, str] = {
    "prepare": "tokenize a corpus into Parquet shards with Ray Data",
    "train": "pretrain a model with Ray Train + DeepSpeed",
    "eval": "perplexity and bits/byte of a checkpoint on a text file",
    "generate": "sample text from a causal checkpoint",
    "serve": "serve checkpoints over HTTP with Ray Serve",
    "neighbors": "nearest neighbours of words in a checkpoint's embedding table",
    "compare": "compare the word vectors of several checkpoints",
    "study": "the word-vector study: prepare, train fnn/rnn/lstm, compare, report",
    "finetune": "fine-tune a pretrained gpt or bert checkpoint",
    "export": "write a gpt/bert checkpoint as a Hugging Face transformers model",
    "import": "read a Hugging Face GPT-2/BERT model into an nlm checkpoint",
    "bench": "benchmarks (data, train, serve, gpu)",
    "demo": "run the project's main job end to end on the local machine",
}
# The commands that may start a local Ray instance (the others never import Ray).
RAY_COMMANDS = ("prepare", "train", "finetune", "serve", "study", "bench", "demo")


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `nlm <name>` on its own (its options bound by the command's module), for
    programs that turn other inputs into its flags (jobs/config_args.py)."""
    parser = _Parser(prog=f"nlm {name}", description=COMMANDS[name])
    _module(name).add_arguments(parser)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with nlm's error convention: one line `nlm: error: ...` and exit 2 (argparse
    prints the whole usage first). Sub-parsers are of the same class (add_subparsers)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"nlm: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = _Parser(prog="nlm", description="Neural language models on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    module = name.replace("-", "_")
    if keyword.iskeyword(module):
        module += "_"
    return importlib.import_module(f"nlm.cli.{module}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    if command in RAY_COMMANDS:
        # Before the subcommand imports Ray: a local instance gets a per-run token and loopback.
        from nlm.cluster.local_ray import secure_environment

        secure_environment()
    args = _parser(command).parse_args(argv)
    try:
        code = _module(args.command).run(args)
    except NLMError as exc:
        print(f"nlm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("nlm: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
