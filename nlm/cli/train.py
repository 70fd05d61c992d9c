"""`nlm train`: pretrain a model with Ray Train + DeepSpeed.

    nlm train --data shards/wt2 --model gpt --preset small --workers 2 --zero-stage 2 \\
              --max-steps 2000 --out runs/gpt-small
    nlm train --config configs/gpt-small.yaml --max-steps 500     # flags override the file
    nlm train --out runs/gpt-small --resume --max-steps 4000       # RUN/config.yaml + flags
    nlm train --data shards/x --model gpt --init-from runs/imported-gpt2 --out runs/gpt2-x

Every TrainConfig field is a flag (--zero-stage for zero_stage, ...). The resolved config is
written to RUN/config.yaml. Prints the final metrics as one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from nlm.cli import key_values

# Field -> help. Every TrainConfig field gets a flag; these say what it means.
HELP = {
    "data": "shard directory from `nlm prepare`",
    "model": "fnn | rnn | lstm | gpt | bert",
    "preset": "model size: tiny | small | base (| notes for fnn/rnn/lstm)",
    "init_from": "start from this nlm checkpoint's weights and model config (e.g. from "
    "`nlm import`); the shards must be prepared with its tokenizer (--tokenizer-from CKPT/tokenizer)",
    "out": "run directory (config.yaml, metrics.jsonl, tb/, checkpoints/, model/)",
    "workers": "Ray Train workers (data-parallel ranks)",
    "cpus_per_worker": "logical CPUs each worker reserves (fractional is fine)",
    "device": "auto | cpu | cuda (one GPU per worker, nccl, bf16)",
    "zero_stage": "DeepSpeed ZeRO stage 0..3",
    "torch_threads": "torch threads per worker (0: node cores / workers on the node)",
    "micro_batch": "sequences per worker per micro-batch (rnn/lstm: parallel streams)",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps to train for",
    "shuffle": "shuffle rows within each chunk (not for rnn/lstm)",
    "chunk_rows": "rows read per chunk (0: automatic)",
    "materialize_mb": "keep a train split up to this many MB in Ray's object store (0: stream it)",
    "optimizer": "adamw | sgd",
    "lr": "peak learning rate (default: by family and preset, e.g. gpt 1e-3, lstm 3e-3)",
    "min_lr": "learning rate at the end of the cosine decay (default: lr / 10)",
    "warmup_steps": "linear warm-up steps",
    "lr_schedule": "cosine | constant (after warm-up)",
    "weight_decay": "AdamW weight decay (matrices only)",
    "momentum": "SGD momentum",
    "grad_clip": "gradient norm clipping (0: off)",
    "mlm_prob": "bert: fraction of tokens masked",
    "seed": "random seed",
    "eval_every": "steps between validation evaluations",
    "eval_rows": "val rows per worker to score (0: all)",
    "log_every": "steps between metric lines",
    "checkpoint_every": "steps between checkpoints (0: at every evaluation)",
    "keep_checkpoints": "checkpoints to keep (the last K)",
    "max_failures": "worker-group restarts from the last checkpoint before giving up",
    "resume": "continue the run in --out from its latest checkpoint",
    "placement_timeout_s": "seconds to wait for the cluster to place the workers (0: default)",
    "storage": "Ray Train storage for checkpoints (default: RUN); s3://... for multi-node",
    "shared_fs": "--out is on storage every node sees (needed for multi-node runs)",
    "betas": "AdamW betas, e.g. 0.9,0.95",
    "model_overrides": "model config field, KEY=VALUE (repeatable), e.g. dropout=0.3",
    "worker_resources": "custom Ray resource per worker, NAME=AMOUNT (repeatable), e.g. trainer=1",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nlm.cluster.train.config import TrainConfig

    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        text = HELP.get(field.name, field.name)
        if field.name == "model_overrides":
            parser.add_argument(
                "--set", dest="model_overrides", action="append", metavar="KEY=VALUE", help=text
            )
        elif field.name == "worker_resources":
            parser.add_argument(
                "--worker-resource", dest="worker_resources", action="append",
                metavar="NAME=AMOUNT", help=text,
            )  # fmt: skip
        elif kind is bool:
            parser.add_argument(
                flag,
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=text,
            )
        elif field.name == "betas":
            parser.add_argument(flag, dest=field.name, type=_floats, default=None, help=text)
        else:
            if field.name in ("lr", "min_lr"):  # float | None: left out means the default
                kind = float
            parser.add_argument(flag, dest=field.name, type=kind, default=None, help=text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace) -> Any:
    """--config FILE (or RUN/config.yaml with --resume), then the flags given on top."""
    from nlm.cluster.train.config import TrainConfig, read_yaml
    from nlm.errors import NLMError

    data: dict[str, Any] = {}
    source = "command line"
    if args.config:
        data = read_yaml(args.config)
        source = args.config
    elif args.resume and args.out:
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise NLMError(f"{saved}: no such file; nothing to resume in {args.out}")
        data, source = read_yaml(saved), str(saved)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is None:
            continue
        if field.name in ("model_overrides", "worker_resources"):
            flag = "--set" if field.name == "model_overrides" else "--worker-resource"
            value = {**(data.get(field.name) or {}), **key_values(value, flag)}
        data[field.name] = value
    return TrainConfig.from_dict(data, source=source).check(source)


def run(args: argparse.Namespace) -> int:
    from nlm.cluster.train.driver import train

    config = resolve_config(args)
    summary = train(config, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
