"""The one-process demo (`nlm demo --in-process`): every model family on wt2-mini.

    word tokenizer from the train file -> for fnn, rnn, lstm, gpt, bert, elmo, transformer: train
    with AdamW for a short time budget -> save RUN=runs/demo/<family> (model/ checkpoint,
    metrics.jsonl, tb/) -> evaluate on the test file with nlm.evaluation -> one table, plus
    results.json

A plain PyTorch loop on purpose: no Ray, no DeepSpeed (this module is part of the library and
never imports them). `nlm demo` without --in-process runs the whole pipeline on Ray instead
(nlm.workflows.demo). The table has a unigram row (add-one smoothed train counts) as the floor
every trained model should get clearly below; the Ray demo reuses `unigram_baseline`.

Defaults, chosen for a 2-core machine: `tiny` presets (a `small` model's step costs well over ten
times a tiny one's, so in 45 s it barely leaves the unigram plateau), batches of 16 x 64 tokens,
a word vocabulary of the words seen at least 3 times (6,933 ids on wt2-mini), high AdamW rates
with warmup and a cosine decay over the budget. The budget is 45 s per model but at least 400
steps (bert: 15 s, 40 steps), so a busy machine takes longer rather than printing a table of
untrained models.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nlm.files import write_json
from nlm.models import FAMILIES as REGISTRY
from nlm.models.learning_rates import DEMO_CLIP_NORM, DEMO_DEFAULT_LR, DEMO_LEARNING_RATES

FAMILIES = tuple(REGISTRY)  # every family the demos can train (--families)
DEFAULT_FAMILIES = FAMILIES  # trained unless --families says otherwise
WARMUP_STEPS = 20  # then cosine decay to a tenth of the peak over the budget


def run_foundation_demo(
    corpus: str = "wt2-mini",
    out_dir: str | Path = "runs/demo",
    families: tuple[str, ...] = DEFAULT_FAMILIES,
    preset: str = "tiny",
    seconds: float = 45.0,
    bert_seconds: float = 15.0,
    min_steps: int = 400,
    max_steps: int | None = None,
    batch_size: int = 16,
    seq_len: int = 64,
    test_lines: int | None = None,
    min_count: int | None = 3,
    vocab_size: int | None = None,
    max_pll_tokens: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train, save and evaluate each family; returns one result dict per row of the table."""
    import torch

    from nlm.checkpoint import save_checkpoint
    from nlm.corpora import resolve_corpus
    from nlm.errors import NLMError
    from nlm.evaluation import (
        evaluate_documents,
        read_documents,
        text_bytes,
        token_stream,
        unknown_text,
    )
    from nlm.models import build_model, model_class
    from nlm.tokenizers import train_tokenizer
    from nlm.tokenizers.sentinels import with_sentinels

    limits = {"--seconds": (seconds, 0.001), "--bert-seconds": (bert_seconds, 0.001),
              "--min-steps": (min_steps, 0), "--batch-size": (batch_size, 1), "--seq-len": (seq_len, 3),
              "--max-steps": (1 if max_steps is None else max_steps, 1)}  # fmt: skip
    for flag, (value, least) in limits.items():
        if value < least:
            raise NLMError(f"{flag} {value}: must be at least {least}")
    out_dir = Path(out_dir)
    files = resolve_corpus(corpus)
    train_docs = read_documents(files.train)
    test_docs = read_documents(files.test)[:test_lines]
    # Words seen at least min_count times (the notes' second rule): the rarest third of the
    # types costs a third of the softmax and barely any tokens.
    tokenizer = train_tokenizer("word", train_docs, vocab_size=vocab_size, min_count=min_count)
    stream = token_stream(tokenizer, train_docs)
    _log(
        f"{corpus}: {len(stream):,} train tokens, vocabulary {tokenizer.vocab_size:,} (word level)"
    )

    results = [
        unigram_baseline(
            stream,
            token_stream(tokenizer, test_docs),
            text_bytes(test_docs),
            tokenizer.vocab_size,
            unknown_text(tokenizer, test_docs)["spelling_bits"],
        )
    ]
    for family in families:
        torch.manual_seed(seed)
        # span models: the word tokenizer followed by T5's <extra_id_k> sentinel tokens
        own_tokenizer = tokenizer
        if model_class(family).objective == "span":
            own_tokenizer = with_sentinels(tokenizer, span_sentinels(seq_len))
        model = build_model(family, preset, vocab_size=own_tokenizer.vocab_size)
        masked = model.objective == "mlm"  # bert: its own, shorter budget (--bert-seconds)
        budget = bert_seconds if masked else seconds
        least = max(1, min_steps // 10) if masked else min_steps
        run_dir = out_dir / family
        run_dir.mkdir(parents=True, exist_ok=True)
        lr = DEMO_LEARNING_RATES.get(preset, DEMO_LEARNING_RATES["small"]).get(
            family, DEMO_DEFAULT_LR
        )
        steps, elapsed, loss = train_model(
            model,
            stream,
            run_dir,
            (budget, least, max_steps),
            batch_size,
            seq_len,
            lr,
            seed,
            progress,
        )
        report = evaluate_documents(
            model,
            own_tokenizer,
            test_docs,
            batch_size=16,
            max_pll_tokens=max_pll_tokens,
            progress=progress,
        )
        row = {
            "model": family,
            "preset": preset,
            "params": model.num_parameters(),
            "steps": steps,
            "seconds": round(elapsed, 1),
            "train_loss": loss,
            # a span model's row has neither bits/byte nor unk_rate (its kept tokens are not
            # predicted): None, as the Ray demo's row
            **{
                k: report.get(k)
                for k in (
                    "tokens",
                    "ppl",
                    "ppl_kind",
                    "bits_per_byte",
                    "bits_per_byte_closed_vocab",
                    "unk_rate",
                )
            },
            **({"mlm_accuracy": report["mlm_accuracy"]} if masked else {}),
        }
        save_checkpoint(
            run_dir / "model",
            model,
            own_tokenizer,
            metrics=row,
            extra={"preset": preset, "corpus": corpus},
        )
        results.append(row)
        _log(
            f"{family}: {steps} steps in {elapsed:.0f} s, test {report['ppl_kind']} ppl {report['ppl']:.1f}"
        )
    write_json(out_dir / "results.json", results)
    return results


def unigram_baseline(
    train: Any, test: Any, n_bytes: int, vocab_size: int, spelling_bits: float | None = None
) -> dict[str, Any]:
    """Test ppl of add-one smoothed unigram counts from the train stream (predictions only).
    spelling_bits: what the test text's <unk> pieces cost to spell (`nlm.evaluation.unknown_text`),
    for the open-vocabulary bits/byte; without it only the closed-vocabulary figure."""
    counts = Counter(train[1:].tolist())
    total = sum(counts.values()) + vocab_size
    nll = -sum(math.log((counts[t] + 1) / total) for t in test[1:].tolist())
    n = len(test) - 1
    return {
        "model": "unigram",
        "params": vocab_size,
        "steps": None,
        "seconds": None,
        "tokens": n,
        "ppl": math.exp(nll / n),
        "ppl_kind": "causal",
        "bits_per_byte": None
        if spelling_bits is None
        else (nll / math.log(2) + spelling_bits) / n_bytes,
        "bits_per_byte_closed_vocab": nll / math.log(2) / n_bytes,
    }


def train_model(
    model: Any,
    stream: Any,
    run_dir: Path,
    budget: tuple[float, int, int | None],
    batch_size: int,
    seq_len: int,
    peak_lr: float,
    seed: int,
    progress: bool = True,
) -> tuple[int, float, float]:
    """AdamW for budget = (seconds, min_steps, max_steps): until both `seconds` have passed and
    `min_steps` are done (a busy machine still gets a meaningful model), or `max_steps` are.
    Logs metrics.jsonl and TensorBoard in run_dir. Returns (steps, seconds, last smoothed loss)."""
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from nlm.models.base import detach_state

    seconds, min_steps, max_steps = budget
    family = model.family
    generator = torch.Generator().manual_seed(seed)
    batches = _batches(model, stream, batch_size, seq_len, generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01)
    model.train()
    state, smoothed, step = None, float("nan"), 0
    bar = tqdm(
        total=max_steps, desc=f"train {family}", file=sys.stderr, disable=not progress, leave=False
    )
    start = time.monotonic()
    with (run_dir / "metrics.jsonl").open("w") as log, SummaryWriter(str(run_dir / "tb")) as tb:
        while True:
            # How far through the budget: the slower of clock and min_steps, capped by max_steps.
            done = min((time.monotonic() - start) / seconds, step / min_steps if min_steps else 1.0)
            if max_steps is not None:
                done = max(done, step / max_steps)
            if done >= 1.0:
                break
            lr = learning_rate(peak_lr, step, done)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            if model.objective == "mlm":
                loss = model(batch[0], mlm_labels=batch[1]).loss
            elif model.recurrent:
                out = model(batch[0], targets=batch[1], state=state)
                loss, state = out.loss, detach_state(out.state)  # truncated BPTT
            else:
                loss = model(batch[0], targets=batch[1]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), DEMO_CLIP_NORM.get(family, 1.0))
            optimizer.step()
            step += 1
            value = loss.item()
            smoothed = value if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * value
            record = {
                "step": step,
                "loss": value,
                "lr": lr,
                "seconds": time.monotonic() - start,
            }
            log.write(json.dumps(record) + "\n")
            tb.add_scalar("train/loss", value, step)
            bar.set_postfix(loss=f"{smoothed:.3f}")
            bar.update()
    bar.close()
    model.eval()
    return step, time.monotonic() - start, smoothed


def learning_rate(peak: float, step: int, done: float) -> float:
    """Linear warm-up, then cosine decay to a tenth over the budget (`done` runs 0 -> 1): the
    trainer's schedule (nlm.optim.Schedule) with the budget's progress in place of the step
    count. The budget is time, so the decay follows the clock: the run ends at its lowest rate
    whatever the machine's speed."""
    from nlm.optim import Schedule

    return Schedule(peak, peak / 10, WARMUP_STEPS, total=0).at(step, progress=done)


def span_sentinels(seq_len: int) -> int:
    """Sentinel ids a span model needs for rows of `seq_len` - 1 tokens (as span shards)."""
    from nlm.evaluation import SPAN_MEAN_LENGTH, SPAN_NOISE_DENSITY
    from nlm.objectives import max_spans

    return max_spans(seq_len - 1, SPAN_NOISE_DENSITY, SPAN_MEAN_LENGTH)


def _batches(model: Any, stream: Any, batch_size: int, seq_len: int, generator: Any):
    """Endless training batches: (inputs, targets) or, for a masked LM, (masked ids, mlm
    labels); a recurrent model reads B parallel streams in order, the others random windows."""
    import torch

    from nlm.objectives import mask_tokens
    from nlm.tokenizers.base import CLS_ID, SEP_ID

    if model.recurrent:
        # B parallel streams read left to right, so the carried state follows the text.
        width = (len(stream) - 1) // batch_size
        data = stream[: width * batch_size + 1]
        x = data[:-1].view(batch_size, width)
        y = data[1:].view(batch_size, width)
        while True:
            for t in range(0, width - 1, seq_len):
                yield x[:, t : t + seq_len], y[:, t : t + seq_len]
    if model.objective == "span":  # T5's span corruption of random windows (equal lengths)
        import random

        from nlm.evaluation import SPAN_MEAN_LENGTH, SPAN_NOISE_DENSITY
        from nlm.objectives import span_corrupt

        rng = random.Random(int(torch.randint(2**31, (1,), generator=generator)))
        first = model.config.vocab_size - span_sentinels(seq_len)
        while True:
            starts = torch.randint(len(stream) - seq_len, (batch_size,), generator=generator)
            pairs = [
                span_corrupt(
                    stream[s : s + seq_len - 1].tolist(),
                    first,
                    rng,
                    SPAN_NOISE_DENSITY,
                    SPAN_MEAN_LENGTH,
                )
                for s in starts.tolist()
            ]
            yield torch.tensor([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])
    masked = model.objective == "mlm"
    body = seq_len - 2 if masked else seq_len
    while True:
        starts = torch.randint(len(stream) - body - 1, (batch_size,), generator=generator)
        if masked:
            rows = [
                torch.cat([torch.tensor([CLS_ID]), stream[s : s + body], torch.tensor([SEP_ID])])
                for s in starts
            ]
            yield mask_tokens(torch.stack(rows), model.config.vocab_size, generator=generator)
        else:
            yield (
                torch.stack([stream[s : s + body] for s in starts]),
                torch.stack([stream[s + 1 : s + body + 1] for s in starts]),
            )


def _or_dash(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def ppl_cell(row: dict[str, Any], pseudo: str = "pseudo {:.1f}, MLM acc {:.1f}%") -> str:
    """The test-ppl cell: bert's pseudo-perplexity with its MLM accuracy, a span model's
    perplexity of the dropped spans (not of the text: no comparison with the others), else the
    perplexity."""
    if row["ppl_kind"] == "pseudo":
        return pseudo.format(row["ppl"], 100 * row["mlm_accuracy"])
    if row["ppl_kind"] == "span":
        return f"span {row['ppl']:.1f}"
    return f"{row['ppl']:.1f}"


def text_table(rows: list[dict[str, Any]], columns: list[tuple[str, int, Any]]) -> str:
    """A plain-text table: `columns` are (header, width, cell(row) -> str); a negative width
    left-aligns the column, a positive one right-aligns it."""

    def fit(text: str, width: int) -> str:
        return f"{text:<{-width}}" if width < 0 else f"{text:>{width}}"

    lines = ["".join(fit(header, width) for header, width, _ in columns)]
    lines += ["".join(fit(cell(r), width) for _, width, cell in columns) for r in rows]
    return "\n".join(lines)


def format_table(results: list[dict[str, Any]]) -> str:
    return text_table(
        results,
        [
            ("model", -9, lambda r: r["model"]),
            ("params", 12, lambda r: f"{r['params']:,}"),
            ("steps", 8, lambda r: _or_dash(r["steps"], "")),
            ("seconds", 9, lambda r: _or_dash(r["seconds"], ".0f")),
            ("", 2, lambda r: ""),
            ("test ppl", -30, lambda r: ppl_cell(r, "pseudo-ppl {:.1f} / MLM acc {:.1f}%")),
            ("bits/byte", 9, lambda r: _or_dash(r["bits_per_byte"], ".3f")),
        ],
    )


def _log(message: str) -> None:
    print(f"nlm demo: {message}", file=sys.stderr, flush=True)


# What a demo writes into its output directory (both versions); anything else there means the
# directory is not a demo's, and clear_out_dir refuses to delete it.
DEMO_MARKER = ".nlm-demo"
DEMO_ENTRIES = {*FAMILIES, DEMO_MARKER, "results.json", "results.json.tmp", "report.md"}
DEMO_ENTRIES |= {"shards", "runs", "unigram"}


def clear_out_dir(out_dir: str | Path) -> Path:
    """Make `out_dir` an empty demo directory: a re-run replaces the previous demo run cleanly,
    but a directory that holds anything a demo does not write is left alone (NLMError)."""
    import shutil

    from nlm.errors import NLMError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NLMError(f"--out {out}: exists and is not a directory")
    if out.is_dir():
        entries = {p.name for p in out.iterdir()}
        foreign = sorted(entries - DEMO_ENTRIES)
        if foreign and DEMO_MARKER not in entries:
            raise NLMError(
                f"--out {out}: holds {foreign[0]!r}, which no demo wrote; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `nlm demo`; the next demo run replaces it\n")
    return out
