"""`nlm study`: the word-vector study end to end (prepare, train fnn/rnn/lstm, compare, report).

    nlm study --corpus pku --out reports/pku
    nlm study --config configs/study-wt2.yaml --out reports/wt2 --max-steps 500

Settings: defaults < --config YAML < flags. --dry-run prints the commands it would run.
"""

from __future__ import annotations

import argparse

from nlm.wordvectors import WHICH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="study directory (shards, runs, report)")
    parser.add_argument("--config", help="a configs/study-*.yaml file")
    parser.add_argument("--corpus", help="pku (pku-lm) or wt2-mini")
    parser.add_argument("--models", help="comma-separated families (default fnn,rnn,lstm)")
    parser.add_argument("--preset", help="model preset (default notes)")
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--workers", type=int, help="Ray Train workers per model (default 2)")
    parser.add_argument("--max-steps", type=int, help="training steps per model (default 1500)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: STUDY_LR, 3e-3)")
    parser.add_argument("--random", type=int, dest="n_words", help="words to draw (default 20)")
    parser.add_argument("--k", type=int, help="neighbours per word (default 10)")
    parser.add_argument("--seed", type=int, help="seed of the word draw (default 7)")
    parser.add_argument("--which", choices=WHICH, help="which embedding table (default input)")
    parser.add_argument("--min-count", type=int, help="frequency floor of the word draw")
    parser.add_argument("--force", action="store_true", help="redo steps that are already done")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")


FLAGS = ("corpus", "preset", "vocab_size", "seq_len", "workers", "max_steps", "lr", "n_words", "k")
FLAGS += ("seed", "which", "min_count")


def run(args: argparse.Namespace) -> int:
    from nlm.study.pipeline import StudyConfig, run_study

    config = StudyConfig.load_yaml(args.config) if args.config else StudyConfig()
    changes = {name: getattr(args, name) for name in FLAGS if getattr(args, name) is not None}
    if args.models:
        changes["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    config = config.replace(**changes).check(args.config or "study config")
    data = run_study(config, args.out, force=args.force, dry_run=args.dry_run)
    if data is not None:
        from nlm.cli.compare import summary

        print(summary(data))
        print(f"report: {args.out}/report.md")
    return 0
