"""`nlm neighbors`: the nearest words of chosen or randomly drawn words, by cosine similarity.

    nlm neighbors --checkpoint runs/lstm --random 20 --k 10 --seed 7
    nlm neighbors --checkpoint runs/lstm --words 经济,发展,人民

The output depends only on the checkpoint and the flags, so two runs print the same bytes.
"""

from __future__ import annotations

import argparse
import json
import sys

from nlm.wordvectors import WHICH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir or run dir (RUN/model)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--words", help="comma-separated words")
    group.add_argument("--random", type=int, metavar="N", help="draw N words from the vocabulary")
    parser.add_argument("--k", type=int, default=10, help="neighbours per word (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random draw")
    parser.add_argument(
        "--min-count", type=int, default=5, help="--random draws words seen at least this often"
    )
    parser.add_argument("--which", choices=WHICH, default="input", help="which embedding table")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from nlm.checkpoint import load_checkpoint
    from nlm.study.compare import choose_words
    from nlm.wordvectors import neighbors

    ckpt = load_checkpoint(args.checkpoint)
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    chosen = choose_words(ckpt.tokenizer, words, args.random or 0, args.seed, args.min_count)
    result = {w: neighbors(ckpt.model, ckpt.tokenizer, w, args.k, args.which) for w in chosen}
    if args.json:
        rows = {w: [[t, round(s, 4)] for t, s in ns] for w, ns in result.items()}
        sys.stdout.write(json.dumps(rows, ensure_ascii=False, indent=2) + "\n")
        return 0
    lines = []
    for word, ns in result.items():
        lines.append(f"{word}")
        lines += [f"  {r:>2}  {s:+.4f}  {t}" for r, (t, s) in enumerate(ns, 1)]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
