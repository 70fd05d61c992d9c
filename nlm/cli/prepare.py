"""`nlm prepare`: tokenize a corpus into Parquet shards with Ray Data (nlm.cluster.prepare.pipeline).

    nlm prepare --input 'corpus/*.txt' --output shards/wt2 --tokenizer spm-bpe --vocab-size 8000 \\
                --objective clm --seq-len 256 --val-fraction 0.05
    nlm prepare --config configs/prepare-wt2.yaml --workers 2

Flags override the YAML config's keys (same names, dashes for underscores). The last line on
stdout is one JSON object: where the shards are, rows/tokens per split, throughput, peak RSS.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nlm.errors import NLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from nlm.cluster.prepare.pipeline import PrepareConfig
    from nlm.config import add_config_arguments

    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    add_config_arguments(p, PrepareConfig)


SIZES = ("max_doc_bytes", "unit_bytes", "sample_bytes")  # '64M' in YAML as on the command line


def build_config(args: argparse.Namespace):
    from nlm.cluster.prepare.pipeline import PrepareConfig
    from nlm.config import args_to_dict, parse_size, read_yaml

    data: dict[str, Any] = {}
    source = "flags"
    if args.config:
        data = read_yaml(args.config, what="options")
        source = args.config
        if isinstance(data.get("input"), str):
            data["input"] = [data["input"]]
        for key in SIZES:
            if key in data:
                try:
                    data[key] = parse_size(data[key])
                except argparse.ArgumentTypeError as exc:
                    raise NLMError(f"{source} (field '{key}'): {exc}") from None
    return PrepareConfig.from_dict(args_to_dict(PrepareConfig, args, data), source=source)


def run(args: argparse.Namespace) -> int:
    from nlm.cluster.prepare.pipeline import prepare

    cfg = build_config(args)
    manifest, stats = prepare(cfg)
    summary = {
        "output": cfg.output,
        "objective": manifest.objective,
        "tokenizer": manifest.tokenizer["kind"],
        "vocab_size": manifest.tokenizer["vocab_size"],
        "train": {k: manifest.splits["train"][k] for k in ("documents", "tokens", "rows")},
        "val": {k: manifest.splits["val"][k] for k in ("documents", "tokens", "rows")},
        "skipped": manifest.skipped["documents"],
    } | stats.to_dict()
    print(json.dumps(summary))
    return 0
