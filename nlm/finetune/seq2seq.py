"""Sequence-to-sequence fine-tuning data and plan: JSONL {"source", "target"} rows for an
encoder-decoder checkpoint (a seq2seq family, nlm.inference.is_seq2seq), no task head: the
model itself is trained on log p(target | source) (teacher forcing) and exported as a plain
checkpoint, which `nlm serve` then generates from (`/v1/generate` with the source as prompt).

A row is {"input_ids": source tokens + </s>, "target_ids": target tokens + </s>}, the layout
of span-corruption shards; a source or target longer than the model's positions is an error
naming its file and line (never silently cut: a cut target would teach a wrong answer).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError, describe_location
from nlm.finetune.config import FinetuneConfig
from nlm.finetune.data import Seq2SeqExample, read_examples
from nlm.models.base import IGNORE_INDEX, LanguageModel
from nlm.tokenizers.base import EOS_ID, Tokenizer


def load_seq2seq(path: str | Path, dropout: float | None) -> tuple[LanguageModel, Tokenizer, Path]:
    """The encoder-decoder and tokenizer of a checkpoint; NLMError for any other family."""
    from nlm.checkpoint import load_checkpoint, resolve_checkpoint_dir
    from nlm.inference import is_seq2seq

    directory = resolve_checkpoint_dir(path)
    loaded = load_checkpoint(directory)
    model = loaded.model
    if not is_seq2seq(model):
        raise NLMError(
            f"{directory}: a {model.family} checkpoint; --task seq2seq needs an encoder-decoder "
            "(transformer) checkpoint"
        )
    if dropout is not None and dropout != model.config.dropout:
        rebuilt = type(model)(model.config.replace(dropout=dropout))
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    return model, loaded.tokenizer, directory


def encode_seq2seq(
    examples: list[Seq2SeqExample], tokenizer: Tokenizer, max_length: int, path: str | Path
) -> list[dict[str, list[int]]]:
    """Rows of `examples` (module docstring); NLMError naming file:line for one too long."""
    rows = []
    for example in examples:
        row = {}
        for field, text in (("source", example.source), ("target", example.target)):
            ids = [*tokenizer.encode(text), EOS_ID]
            if len(ids) > max_length:
                raise NLMError(
                    f"{describe_location(path, example.line, field)}: {len(ids)} tokens with "
                    f"</s>, longer than the model's {max_length} positions"
                )
            row["input_ids" if field == "source" else "target_ids"] = ids
        rows.append(row)
    return rows


def collate_seq2seq(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded (B, S) input_ids + attention_mask and (B, T) targets (-100 padded)."""
    width = max(len(r["input_ids"]) for r in rows)
    depth = max(len(r["target_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), depth), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
        mask[i, : len(row["input_ids"])] = 1
        targets[i, : len(row["target_ids"])] = torch.tensor(row["target_ids"])
    return {"input_ids": ids, "attention_mask": mask, "targets": targets}


def plan_seq2seq(config: FinetuneConfig) -> tuple[Any, dict[str, Any]]:
    """plan_finetune for --task seq2seq: (FinetunePlan, payload), every input checked first."""
    from nlm.finetune.plan import FinetunePlan

    run_dir = Path(config.out)
    if not config.overwrite and (
        (run_dir / "metrics.jsonl").exists() or (run_dir / "model").exists()
    ):
        raise NLMError(f"{run_dir}: already holds a run; choose another --out or pass --overwrite")
    train = read_examples(config.train, "seq2seq")
    evaluation = read_examples(config.eval, "seq2seq")
    model, tokenizer, base_dir = load_seq2seq(config.checkpoint, config.dropout)
    if config.from_scratch:
        with torch.random.fork_rng():
            torch.manual_seed(config.seed)
            model = type(model)(model.config)
    limit = model.max_positions
    max_length = config.max_length or limit
    if max_length > limit:
        raise NLMError(
            f"max_length {max_length}: the {model.family} checkpoint takes at most {limit} positions"
        )
    train_rows = encode_seq2seq(train, tokenizer, max_length, config.train)
    eval_rows = encode_seq2seq(evaluation, tokenizer, max_length, config.eval)
    per_worker = len(train_rows) // config.scale.workers
    if per_worker < 1:
        raise NLMError(
            f"{config.train}: {len(train_rows)} training rows for {config.scale.workers} workers: use fewer workers"
        )
    steps_per_epoch = math.ceil(math.ceil(per_worker / config.micro_batch) / config.grad_accum)
    max_steps = config.max_steps or config.epochs * steps_per_epoch
    stats = {"examples": len(train), "truncated": 0, "windows": 0}
    plan = FinetunePlan(
        config=config.flat_dict(),
        run_dir=str(run_dir),
        family=model.family,
        model_config=model.config.to_dict(),
        tokenizer_dir=str(base_dir / "tokenizer"),
        task="seq2seq",
        labels=[],
        scheme=None,
        max_length=max_length,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        data_stats={"train": stats, "eval": {**stats, "examples": len(evaluation)}},
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        warmup_steps=config.optim.schedule(max_steps).warmup,
        eval_every=config.eval_every or steps_per_epoch,
        num_params=model.num_parameters(),
    )
    payload = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train": train_rows,
        "eval": eval_rows,
    }
    return plan, payload
