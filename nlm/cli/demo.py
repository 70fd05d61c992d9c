"""`nlm demo` (`make demo`): the project's main job, end to end, on the local machine.

    nlm demo                      # Ray: prepare -> train x5 (+ an lstm on pku) -> eval -> Serve
    nlm demo --in-process         # the foundation version: one process, plain PyTorch, no Ray

The Ray pipeline lives in nlm.workflows.demo, the one-process version in nlm.workflows.foundation_demo.
Both write under --out (default runs/demo), replacing an earlier demo run there.
"""

from __future__ import annotations

import argparse

from nlm.workflows.foundation_demo import DEFAULT_FAMILIES, FAMILIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="everything goes under OUT")
    parser.add_argument(
        "--families",
        default=",".join(DEFAULT_FAMILIES),
        help=f"comma-separated, of {','.join(FAMILIES)} (default: {','.join(DEFAULT_FAMILIES)})",
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="stop each model after at most N steps"
    )
    parser.add_argument(
        "--test-lines", type=int, default=None, help="evaluate on the first N non-empty lines"
    )
    parser.add_argument("--max-pll-tokens", type=int, default=1000, help="bert pseudo-ppl tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    ray = parser.add_argument_group("the Ray pipeline (default)")
    ray.add_argument("--workers", type=int, default=2, help="Ray Train workers per model")
    ray.add_argument("--no-pku", action="store_true", help="skip the pku shards and the pku lstm")
    ray.add_argument("--port", type=int, default=0, help="Serve's HTTP port (0: a free one)")
    local = parser.add_argument_group("the one-process version")
    local.add_argument(
        "--in-process", action="store_true", help="plain PyTorch in this process, no Ray"
    )
    local.add_argument("--corpus", default="wt2-mini", help="named corpus (nlm.corpora)")
    local.add_argument("--preset", default="tiny", help="model size preset (tiny, small)")
    local.add_argument("--seconds", type=float, default=45.0, help="training budget per model")
    local.add_argument("--bert-seconds", type=float, default=15.0, help="bert's training budget")
    local.add_argument(
        "--min-steps",
        type=int,
        default=400,
        help="train at least N steps (bert N/10), however slow",
    )
    local.add_argument("--batch-size", type=int, default=16)
    local.add_argument("--seq-len", type=int, default=64, help="tokens per training row")
    local.add_argument("--min-count", type=int, default=3, help="keep words seen this often")
    local.add_argument("--vocab-size", type=int, default=None, help="keep the top-V words")


def run(args: argparse.Namespace) -> int:
    from nlm.errors import NLMError

    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        raise NLMError(
            f"--families: unknown model '{unknown[0] if unknown else ''}' (known: {', '.join(FAMILIES)})"
        )
    if args.in_process:
        return _in_process(args, families)

    from nlm.workflows.demo import DemoConfig, run_demo

    config = DemoConfig(
        out=args.out,
        families=list(families),
        workers=args.workers,
        max_steps=args.max_steps,
        test_lines=args.test_lines,
        max_pll_tokens=args.max_pll_tokens,
        pku=not args.no_pku,
        port=args.port,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result = run_demo(config)
    return 0 if result["ok"] else 1


def _in_process(args: argparse.Namespace, families: tuple[str, ...]) -> int:
    from nlm.workflows.foundation_demo import clear_out_dir, format_table, run_foundation_demo

    clear_out_dir(args.out)
    results = run_foundation_demo(
        corpus=args.corpus,
        out_dir=args.out,
        families=families,
        preset=args.preset,
        seconds=args.seconds,
        bert_seconds=args.bert_seconds,
        min_steps=args.min_steps,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        test_lines=args.test_lines,
        min_count=args.min_count,
        vocab_size=args.vocab_size,
        max_pll_tokens=args.max_pll_tokens,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(format_table(results))
    print(f"\nrun directories and results.json in {args.out}")
    return 0
