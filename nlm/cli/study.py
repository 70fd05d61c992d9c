"""`nlm study`: the word-vector study end to end (prepare, train fnn/rnn/lstm, compare, report).

    nlm study --corpus pku --out reports/pku
    nlm study --config configs/study-wt2.yaml --out reports/wt2 --max-steps 500

Settings: defaults < --config YAML < flags. --dry-run prints the commands it would run.

The polysemy study (nlm/study/contextual.py) on trained checkpoints, beside the static vectors of
OUT/runs/* (or --static):

    nlm study --contextual --out reports/wt2 --corpus wt2-mini --elmo runs/elmo --bert runs/bert
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
    group = parser.add_argument_group("the polysemy study (--contextual)")
    group.add_argument(
        "--contextual",
        action="store_true",
        help="cluster each occurrence's contextual vector (elmo, bert) instead of training",
    )
    group.add_argument("--elmo", help="an elmo checkpoint or run dir")
    group.add_argument("--bert", help="a bert checkpoint or run dir (compared on the same words)")
    group.add_argument(
        "--static", help="NAME=CHECKPOINT,... static-vector models (default: OUT/runs/*)"
    )
    group.add_argument("--words", help="comma-separated words (default: picked by separation)")
    group.add_argument(
        "--occurrences", type=int, default=40, help="occurrences per word (default 40)"
    )


FLAGS = ("corpus", "preset", "vocab_size", "seq_len", "workers", "max_steps", "lr", "n_words", "k")
FLAGS += ("seed", "which", "min_count")


def run_contextual_study(args: argparse.Namespace) -> int:
    from nlm.corpora import resolve_corpus
    from nlm.errors import NLMError
    from nlm.evaluation import read_documents
    from nlm.study.contextual import run_contextual, static_runs

    contextual = {name: getattr(args, name) for name in ("elmo", "bert") if getattr(args, name)}
    if not contextual:
        raise NLMError("--contextual needs --elmo and/or --bert (checkpoints or run dirs)")
    static = static_runs(args.out)
    if args.static:
        static = {}
        for item in args.static.split(","):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise NLMError(f"--static: '{item}' is not NAME=CHECKPOINT")
            static[name.strip()] = path.strip()
    documents = read_documents(resolve_corpus(args.corpus or "wt2-mini").train)
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    run_contextual(
        documents, contextual, static, args.out, words=words,
        n_words=args.n_words or 6, occurrences_per_word=args.occurrences,
        k=args.k or 8, seed=args.seed if args.seed is not None else 7,
    )  # fmt: skip
    print(f"report: {args.out}/contextual.md")
    return 0


def run(args: argparse.Namespace) -> int:
    from nlm.study.pipeline import StudyConfig, run_study

    if args.contextual:
        return run_contextual_study(args)

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
