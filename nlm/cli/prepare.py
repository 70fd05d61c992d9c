"""`nlm prepare`: tokenize a corpus into Parquet shards with Ray Data (nlm.cluster.prepare.pipeline).

    nlm prepare --input 'corpus/*.txt' --output shards/wt2 --tokenizer spm-bpe --vocab-size 8000 \\
                --objective clm --seq-len 256 --val-fraction 0.05
    nlm prepare --config configs/prepare-wt2.yaml --workers 2

Flags override the YAML config's keys (same names, dashes for underscores). The last line on
stdout is one JSON object: where the shards are, rows/tokens per split, throughput, peak RSS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from nlm.cli import key_values
from nlm.config import parse_size
from nlm.errors import NLMError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    g = p.add_argument_group("input")
    g.add_argument(
        "--input",
        action="extend",
        nargs="+",
        metavar="PATH",
        help="files, directories, globs or URIs (s3://, gs://); repeatable",
    )
    g.add_argument(
        "--corpus", help="a named corpus instead (wt2-mini, pku-lm, shakespeare): its train file"
    )
    g.add_argument(
        "--format", choices=["auto", "text", "jsonl", "parquet"], help="default: by file suffix"
    )
    g.add_argument(
        "--line-docs", action="store_true", default=None, help="text: one document per line"
    )
    g.add_argument(
        "--text-column", help="JSONL field / Parquet column with the text (default text)"
    )
    g.add_argument(
        "--max-doc-bytes", type=parse_size, help="longest document accepted (default 64M)"
    )
    g.add_argument(
        "--skip-bad",
        action="store_true",
        default=None,
        help="skip bad documents (counted in the manifest) instead of stopping",
    )
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer", choices=["spm-bpe", "spm-unigram", "word", "char"])
    g.add_argument("--tokenizer-from", metavar="DIR", help="reuse a saved tokenizer")
    g.add_argument("--vocab-size", type=int)
    g.add_argument("--min-count", type=int, help="word/char: keep units seen at least this often")
    g.add_argument(
        "--segmented",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pre-segmented text (pku/msr Chinese): whitespace is the word boundary",
    )
    g.add_argument(
        "--sample-bytes", type=parse_size, help="tokenizer training sample (default 32M)"
    )
    g = p.add_argument_group("output")
    g.add_argument("--output", help="shard directory (local path or URI)")
    g.add_argument("--objective", choices=["clm", "mlm"])
    g.add_argument("--seq-len", type=int)
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--rows-per-file", type=int, help="rows per Parquet part (default ~4M tokens)")
    g.add_argument("--overwrite", action="store_true", default=None)
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, help="tokenizer actors (default: one per core)")
    g.add_argument("--cpus-per-worker", type=float, help="logical CPUs per actor (default 0.5)")
    g.add_argument("--unit-bytes", type=parse_size, help="text per work unit (default 4M)")
    g.add_argument(
        "--worker-resource", dest="worker_resources", action="append", metavar="NAME=AMOUNT",
        help="custom Ray resource per actor (repeatable), e.g. data=1 for cluster.yaml's data nodes",
    )  # fmt: skip
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar (default: when stderr is a terminal)",
    )


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: cannot read ({exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise NLMError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise NLMError(f"{path}: expected a mapping of options")
    return data


def build_config(args: argparse.Namespace):
    from nlm.cluster.prepare.pipeline import PrepareConfig

    data: dict[str, Any] = {}
    source = "flags"
    if args.config:
        data = load_yaml(args.config)
        source = args.config
        if isinstance(data.get("input"), str):
            data["input"] = [data["input"]]
        for key in ("max_doc_bytes", "unit_bytes", "sample_bytes"):
            if key in data:
                try:
                    data[key] = parse_size(data[key])
                except argparse.ArgumentTypeError as exc:
                    raise NLMError(f"{source} (field '{key}'): {exc}") from None
    for field in dataclasses.fields(PrepareConfig):
        value = getattr(args, field.name, None)
        if value is not None and field.name == "worker_resources":
            value = {
                **(data.get("worker_resources") or {}),
                **key_values(value, "--worker-resource"),
            }
        if value is not None:
            data[field.name] = value
    return PrepareConfig.from_dict(data, source=source)


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
