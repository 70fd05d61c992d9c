"""TrainConfig: every knob of `nlm train`, in one dataclass that round-trips through YAML.

A run writes its fully resolved config to RUN/config.yaml; `nlm train --config FILE` loads one
and command-line flags override it, so any run can be repeated from its own directory. The
optimizer/schedule (`optim`, nlm.optim.OptimConfig) and the scale (`scale`,
nlm.scale.ScaleConfig) are sections shared with fine-tuning; in YAML and on the command line
their fields are flat keys (`lr: 1e-3`, `--workers 2`), as they always were.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nlm.config import Config, option, section
from nlm.errors import NLMError
from nlm.models import FAMILIES, model_class
from nlm.models.learning_rates import default_lr
from nlm.optim import OptimConfig, Schedule
from nlm.scale import ScaleConfig


@dataclasses.dataclass
class TrainConfig(Config):
    # what to train, on what, where the run goes
    data: str = option("", "shard directory from `nlm prepare`")
    model: str = option("gpt", "fnn | rnn | lstm | gpt | bert")
    preset: str = option("tiny", "model size: tiny | small | base (| notes for fnn/rnn/lstm)")
    model_overrides: dict[str, Any] = option(
        {}, "model config field, KEY=VALUE (repeatable), e.g. dropout=0.3", flag="--set"
    )
    out: str = option("", "run directory (config.yaml, metrics.jsonl, tb/, checkpoints/, model/)")
    init_from: str = option(
        "",
        "start from this nlm checkpoint's weights and model config (e.g. from `nlm import`); "
        "the shards must be prepared with its tokenizer (--tokenizer-from CKPT/tokenizer)",
    )

    scale: ScaleConfig = section(ScaleConfig, "scale")

    # batches: one optimizer step sees micro_batch * grad_accum * workers sequences.
    micro_batch: int = option(
        16, "sequences per worker per micro-batch (rnn/lstm: parallel streams)"
    )
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_steps: int = option(1000, "optimizer steps to train for")
    shuffle: bool = option(True, "shuffle rows within each chunk (not for rnn/lstm)")
    chunk_rows: int = option(0, "rows read per chunk (0: micro_batch*64, or 65536 for rnn/lstm)")
    materialize_mb: int = option(
        1024, "keep a train split up to this many MB in Ray's object store (0: stream it)"
    )

    optim: OptimConfig = section(OptimConfig, "optimizer and schedule")
    mlm_prob: float = option(0.15, "bert: fraction of tokens masked")
    seed: int = option(1337, "random seed")

    # evaluation, logging, checkpoints
    eval_every: int = option(200, "steps between validation evaluations (and the last step)")
    eval_rows: int = option(0, "val rows per worker to score (0: all)")
    log_every: int = option(10, "steps between metric lines")
    checkpoint_every: int = option(0, "steps between checkpoints (0: at every evaluation)")
    keep_checkpoints: int = option(2, "checkpoints to keep (the last K)")
    max_failures: int = option(2, "worker-group restarts from the last checkpoint before giving up")
    resume: bool = option(False, "continue the run in --out from its latest checkpoint")
    placement_timeout_s: float = option(
        0.0, "seconds to wait for the cluster to place the workers (0: default)"
    )
    storage: str = option(
        "", "Ray Train storage for checkpoints (default: RUN/checkpoints); s3://... for multi-node"
    )
    shared_fs: bool = option(
        False, "--out is on storage every node sees (needed for multi-node runs)"
    )

    def check(self, source: str = "config") -> TrainConfig:
        """Types and ranges of every field, the default lr filled in; NLMError naming the field."""
        self = self.typed(source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        if not self.data:
            raise bad("data", "required: the shard directory from `nlm prepare` (--data)")
        if not self.out:
            raise bad("out", "required: the run directory (--out)")
        if self.model not in FAMILIES:
            raise bad("model", f"{self.model!r} is not one of {', '.join(FAMILIES)}")
        scale, optim = self.scale.check(source), self.optim.check(source)
        lr = (
            optim.lr
            if optim.lr is not None
            else default_lr(self.model, self.preset, optim.optimizer)
        )
        min_lr = optim.min_lr if optim.min_lr is not None else lr / 10
        self = dataclasses.replace(
            self, scale=scale, optim=dataclasses.replace(optim, lr=lr, min_lr=min_lr)
        )
        positive = ("micro_batch", "grad_accum", "max_steps", "eval_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "chunk_rows",
            "eval_rows",
            "checkpoint_every",
            "max_failures",
            "materialize_mb",
            "placement_timeout_s",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "must be at least 1 (resume needs the latest)")
        if not 0 < self.mlm_prob < 1:
            raise bad("mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        return self

    def schedule(self) -> Schedule:
        """The learning rate per step (check() first: it fills in the default lr)."""
        return self.optim.schedule(self.max_steps)

    @property
    def recurrent(self) -> bool:
        return model_class(self.model).recurrent

    @property
    def rows_per_chunk(self) -> int:
        if self.chunk_rows:
            return max(self.chunk_rows, self.micro_batch)
        return 65536 if self.recurrent else self.micro_batch * 64

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_every
