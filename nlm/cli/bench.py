"""`nlm bench data|train|serve`: the project's benchmarks, one module each, imported lazily.

    nlm bench data     nlm.bench.data   corpus pipeline vs single-process SentencePiece
    nlm bench train    nlm.bench.train  nlm train (1 and 2 workers) vs a plain PyTorch loop
    nlm bench serve    nlm.bench.serve          Ray Serve with/without batching vs plain FastAPI
    nlm bench gpu      nlm.bench.gpu    one GPU, no Ray: training MFU, generation, CPU agreement
    nlm bench quality  nlm.bench.quality  nlm's models vs word_language_model's recipe, equal terms
    nlm bench tokenizers  nlm.bench.tokenizers  word, char, BPE, unigram at one budget, bits/byte

A benchmark module exposes `add_arguments(parser)` and `run(args) -> int | None` (like the
subcommand modules), or else `main(argv: list[str])`, which gets the remaining arguments.
Only the chosen benchmark's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from nlm.errors import NLMError

TARGETS: dict[str, tuple[str, str]] = {
    "data": ("nlm.bench.data", "corpus pipeline throughput and memory"),
    "train": ("nlm.bench.train", "training throughput: plain PyTorch vs 1 and 2 workers"),
    "serve": ("nlm.bench.serve", "serving throughput and latency, batched vs unbatched"),
    "gpu": ("nlm.bench.gpu", "the one-shot GPU check: training MFU, generation, agreement"),
    "quality": (
        "nlm.bench.quality",
        "test ppl and bits/byte: nlm train vs the word_language_model recipe, equal terms",
    ),
    "tokenizers": ("nlm.bench.tokenizers", "bits/byte of word, char, BPE, unigram at one budget"),
}


def _load(target: str) -> ModuleType:
    name = TARGETS[target][0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise NLMError(
                f"nlm bench {target}: {name} is not installed in this checkout"
            ) from None
        raise


def _chosen(argv: list[str]) -> str | None:
    words = [a for a in argv if not a.startswith("-")]
    if "bench" in words:
        rest = words[words.index("bench") + 1 :]
        return rest[0] if rest and rest[0] in TARGETS else None
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    chosen = _chosen(sys.argv[1:])
    for target, (_, help_text) in TARGETS.items():
        p = sub.add_parser(target, help=help_text, description=help_text)
        if target != chosen:
            continue
        try:
            module = _load(target)
        except NLMError:
            module = None
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
        else:
            p.add_argument("argv", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def run(args: argparse.Namespace) -> int | None:
    module = _load(args.target)
    if hasattr(module, "run") and hasattr(module, "add_arguments"):
        return module.run(args)
    if hasattr(module, "main"):
        return module.main(list(getattr(args, "argv", []) or []))
    raise NLMError(f"nlm bench {args.target}: {TARGETS[args.target][0]} has no run() or main()")
