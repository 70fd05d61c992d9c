"""Everything a fine-tuning run can check and prepare before a worker starts (plain torch).

`plan_finetune(config)` reads and checks both JSONL files, builds the label map, loads the
pretrained model (or a fresh one of its architecture), initialises the head, encodes every
example and sizes the run. Bad input is one NLMError here, never a failure inside a worker.
It returns the plan (plain data for the workers) and the payload (the encoded rows and the
initial weights: every rank starts from the same ones).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from nlm.config import Config
from nlm.errors import NLMError
from nlm.finetune.config import FinetuneConfig
from nlm.finetune.data import (
    TagExample,
    build_label_map,
    check_labels,
    encode_examples,
    read_examples,
    tag_scheme,
)
from nlm.finetune.heads import TaskModel, fresh_like, load_backbone


@dataclasses.dataclass
class FinetunePlan(Config):
    config: dict[str, Any]  # the FinetuneConfig, paths absolute
    run_dir: str
    family: str
    model_config: dict[str, Any]
    tokenizer_dir: str  # the pretrained checkpoint's tokenizer (the fine-tuned one keeps it)
    task: str
    labels: list[Any]
    scheme: str | None  # tag: bmes | bio | plain
    max_length: int
    train_rows: int  # encoded rows (a long tag example may give several windows)
    eval_rows: int
    data_stats: dict[str, Any]
    steps_per_epoch: int
    max_steps: int
    warmup_steps: int
    eval_every: int
    num_params: int
    device: str = "cpu"

    @property
    def finetune(self) -> FinetuneConfig:
        return FinetuneConfig.from_dict(self.config)


def plan_finetune(config: FinetuneConfig) -> tuple[FinetunePlan, dict[str, Any]]:
    config = config.absolute().check()
    if config.task == "seq2seq":  # the model itself, no head (nlm/finetune/seq2seq.py)
        from nlm.finetune.seq2seq import plan_seq2seq

        return plan_seq2seq(config)
    run_dir = Path(config.out)
    if not config.overwrite and (
        (run_dir / "metrics.jsonl").exists() or (run_dir / "model").exists()
    ):
        raise NLMError(f"{run_dir}: already holds a run; choose another --out or pass --overwrite")

    train = read_examples(config.train, config.task)
    labels = build_label_map(train, config.train)
    check_labels(train, labels, config.train)
    evaluation = read_examples(config.eval, config.task)
    check_labels(evaluation, labels, config.eval)

    backbone, tokenizer, base_dir = load_backbone(config.checkpoint, config.dropout)
    if config.from_scratch:
        backbone = fresh_like(backbone, config.seed)
    limit = backbone.max_positions
    max_length = config.max_length or limit
    if max_length > limit:
        raise NLMError(
            f"max_length {max_length}: the {backbone.family} checkpoint takes at most {limit} positions"
        )
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)  # the head's initial weights
        model = TaskModel(backbone, config.task, labels, lm_weight=config.lm_weight)

    train_rows, train_stats = encode_examples(train, tokenizer, backbone.family, max_length, labels)
    eval_rows, eval_stats = encode_examples(
        evaluation, tokenizer, backbone.family, max_length, labels
    )
    per_worker = len(train_rows) // config.scale.workers
    if per_worker < 1:
        raise NLMError(
            f"{config.train}: {len(train_rows)} training rows for {config.scale.workers} workers: use fewer workers"
        )
    steps_per_epoch = math.ceil(math.ceil(per_worker / config.micro_batch) / config.grad_accum)
    max_steps = config.max_steps or config.epochs * steps_per_epoch
    train_words: list[str] = []
    scheme = tag_scheme(labels) if config.task == "tag" else None
    if scheme == "bmes":  # for the OOV recall of the final SIGHAN score
        from nlm.finetune.cws import tags_to_words

        train_words = sorted(
            {w for e in train if isinstance(e, TagExample) for w in tags_to_words(e.tokens, e.tags)}
        )
    plan = FinetunePlan(
        config=config.flat_dict(),
        run_dir=str(run_dir),
        family=backbone.family,
        model_config=backbone.config.to_dict(),
        tokenizer_dir=str(base_dir / "tokenizer"),
        task=config.task,
        labels=labels,
        scheme=scheme,
        max_length=max_length,
        train_rows=len(train_rows),
        eval_rows=len(eval_rows),
        data_stats={"train": train_stats, "eval": eval_stats},
        steps_per_epoch=steps_per_epoch,
        max_steps=max_steps,
        warmup_steps=config.optim.schedule(max_steps).warmup,
        eval_every=config.eval_every or steps_per_epoch,
        num_params=model.backbone.num_parameters(),
    )
    payload = {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train": train_rows,
        "eval": eval_rows,
        "eval_examples": evaluation,
        "train_words": train_words,
    }
    return plan, payload


def build_task_model(plan: FinetunePlan, state: dict[str, torch.Tensor] | None = None) -> TaskModel:
    """The plan's task model, with `state` (the payload's initial weights, or trained ones)."""
    from nlm.models import model_class

    cls = model_class(plan.family)
    backbone = cls(cls.config_class.from_dict(plan.model_config))
    model = TaskModel(backbone, plan.task, plan.labels, lm_weight=plan.finetune.lm_weight)
    if state is not None:
        model.load_state_dict(state)
    return model
