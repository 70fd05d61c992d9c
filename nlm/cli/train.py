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
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nlm.cluster.train.config import TrainConfig
    from nlm.config import add_config_arguments

    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace) -> Any:
    """--config FILE (or RUN/config.yaml with --resume), then the flags given on top."""
    from nlm.cluster.train.config import TrainConfig
    from nlm.config import args_to_dict, read_yaml
    from nlm.errors import NLMError

    data: dict[str, Any] = {}
    source = "command line"
    if args.config:
        data, source = read_yaml(args.config), args.config
    elif args.resume and args.out:
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise NLMError(f"{saved}: no such file; nothing to resume in {args.out}")
        data, source = read_yaml(saved), str(saved)
    data = args_to_dict(TrainConfig, args, data)
    return TrainConfig.from_dict(data, source=source).check(source)


def run(args: argparse.Namespace) -> int:
    from nlm.cluster.train.driver import train

    config = resolve_config(args)
    summary = train(config, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0
