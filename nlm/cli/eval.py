"""`nlm eval`: perplexity and bits/byte of a checkpoint on a text file.

Prints one JSON object on the last line of stdout; the progress bar goes to stderr.
How the text is read and scored is described in nlm/evaluation.py.
"""

from __future__ import annotations

import argparse
import json

from nlm.device import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    parser.add_argument(
        "--input", required=True, help="UTF-8 text file; each non-empty line is a document"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="windows (rnn/lstm: parallel streams) per batch"
    )
    parser.add_argument(
        "--seq-len", type=int, default=None, help="window length (default: min(128, model context))"
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="gpt: window step (default: 3/4 of seq-len, so each scored token keeps at least "
        "seq-len/4 tokens of context)",
    )
    parser.add_argument(
        "--max-pll-tokens", type=int, default=2000, help="bert: tokens scored for pseudo-perplexity"
    )
    parser.add_argument("--seed", type=int, default=0, help="bert: the MLM masking seed")
    parser.add_argument(
        "--record",
        action="store_true",
        help="also write test_ppl / test_bits_per_byte into the checkpoint's metrics.json "
        "(what /v1/models reports)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_device_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from nlm.evaluation import evaluate_file

    result = evaluate_file(
        args.checkpoint,
        args.input,
        progress=not args.no_progress,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        stride=args.stride,
        max_pll_tokens=args.max_pll_tokens,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
    )
    if args.record:
        from pathlib import Path

        from nlm.checkpoint import record_metrics
        from nlm.evaluation import metrics_to_record

        record_metrics(
            args.checkpoint, {**metrics_to_record(result), "test_file": Path(args.input).name}
        )
    print(json.dumps(result))
    return 0
