"""`nlm finetune`: fine-tune a pretrained gpt or bert (Ray Train + DeepSpeed), and its helpers.

    nlm finetune --checkpoint runs/bert-zh --task tag --train data/cws-train.jsonl \\
                 --eval data/cws-test.jsonl --out runs/bert-cws
    nlm finetune --checkpoint runs/gpt-small --task classify --lm-weight 0.5 \\
                 --train train.jsonl --eval test.jsonl --out runs/gpt-cls
    nlm finetune --config configs/finetune-cws.yaml --epochs 5        # flags override the file

    nlm finetune convert-cws --input pku_test_gold.utf8 --output data/cws-train.jsonl \\
                 --test-output data/cws-test.jsonl --test-fraction 0.1
    nlm finetune maxmatch --train data/cws-train.jsonl --eval data/cws-test.jsonl
    nlm finetune evaluate --checkpoint runs/bert-cws --eval data/cws-test.jsonl \\
                 [--train data/cws-train.jsonl]

convert-cws turns segmented text (words separated by spaces) into B/M/E/S tagging JSONL: with
--test-output the first lines go to --output and the last --test-fraction to --test-output.
maxmatch is the dictionary baseline (forward maximum matching with the training words; --backward
for backward). evaluate scores a fine-tuned checkpoint on a JSONL file (SIGHAN word scores for a
segmenter; --train adds the OOV recall). Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

ACTIONS = ("train", "convert-cws", "maxmatch", "evaluate")

HELP = {
    "checkpoint": "pretrained gpt/bert checkpoint or run directory",
    "task": "classify (JSONL text/label or text_a/text_b/label) | tag (JSONL tokens/tags)",
    "train": "training JSONL",
    "eval": "evaluation JSONL",
    "out": "run directory (config.yaml, metrics.jsonl, tb/, model/)",
    "overwrite": "replace an existing run in --out",
    "lm_weight": "gpt: λ in L = L2 + λ·L1 (task loss + language-model loss); 0 disables L1",
    "from_scratch": "train the checkpoint's architecture from fresh weights (a control)",
    "max_length": "ids per input including specials (0: the model's maximum)",
    "dropout": "dropout while fine-tuning (default: the pretrained model's)",
    "epochs": "passes over the training rows (when --max-steps is 0)",
    "max_steps": "optimizer steps (0: epochs x steps per epoch)",
    "micro_batch": "examples per worker per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_fraction": "fraction of the steps spent in linear warm-up",
    "weight_decay": "AdamW weight decay (matrices only)",
    "grad_clip": "gradient norm clipping (0: off)",
    "seed": "random seed",
    "workers": "Ray Train workers (data-parallel ranks)",
    "cpus_per_worker": "logical CPUs each worker reserves",
    "device": "auto | cpu | cuda",
    "zero_stage": "DeepSpeed ZeRO stage 0..3",
    "torch_threads": "torch threads per worker (0: node cores / workers)",
    "eval_every": "steps between evaluations (0: once an epoch)",
    "log_every": "steps between metric lines",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nlm.finetune.config import FinetuneConfig

    parser.add_argument(
        "action",
        nargs="?",
        default="train",
        choices=ACTIONS,
        help="train (default), convert-cws, maxmatch or evaluate",
    )
    parser.add_argument("--config", help="YAML file of fine-tuning fields; flags override it")
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(FinetuneConfig):
        flag = "--" + field.name.replace("_", "-")
        kind, text = hints[field.name], HELP.get(field.name, field.name)
        if kind is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        else:
            convert = float if field.name == "dropout" else kind
            parser.add_argument(flag, dest=field.name, type=convert, default=None, help=text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cws = parser.add_argument_group("convert-cws / maxmatch")
    cws.add_argument("--input", help="convert-cws: segmented text, words separated by spaces")
    cws.add_argument("--output", help="convert-cws: the JSONL to write (the training part)")
    cws.add_argument(
        "--test-output", help="convert-cws: JSONL for the last --test-fraction of lines"
    )
    cws.add_argument("--test-fraction", type=float, default=0.1, help="convert-cws (default 0.1)")
    cws.add_argument("--backward", action="store_true", help="maxmatch: backward maximum matching")


def resolve_config(args: argparse.Namespace) -> Any:
    from nlm.cluster.train.config import read_yaml
    from nlm.finetune.config import FinetuneConfig

    data: dict[str, Any] = {}
    source = "command line"
    if args.config:
        data, source = read_yaml(args.config), args.config
    for field in dataclasses.fields(FinetuneConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            data[field.name] = value
    return FinetuneConfig.from_dict(data, source=source).check(source)


def run(args: argparse.Namespace) -> int:
    action = {
        "train": _train,
        "convert-cws": _convert,
        "maxmatch": _maxmatch,
        "evaluate": _evaluate,
    }
    result = action[args.action](args)
    print(json.dumps(result, ensure_ascii=False))
    return 0


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from nlm.cluster.finetune.loop import finetune

    return finetune(resolve_config(args), progress=not args.no_progress)


def _require(args: argparse.Namespace, *names: str) -> None:
    from nlm.errors import NLMError

    for name in names:
        if not getattr(args, name):
            raise NLMError(f"nlm finetune {args.action}: --{name.replace('_', '-')} is required")


def _convert(args: argparse.Namespace) -> dict[str, Any]:
    from nlm.finetune.cws import convert_cws

    _require(args, "input", "output")
    return convert_cws(args.input, args.output, args.test_output, args.test_fraction)


def _segmentation_file(path: str) -> tuple[list[Any], list[list[str]]]:
    """(examples, gold words per line) of a B/M/E/S JSONL file."""
    from nlm.finetune.cws import tags_to_words
    from nlm.finetune.data import BMES, check_labels, read_examples

    examples = read_examples(path, "tag")
    check_labels(examples, list(BMES), path)
    return examples, [tags_to_words(e.tokens, e.tags) for e in examples]


def _maxmatch(args: argparse.Namespace) -> dict[str, Any]:
    from nlm.finetune.cws import MaxMatch, score_segmentation

    _require(args, "train", "eval")
    _, train_words = _segmentation_file(args.train)
    vocabulary = {w for words in train_words for w in words}
    examples, gold = _segmentation_file(args.eval)
    segmenter = MaxMatch(vocabulary)
    predicted = [segmenter.segment("".join(e.tokens), backward=args.backward) for e in examples]
    score = score_segmentation(gold, predicted, vocabulary)
    method = "backward" if args.backward else "forward"
    return {
        "method": f"{method} maximum matching",
        "vocabulary": len(vocabulary),
        "train": args.train,
        "eval": args.eval,
        **score,
    }


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from nlm.finetune.data import check_labels, read_examples
    from nlm.finetune.heads import load_task_checkpoint
    from nlm.finetune.predict import Predictor, evaluate

    _require(args, "checkpoint", "eval")
    checkpoint = load_task_checkpoint(args.checkpoint)
    examples = read_examples(args.eval, checkpoint.task)
    check_labels(examples, checkpoint.labels, args.eval)
    train_words = None
    if args.train:
        train_words = {w for words in _segmentation_file(args.train)[1] for w in words}
    result = evaluate(Predictor(checkpoint), examples, train_words)
    return {"checkpoint": str(Path(checkpoint.path)), "eval": args.eval, **result}
