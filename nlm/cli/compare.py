"""`nlm compare`: compare the word vectors of checkpoints that share a vocabulary.

    nlm compare runs/fnn runs/rnn runs/lstm --random 20 --k 10 --out reports/cmp

Writes OUT/report.md, OUT/report.json and PNG figures; prints the pairwise table.
"""

from __future__ import annotations

import argparse

from nlm.wordvectors import WHICH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", help="checkpoint or run directories (2 or more)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--words", help="comma-separated words (default: --random 20)")
    group.add_argument("--random", type=int, default=20, metavar="N", help="draw N words")
    parser.add_argument("--k", type=int, default=10, help="neighbours per word (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random draw")
    parser.add_argument(
        "--min-count", type=int, default=5, help="--random draws words seen at least this often"
    )
    parser.add_argument("--which", choices=WHICH, default="input", help="which embedding table")
    parser.add_argument("--out", required=True, help="report directory")
    parser.add_argument("--title", default="Word-vector comparison", help="report.md heading")


def run(args: argparse.Namespace) -> int:
    from nlm.study.compare import compare_checkpoints

    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    data = compare_checkpoints(
        args.checkpoints,
        args.out,
        words=words,
        n_random=args.random,
        k=args.k,
        seed=args.seed,
        which=args.which,
        min_count=args.min_count,
        title=args.title,
    )
    print(summary(data))
    print(f"report: {args.out}/report.md")
    return 0


def summary(data: dict) -> str:
    k = data["k"]
    lines = [
        f"{'pair':<16} {'ovl@' + str(k) + ' words':>14} {'vocab':>7} {'spearman':>9} "
        f"{'cka':>6} {'procr':>6}"
    ]
    for p in data["pairs"]:
        lines.append(
            f"{p['a'] + '-' + p['b']:<16} {p['overlap_words']:>14.3f} {p['overlap_vocab']:>7.3f} "
            f"{p['spearman']:>9.3f} {p['cka']:>6.3f} {p['procrustes']:>6.3f}"
        )
    lines.append(f"(overlap by chance: {data['chance_overlap']:.3f})")
    return "\n".join(lines)
