"""`nlm finetune`: fine-tune a pretrained gpt or bert (Ray Train + DeepSpeed), and its helpers.

    nlm finetune --checkpoint runs/bert-zh --task tag --train data/cws-train.jsonl \\
                 --eval data/cws-test.jsonl --out runs/bert-cws
    nlm finetune --checkpoint runs/gpt-small --task classify --lm-weight 0.5 \\
                 --train train.jsonl --eval test.jsonl --out runs/gpt-cls
    nlm finetune --config configs/finetune-cws.yaml --epochs 5        # flags override the file

    nlm finetune convert-cws --input pku_test_gold.utf8 --output data/cws-train.jsonl \\
                 --test-output data/cws-test.jsonl --test-fraction 0.1
    nlm finetune convert-cws --format seq2seq --max-chars 30 --input pku_test_gold.utf8 \\
                 --output data/cws-s2s-train.jsonl --test-output data/cws-s2s-test.jsonl
    nlm finetune maxmatch --train data/cws-train.jsonl --eval data/cws-test.jsonl
    nlm finetune evaluate --checkpoint runs/bert-cws --eval data/cws-test.jsonl \\
                 [--train data/cws-train.jsonl]

convert-cws turns segmented text (words separated by spaces) into B/M/E/S tagging JSONL: with
--test-output the first lines go to --output and the last --test-fraction to --test-output;
--format seq2seq writes {"source", "target"} windows of at most --max-chars characters for
`--task seq2seq` instead (nlm/finetune/cws_seq2seq.py).
maxmatch is the dictionary baseline (forward maximum matching with the training words; --backward
for backward). evaluate scores a fine-tuned checkpoint on a JSONL file (SIGHAN word scores for a
segmenter; --train adds the OOV recall); given a seq2seq (transformer) checkpoint and B/M/E/S
JSONL, it segments the text by constrained decoding and scores it the same way. Each prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ACTIONS = ("train", "convert-cws", "maxmatch", "evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nlm.config import add_config_arguments
    from nlm.finetune.config import FinetuneConfig

    parser.add_argument(
        "action",
        nargs="?",
        default="train",
        choices=ACTIONS,
        help="train (default), convert-cws, maxmatch or evaluate",
    )
    parser.add_argument("--config", help="YAML file of fine-tuning fields; flags override it")
    add_config_arguments(parser, FinetuneConfig)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cws = parser.add_argument_group("convert-cws / maxmatch")
    cws.add_argument("--input", help="convert-cws: segmented text, words separated by spaces")
    cws.add_argument("--output", help="convert-cws: the JSONL to write (the training part)")
    cws.add_argument(
        "--test-output", help="convert-cws: JSONL for the last --test-fraction of lines"
    )
    cws.add_argument("--test-fraction", type=float, default=0.1, help="convert-cws (default 0.1)")
    cws.add_argument(
        "--format",
        choices=("tag", "seq2seq"),
        default="tag",
        help="convert-cws: B/M/E/S tagging JSONL (default) or seq2seq source/target windows",
    )
    cws.add_argument(
        "--max-chars",
        type=int,
        default=30,
        help="convert-cws --format seq2seq: characters per window (default 30)",
    )
    cws.add_argument("--backward", action="store_true", help="maxmatch: backward maximum matching")


def resolve_config(args: argparse.Namespace) -> Any:
    from nlm.config import args_to_dict, read_yaml
    from nlm.finetune.config import FinetuneConfig

    data: dict[str, Any] = {}
    source = "command line"
    if args.config:
        data, source = read_yaml(args.config), args.config
    data = args_to_dict(FinetuneConfig, args, data)
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
    if args.format == "seq2seq":
        from nlm.finetune.cws_seq2seq import convert_cws_seq2seq

        return convert_cws_seq2seq(
            args.input, args.output, args.test_output, args.test_fraction, args.max_chars
        )
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
    if _is_seq2seq_checkpoint(args.checkpoint):
        return _evaluate_seq2seq(args)
    checkpoint = load_task_checkpoint(args.checkpoint)
    examples = read_examples(args.eval, checkpoint.task)
    check_labels(examples, checkpoint.labels, args.eval)
    train_words = None
    if args.train:
        train_words = {w for words in _segmentation_file(args.train)[1] for w in words}
    result = evaluate(Predictor(checkpoint), examples, train_words)
    return {"checkpoint": str(Path(checkpoint.path)), "eval": args.eval, **result}


def _is_seq2seq_checkpoint(path: str) -> bool:
    """A plain (not task-head) checkpoint of an encoder-decoder family."""
    from nlm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir
    from nlm.inference import is_seq2seq
    from nlm.models import model_class

    config = read_checkpoint_config(resolve_checkpoint_dir(path))
    return "task" not in config and is_seq2seq(model_class(config["family"]))


def _evaluate_seq2seq(args: argparse.Namespace) -> dict[str, Any]:
    """SIGHAN scores of a seq2seq checkpoint segmenting the text of a B/M/E/S JSONL file."""
    import time

    from nlm.checkpoint import load_checkpoint
    from nlm.finetune.cws import score_segmentation
    from nlm.finetune.cws_seq2seq import Seq2SeqSegmenter

    examples, gold = _segmentation_file(args.eval)
    train_words = None
    if args.train:
        train_words = {w for words in _segmentation_file(args.train)[1] for w in words}
    loaded = load_checkpoint(args.checkpoint)
    segmenter = Seq2SeqSegmenter(loaded.model, loaded.tokenizer)
    start = time.perf_counter()
    predicted = segmenter.segment(["".join(e.tokens) for e in examples])
    seconds = time.perf_counter() - start
    score = score_segmentation(gold, predicted, train_words)
    return {
        "checkpoint": args.checkpoint,
        "eval": args.eval,
        "decoding": "constrained greedy (characters in order, [SEP] between words)",
        "max_chars": segmenter.max_chars,
        "examples": len(examples),
        "segment_s": round(seconds, 1),
        **{f"word_{k}" if k in ("precision", "recall", "f1") else k: v for k, v in score.items()},
    }
