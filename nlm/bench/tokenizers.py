"""`nlm bench tokenizers`: one model recipe, four tokenizers, scored by honest bits/byte.

    nlm bench tokenizers [--models lstm,gpt] [--tokenizers word,char,bpe,unigram] [--steps 600]
                         [--vocab-size 8000] [--min-count 3] [--seq-len 64] [--preset small]
                         [--workers 2] [--work runs/bench-tokenizers] [--output FILE] [--plot FILE]

For each tokenizer, `nlm prepare --corpus wt2-mini --line-docs --tokenizer KIND` writes clm
shards into WORK/shards-KIND-... (kept and reused while their manifest exists: the directory name
holds the settings): `word` and `char` keep the units seen at least `--min-count` times (3: the
demo's word vocabulary, 6,742 ids), `bpe` and `unigram` are SentencePiece models of
`--vocab-size` pieces (8000, `nlm prepare`'s default). For each model and tokenizer,
`nlm train --config configs/MODEL-small.yaml` (the project's recipe: optimizer, learning rate,
micro-batch) on those shards with `--max-steps --steps`, `--preset`, `--workers`, then
`nlm eval` of the run on wt2-mini's test text (`--test-lines N`: its first N documents).

The same budget for every tokenizer: the same steps, the recipe's micro-batch, the same workers,
and rows of the same `--seq-len` in tokens (64, gpt-small's block_size; gpt's block_size is set
to it, the recurrent models carry their state across rows). So a model trains on the same number
of token positions whatever its tokenizer; a char model sees several times less text in them
than a word model, which is part of what is compared.

Per-token perplexity is not comparable across tokenizers: a char model predicts each letter, a
word model each word, and a closed word vocabulary predicts `<unk>` for the price of one token.
Bits per byte of the test text is comparable: `nlm eval`'s `bits_per_byte` is the
open-vocabulary figure (each `<unk>` also pays for its spelling, nlm/tokenizers/spelling.py),
the one plotted and compared; `bits_per_byte_closed_vocab`, `unk_rate` and per-token `ppl` are
reported beside it. WikiText's own `<unk>` markers in the test text are `<unk>` for every
tokenizer (they count in each unk rate) and cost no spelling in any row.

The table goes to stdout; WORK/report.json (`--output`) and a bar chart of bits/byte per
tokenizer for each model, WORK/tokenizers.png (`--plot`), are written once every run has
succeeded. Names and numbers are checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from nlm.bench.common import markdown_table, run_nlm, scored_text
from nlm.errors import NLMError
from nlm.models import families_where

CORPUS = "wt2-mini"
# the benchmark's name -> `nlm prepare --tokenizer`
TOKENIZERS = {"word": "word", "char": "char", "bpe": "spm-bpe", "unigram": "spm-unigram"}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# the causal-LM families (a family fact) that have a recipe, configs/<model>-small.yaml
MODELS = tuple(
    f
    for f in families_where(lambda c: c.objective == "clm")
    if (CONFIGS / f"{f}-small.yaml").is_file()
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", default="lstm,gpt", help=f"any of {', '.join(MODELS)} (default: lstm,gpt)"
    )
    parser.add_argument(
        "--tokenizers", default=",".join(TOKENIZERS), help=f"any of {', '.join(TOKENIZERS)}"
    )
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (600)")
    parser.add_argument(
        "--vocab-size", type=int, default=8000, help="bpe and unigram pieces (8000)"
    )
    parser.add_argument(
        "--min-count", type=int, default=3, help="word and char: keep units seen this often (3)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=64, help="tokens per row, every tokenizer (64)"
    )
    parser.add_argument(
        "--preset", default="small", help="model size (small; the recipe stays *-small)"
    )
    parser.add_argument("--workers", type=int, default=2, help="nlm train workers (2)")
    parser.add_argument(
        "--configs", default=str(CONFIGS), help="directory of the MODEL-small.yaml recipes"
    )
    parser.add_argument("--work", default="runs/bench-tokenizers", help="scratch directory")
    parser.add_argument("--test-lines", type=int, default=0, help="score the first N (0: all)")
    parser.add_argument("--output", help="the report as JSON (default: WORK/report.json)")
    parser.add_argument("--plot", help="bar chart, PNG (default: WORK/tokenizers.png)")


def check_args(args: argparse.Namespace) -> tuple[list[str], list[str], dict[str, Path]]:
    """(models, tokenizers, model -> recipe file); NLMError naming the first bad value."""
    models = _names("--models", args.models, MODELS)
    kinds = _names("--tokenizers", args.tokenizers, TOKENIZERS)
    for flag, value, least in (
        ("--steps", args.steps, 1),
        ("--vocab-size", args.vocab_size, 2),
        ("--min-count", args.min_count, 1),
        ("--seq-len", args.seq_len, 2),
        ("--workers", args.workers, 1),
        ("--test-lines", args.test_lines, 0),
    ):
        if value < least:
            raise NLMError(f"{flag}: {value} (at least {least})")
    from nlm.models.presets import preset_config

    for model in models:
        preset_config(model, args.preset)  # NLMError naming the known presets
    recipes = {m: Path(args.configs).resolve() / f"{m}-small.yaml" for m in models}
    for path in recipes.values():
        if not path.is_file():
            raise NLMError(f"{path}: no such recipe (--configs DIR holds MODEL-small.yaml)")
    return models, kinds, recipes


def _names(flag: str, value: str, known: Any) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise NLMError(f"{flag}: empty (known: {', '.join(known)})")
    for name in names:
        if name not in known:
            raise NLMError(f"{flag}: unknown {name!r} (known: {', '.join(known)})")
    if len(set(names)) != len(names):
        raise NLMError(f"{flag}: {value!r} names one twice")
    return names


def run(args: argparse.Namespace) -> int:
    from nlm.corpora import resolve_corpus

    models, kinds, recipes = check_args(args)  # before anything is written
    test = resolve_corpus(CORPUS).test
    work = Path(args.work).resolve()
    output = Path(args.output) if args.output else work / "report.json"
    plot_path = Path(args.plot) if args.plot else work / "tokenizers.png"
    work.mkdir(parents=True, exist_ok=True)
    text = scored_text(test, work, args.test_lines)
    shards = {}
    for kind in kinds:
        print(f"nlm prepare {CORPUS} --tokenizer {TOKENIZERS[kind]} ...", file=sys.stderr)
        shards[kind] = prepare(work, kind, args)
    rows = []
    for model in models:
        for kind in kinds:
            print(f"nlm train {model} on {kind} tokens, {args.steps} steps ...", file=sys.stderr)
            rows.append(train_and_eval(model, kind, recipes[model], shards[kind], text, work, args))
    report = {
        "corpus": CORPUS,
        "test": str(test),
        "test_lines": args.test_lines or None,
        "steps": args.steps,
        "preset": args.preset,
        "workers": args.workers,
        "seq_len": args.seq_len,
        "rows": rows,
    }
    print(markdown(rows))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, plot_path, args.test_lines)
    print(f"report: {output}\nplot:   {plot_path}", file=sys.stderr)
    return 0


def shard_dir(work: Path, kind: str, args: argparse.Namespace) -> Path:
    """WORK/shards-KIND-SEQLEN-{mCOUNT | vSIZE}: the settings in the name, so a rerun with other
    settings prepares afresh instead of reusing shards that do not match."""
    size = f"v{args.vocab_size}" if TOKENIZERS[kind].startswith("spm") else f"m{args.min_count}"
    return work / f"shards-{kind}-{args.seq_len}-{size}"


def prepare_argv(kind: str, out: Path, args: argparse.Namespace) -> list[str]:
    argv = ["prepare", "--corpus", CORPUS, "--line-docs", "--tokenizer", TOKENIZERS[kind],
            "--seq-len", str(args.seq_len), "--output", str(out), "--overwrite", "--no-progress"]  # fmt: skip
    if TOKENIZERS[kind].startswith("spm"):
        return [*argv, "--vocab-size", str(args.vocab_size)]
    return [*argv, "--min-count", str(args.min_count)]


def prepare(work: Path, kind: str, args: argparse.Namespace) -> Path:
    out = shard_dir(work, kind, args)
    if not (out / "manifest.json").is_file():
        run_nlm(*prepare_argv(kind, out, args))
    return out


def train_argv(
    model: str, recipe: Path, data: Path, out: Path, args: argparse.Namespace
) -> list[str]:
    """`nlm train` of the recipe on `data`; a bounded context (gpt's block_size) set to the
    rows' length."""
    from nlm.models import model_class

    argv = ["train", "--config", str(recipe), "--data", str(data), "--out", str(out),
            "--model", model, "--preset", args.preset, "--max-steps", str(args.steps),
            "--workers", str(args.workers), "--no-progress"]  # fmt: skip
    field = model_class(model).max_positions_field
    return [*argv, "--set", f"{field}={args.seq_len}"] if field else argv


def train_and_eval(
    model: str, kind: str, recipe: Path, data: Path, text: Path, work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    from nlm.shards import read_manifest

    out = work / f"{model}-{kind}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the scratch directory is ours
    started = time.perf_counter()
    run_nlm(*train_argv(model, recipe, data, out, args))
    wall = time.perf_counter() - started
    started = time.perf_counter()
    scored = json.loads(
        run_nlm("eval", "--checkpoint", str(out), "--input", str(text), "--no-progress")
    )
    eval_s = time.perf_counter() - started
    bpb = scored.get("bits_per_byte")
    if bpb is None or not math.isfinite(bpb):
        note = scored.get("bits_per_byte_note", "not reported")
        raise NLMError(f"nlm eval of {out}: no open-vocabulary bits/byte ({note})")
    metrics_file = out / "model" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "model": model,
        "tokenizer": kind,
        "vocab_size": int(read_manifest(data).tokenizer["vocab_size"]),
        "params": metrics.get("params"),
        "steps": metrics.get("step"),
        "wall_s": round(wall, 1),
        "eval_s": round(eval_s, 1),
        "bytes": scored.get("bytes"),
        "unk_bytes": scored.get("unk_bytes"),
        **{
            k: scored.get(k)
            for k in ("tokens", "ppl", "bits_per_byte", "bits_per_byte_closed_vocab", "unk_rate")
        },
        "run": str(out),
    }


# --- the table and the plot -----------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        rows,
        [
            ("model", "model", ""), ("tokenizer", "tokenizer", ""), ("vocab", "vocab_size", ","),
            ("tokens scored", "tokens", ","), ("bits/byte", "bits_per_byte", ".3f"),
            ("closed-vocab bits/byte", "bits_per_byte_closed_vocab", ".3f"),
            ("unk rate", "unk_rate", ".4f"), ("ppl per token", "ppl", ".1f"),
            ("steps", "steps", ""), ("wall (s)", "wall_s", ""),
        ],
        right_from=2,
    )  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path, test_lines: int = 0) -> None:
    """Grouped bars: bits/byte (open vocabulary) per tokenizer, one bar per model; a tick marks
    the closed-vocabulary figure where it differs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["tokenizer"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    index = {(r["model"], r["tokenizer"]): r for r in rows}
    width, marked = 0.8 / len(models), False
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(kinds) * max(1, len(models) / 2), 4.2))
    for m, model in enumerate(models):
        xs, ys, closed = [], [], []
        for k, kind in enumerate(kinds):
            r = index.get((model, kind))
            if r is None:
                continue
            xs.append(k - 0.4 + width * (m + 0.5))
            ys.append(r["bits_per_byte"])
            closed.append(r["bits_per_byte_closed_vocab"])
        bars = ax.bar(xs, ys, width * 0.9, label=model)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
        marks = [(x, c) for x, y, c in zip(xs, ys, closed, strict=True) if c and c < y - 1e-9]
        if marks:
            ax.scatter(*zip(*marks, strict=True), marker="_", s=200, color="black", zorder=3)
            marked = True
    if marked:
        ax.scatter([], [], marker="_", s=200, color="black", label="closed vocabulary (<unk> free)")
    ax.set_xticks(range(len(kinds)), kinds)
    text = f"the first {test_lines} lines of wt2-mini test" if test_lines else "wt2-mini test"
    ax.set_ylabel(f"bits/byte, {text} (open vocabulary)")
    steps = sorted({r["steps"] for r in rows if r.get("steps") is not None})
    ax.set_title(
        "tokenizers at equal training budget"
        + (f" ({', '.join(map(str, steps))} steps)" if steps else "")
    )
    ax.grid(axis="y", alpha=0.3)
    ax.set_ylim(0, 1.25 * max(r["bits_per_byte"] for r in rows))  # room for the legend
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
