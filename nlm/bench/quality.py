"""`nlm bench quality`: nlm's models against the reference recipe, on equal terms, in one run.

    nlm bench quality [--data SHARDS] [--references lstm,transformer,rnn] [--epochs 3]
                      [--recipes FILE] [--output report.json]

The reference (nlm/bench/reference.py) is what a user writes from PyTorch's word_language_model
example at its defaults (pytorch/examples, word_language_model/main.py and model.py): a plain
single-process loop,
emsize = nhid = 200, 2 layers, dropout 0.2, untied, bptt 35, batch 20, clip 0.25, plain SGD
(p -= lr * grad) with lr divided by 4 whenever the validation loss does not improve after an
epoch, `--epochs` epochs; the LSTM at lr 20, the 2-layer Transformer (2 heads, feed-forward 200)
at lr 5, the Elman RNN (tanh) at lr 1. On equal terms with nlm:
  - the same vocabulary and training tokens: the reference trains on the token stream of the
    shards' own train split (the rows joined back; `--data`, default: `nlm prepare` of
    wt2-mini at word level) and validates on their val split, so a test word outside nlm's
    vocabulary is `<unk>` for both (the example's own dictionary also holds the test words);
  - the same scored tokens: both are scored on `</s> doc1 </s> doc2 ...` of the test text
    (nlm.evaluation's stream), every prediction once, 10 parallel streams (the example's eval
    batch) with the LSTM/RNN state carried, the Transformer by windows of 35 tokens, as the
    example evaluates; and the same honest bits/byte (`nlm.evaluation.open_vocabulary`).
The n-gram bar (`--ngram-order`, default 5, the fnn's n; 0: none) is interpolated modified
Kneser-Ney estimated by KenLM on the same training tokens and scored on the same predictions
(nlm.bench.ngram); it is the bar for nlm's fnn.
nlm's models (`--recipes`: a YAML mapping row name -> `nlm train` config file, or -> {config,
seq_len, bar, flags}, see `_recipes`; configs/quality/recipes.yaml holds the recipes of the table
in docs/BENCHMARKS.md) are trained with `nlm train --config FILE --data SHARDS` on shards of the
same corpus, tokenizer and vocabulary at the recipe's seq_len (checked: the tokenizer files must
be identical; with `--data`, every recipe trains on those shards), Ray and
DeepSpeed start-up in the wall time, and scored with `nlm eval`. The table: params, steps, wall
time, test ppl, bits/byte, the ratio of ppl to the bar of the same kind, and evaluation speed
against training speed (issue 17: scoring should run at >= 3 x the training tokens/s). The
machine's load average is sampled through the run and reported with the table.

    nlm bench quality --recipes configs/quality/recipes.yaml --output reports/bench-quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nlm.bench.common import markdown_table, run_nlm, scored_text
from nlm.bench.reference import BPTT, REFERENCES, reference_run, split_stream
from nlm.errors import NLMError

# which nlm model each bar is the bar for
COUNTERPART = {"lstm": "lstm", "transformer": "gpt", "rnn": "rnn", "ngram": "fnn"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="clm shard directory (default: prepare wt2-mini, word)")
    parser.add_argument("--work", default="runs/bench-quality", help="scratch directory")
    parser.add_argument(
        "--references", default="lstm,transformer,rnn", help="reference models to train (all)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="reference epochs (3)")
    parser.add_argument(
        "--max-batches", type=int, default=0, help="cap batches per epoch (0: all; for smoke runs)"
    )
    parser.add_argument(
        "--ngram-order", type=int, default=5, help="KenLM Kneser-Ney n-gram bar (0: none)"
    )
    parser.add_argument("--test-lines", type=int, default=0, help="score the first N (0: all)")
    parser.add_argument(
        "--recipes", help="YAML: row name -> nlm train config (configs/quality/recipes.yaml)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--output", help="also write the report as JSON here")


def run(args: argparse.Namespace) -> int:
    from nlm.bench.train import prepare_shards
    from nlm.corpora import resolve_corpus
    from nlm.evaluation import read_documents

    names = [r for r in args.references.split(",") if r]
    for name in names:  # checked before anything is prepared or trained
        if name not in REFERENCES:
            raise NLMError(f"--references: unknown {name!r} (known: {', '.join(REFERENCES)})")
    if args.epochs < 1:
        raise NLMError(f"--epochs {args.epochs}: at least 1")
    if args.ngram_order < 0 or args.ngram_order == 1:
        raise NLMError(f"--ngram-order {args.ngram_order}: 0 (none) or an order >= 2")
    recipes = _recipes(Path(args.recipes)) if args.recipes else {}
    if args.ngram_order:
        from nlm.bench.ngram import lmplz_path

        lmplz_path()  # fails now, not after an hour of training
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else prepare_shards(work, BPTT)
    test_path = resolve_corpus("wt2-mini").test
    documents = read_documents(test_path)
    if args.test_lines:
        documents = documents[: args.test_lines]
    if args.threads:
        torch.set_num_threads(args.threads)
    load = LoadSampler()
    rows = []
    if args.ngram_order:
        print(f"KenLM {args.ngram_order}-gram ...", file=sys.stderr)
        rows.append(ngram_row(data, documents, args.ngram_order, work))
    for name in names:
        print(f"reference {name} ...", file=sys.stderr)
        rows.append(reference_run(name, data, documents, args.epochs, args.max_batches))
    text = scored_text(test_path, work, args.test_lines)  # what `nlm eval` scores, every row
    for name, recipe in recipes.items():
        print(f"nlm train {name} ...", file=sys.stderr)
        shards = data if args.data else prepare_shards(work, recipe["seq_len"])
        same_vocabulary(data, shards)
        rows.append(nlm_run(name, recipe, shards, work, text))
    add_ratios(rows)
    report = {
        "data": str(data), "test": str(test_path), "rows": rows, "load": load.stop(),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    print(markdown(rows))
    print(f"load average (1 min) during the run: {report['load']}")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


class LoadSampler:
    """The 1-minute load average, sampled every 10 s in a daemon thread: min, mean, max."""

    def __init__(self, every_s: float = 10.0) -> None:
        import os
        import threading

        self.samples = [os.getloadavg()[0]]
        self._done = threading.Event()

        def sample() -> None:
            while not self._done.wait(every_s):
                self.samples.append(os.getloadavg()[0])

        threading.Thread(target=sample, daemon=True).start()

    def stop(self) -> dict[str, float]:
        self._done.set()
        s = self.samples
        return {
            "min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2),
            "samples": len(s),
        }  # fmt: skip


def same_vocabulary(a: Path, b: Path) -> None:
    """Shards a and b must share one tokenizer (byte-identical files), or NLMError."""
    for name in sorted(p.name for p in (a / "tokenizer").iterdir()):
        theirs = b / "tokenizer" / name
        if not theirs.is_file() or (a / "tokenizer" / name).read_bytes() != theirs.read_bytes():
            raise NLMError(f"{b}: its tokenizer differs from {a}'s ({name}): not equal terms")


def ngram_row(data: Path, documents: list[str], order: int, work: Path) -> dict[str, Any]:
    """The Kneser-Ney bar: KenLM on the shards' train stream, scored on the test stream."""
    from nlm.bench.ngram import ngram_run
    from nlm.evaluation import open_vocabulary, text_bytes, token_stream
    from nlm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(data / "tokenizer")
    stream = token_stream(tokenizer, documents)
    done = ngram_run(split_stream(data, "train"), stream, order, work / f"kn{order}")
    return {
        "model": f"KenLM {order}-gram (interpolated modified Kneser-Ney)",
        "kind": "ngram",
        "params": None,
        "steps": None,
        "wall_s": done["wall_s"],
        "tokens": done["count"],
        "ppl": math.exp(done["total"] / done["count"]),
        **open_vocabulary(tokenizer, documents, stream[1:], done["total"], text_bytes(documents)),
    }


# --- nlm's models ---------------------------------------------------------------------------


RECIPE_KEYS = {"config", "seq_len", "bar", "flags"}


def _recipes(path: Path) -> dict[str, dict[str, Any]]:
    """The recipes file: row name -> an `nlm train` config file (relative to the recipes file),
    or -> {config: FILE, seq_len: N (windows of the shards, default 35), bar: the model whose
    bar the row is measured against (default: the row name), flags: {key: value} passed on as
    `nlm train --key value`, for a variant of a config}. Every row is resolved and checked as
    `nlm train` would (options, values, the model) before anything runs."""
    import yaml

    try:
        recipes = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        why = " ".join(str(exc).split())  # YAML's messages span lines: one line here
        raise NLMError(f"{path}: cannot read the recipes ({why})") from None
    if not isinstance(recipes, dict):
        raise NLMError(f"{path}: expected a mapping of model name -> nlm train config file")
    out, parser = {}, _train_parser()
    known = set(parser._option_string_actions)
    for name, entry in recipes.items():
        entry = {"config": entry} if isinstance(entry, str) else entry
        where = f"{path}: {name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), str):
            raise NLMError(f"{where}: expected a config file or a mapping with a 'config' key")
        if set(entry) - RECIPE_KEYS:
            unknown = ", ".join(sorted(map(str, set(entry) - RECIPE_KEYS)))
            raise NLMError(
                f"{where}: unknown key {unknown} (known: {', '.join(sorted(RECIPE_KEYS))})"
            )
        seq_len = entry.get("seq_len", BPTT)
        if not isinstance(seq_len, int) or seq_len < 2:
            raise NLMError(f"{where}: seq_len {seq_len!r}: an integer >= 2")
        if not isinstance(entry.get("flags", {}), dict):
            raise NLMError(f"{where}: flags: expected a mapping of nlm train option -> value")
        bar = str(entry.get("bar", name))
        if bar not in COUNTERPART.values():
            raise NLMError(
                f"{where}: no bar for {bar!r} (the nlm model measured: "
                f"{', '.join(COUNTERPART.values())})"
            )
        config = (path.parent / entry["config"]).resolve()
        if not config.is_file():
            raise NLMError(f"{where}: no such config file {config}")
        flags = [
            x
            for k, v in entry.get("flags", {}).items()
            for x in (f"--{k.replace('_', '-')}", str(v))
        ]
        for flag in flags[::2]:
            if flag not in known:
                raise NLMError(f"{where}: flags: {flag} is not an nlm train config option")
        _check_train_config(parser, where, config, flags)
        out[str(name)] = {"config": str(config), "seq_len": seq_len, "bar": bar, "flags": flags}
    return out


def _train_parser() -> argparse.ArgumentParser:
    """`nlm train`'s TrainConfig options, built as `nlm train` builds them (so a typo or a bad
    value fails before the run, not after the references have trained)."""
    from nlm.cluster.train.config import TrainConfig
    from nlm.config import add_config_arguments

    parser = argparse.ArgumentParser(prog="nlm train", exit_on_error=False)
    add_config_arguments(parser, TrainConfig)
    return parser


def _check_train_config(
    parser: argparse.ArgumentParser, where: str, config: Path, flags: list[str]
) -> None:
    """The row's config file with its flags on top, resolved and checked as `nlm train` does
    (`nlm.cli.train.resolve_config`): value types, ranges, the model name. The bench supplies
    --data and --out itself."""
    from nlm.cluster.train.config import TrainConfig
    from nlm.config import args_to_dict, read_yaml
    from nlm.models import model_class

    try:
        args = parser.parse_args([*flags, "--data", "shards", "--out", "run"])
    except argparse.ArgumentError as exc:
        raise NLMError(f"{where}: flags: {exc}") from None
    source = f"{where} ({config.name} with the row's flags)"
    data = args_to_dict(TrainConfig, args, read_yaml(config))
    resolved = TrainConfig.from_dict(data, source=source).check(source)
    if model_class(resolved.model).objective != "clm":  # scored by perplexity of the text
        raise NLMError(
            f"{source} (field 'model'): {resolved.model} is not a causal LM; the race compares "
            "perplexities of the test text"
        )


def nlm_run(
    name: str, recipe: dict[str, Any], shards: Path, work: Path, text: Path
) -> dict[str, Any]:
    """`nlm train --config --data` (its wall time, start-up included) then `nlm eval` of its
    checkpoint on `text`; training tokens/s is the run's last logged rate (steady state)."""
    import shutil

    out = work / f"nlm-{name}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the scratch directory is ours
    started = time.perf_counter()
    run_nlm(
        "train", "--config", recipe["config"], *recipe["flags"], "--data", str(shards),
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    wall = time.perf_counter() - started
    scored = json.loads(
        run_nlm("eval", "--checkpoint", str(out), "--input", str(text), "--no-progress")
    )
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    logged = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"tokens_per_s"' in line
    ]
    train_rate = logged[-1]["tokens_per_s"] if logged else None
    return {
        "model": f"nlm {name}",
        "kind": recipe["bar"],
        "recipe": " ".join([recipe["config"], *recipe["flags"]]),
        "params": metrics.get("params"),
        "steps": metrics.get("step"),
        "wall_s": round(wall, 1),
        **{
            k: scored.get(k)
            for k in (
                "tokens",
                "ppl",
                "bits_per_byte",
                "bits_per_byte_closed_vocab",
                "unk_tokens",
                "unk_rate",
                "unk_bytes",
                "unk_byte_share",
                "spelling_bits",
            )
        },  # fmt: skip
        "train_tokens_per_s": train_rate,
        "eval_tokens_per_s": scored.get("tokens_per_s"),
        "eval_vs_train_speed": (
            round(scored["tokens_per_s"] / train_rate, 2)
            if train_rate and scored.get("tokens_per_s")
            else None
        ),
    }


# --- the table ------------------------------------------------------------------------------


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each nlm row's test ppl over its bar's (the bar of the same kind: the reference LSTM for
    lstm, the Transformer for gpt, the Elman RNN for rnn, the Kneser-Ney n-gram for fnn); None
    where that bar did not run."""
    bars = {COUNTERPART[r["kind"]]: r for r in rows if not r["model"].startswith("nlm ")}
    for r in rows:
        bar = bars.get(r["kind"]) if r["model"].startswith("nlm ") else None
        r["ppl_vs_reference"] = round(r["ppl"] / bar["ppl"], 3) if bar and r["ppl"] else None
        r["wall_vs_reference"] = round(r["wall_s"] / bar["wall_s"], 2) if bar else None


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        rows,
        [
            ("model", "model", ""), ("params", "params", ","), ("steps", "steps", ""),
            ("wall (s)", "wall_s", ""), ("test ppl", "ppl", ".1f"),
            ("bits/byte", "bits_per_byte", ".3f"),
            ("closed-vocab bits/byte", "bits_per_byte_closed_vocab", ".3f"),
            ("unk rate", "unk_rate", ".3f"), ("ppl / bar", "ppl_vs_reference", ""),
            ("wall / bar", "wall_vs_reference", ""),
            ("eval / train tokens/s", "eval_vs_train_speed", ""),
        ],
    )  # fmt: skip
