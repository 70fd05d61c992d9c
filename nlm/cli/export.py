"""`nlm export --format hf`: an nlm checkpoint as a `transformers` model directory.

    nlm export --format hf runs/gpt-small  exports/gpt-small     # GPT2LMHeadModel + tokenizer
    nlm export --format hf runs/bert-small exports/bert-small    # BertForPreTraining (MLM + NSP)
    nlm export --from hf hf/some-gpt2-dir runs/imported-gpt2     # the other way: `nlm import`

What is written and checked: nlm/hf/export.py (and nlm/hf/importer.py for --from hf). Prints
one JSON line. fnn, rnn and lstm have no `transformers` class: refused in one line.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="nlm checkpoint or run directory (with --from hf: a transformers directory or Hub id)",
    )
    parser.add_argument("out", help="directory to write (must not exist unless --overwrite)")
    parser.add_argument(
        "--format",
        default="hf",
        choices=["hf"],
        help="hf: a transformers model directory (the only format)",
    )
    parser.add_argument(
        "--from",
        dest="from_format",
        default=None,
        choices=["hf"],
        help="read a transformers model instead and write an nlm checkpoint",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> int:
    if args.from_format == "hf":
        from nlm.hf import import_hf

        summary = import_hf(args.source, args.out, overwrite=args.overwrite)
    else:
        from nlm.hf import export_hf

        summary = export_hf(args.source, args.out, overwrite=args.overwrite)
    print(json.dumps(summary))
    return 0
