"""`nlm import`: a `transformers` GPT-2 or BERT model as an nlm checkpoint.

    nlm import hf/some-gpt2-dir runs/imported-gpt2      # then nlm eval / serve / finetune it
    nlm import gpt2 runs/gpt2                           # a Hub id, where there is a network

The checkpoint gets an "hf" tokenizer (the model's own, ids remapped so nlm's special tokens
are 0-6); see nlm/hf/importer.py. Prints one JSON line. The module is `import_` because
`import` is a Python keyword; nlm/cli/__init__.py maps the command to it.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="transformers model directory (or Hub id)")
    parser.add_argument("out", help="nlm checkpoint directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")


def run(args: argparse.Namespace) -> int:
    from nlm.hf import import_hf

    print(json.dumps(import_hf(args.source, args.out, overwrite=args.overwrite)))
    return 0
