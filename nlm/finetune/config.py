"""FinetuneConfig: every knob of `nlm finetune`, one dataclass that round-trips through YAML.

RUN/config.yaml holds the resolved config of a run; `nlm finetune --config FILE` reads one and
flags override it (configs/finetune-*.yaml are examples).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nlm.config import Config, option, section
from nlm.errors import NLMError
from nlm.finetune.data import TASKS
from nlm.optim import OptimConfig
from nlm.scale import ScaleConfig


@dataclasses.dataclass
class FinetuneConfig(Config):
    # what to fine-tune, on what, where the run goes
    checkpoint: str = option("", "pretrained gpt/bert checkpoint or run directory")
    task: str = option(
        "",
        "classify (JSONL text/label or text_a/text_b/label) | tag (JSONL tokens/tags) | "
        "seq2seq (JSONL source/target; a transformer checkpoint)",
    )
    train: str = option("", "training JSONL")
    eval: str = option("", "evaluation JSONL (its labels must occur in train)")
    out: str = option("", "run directory (config.yaml, metrics.jsonl, tb/, model/)")
    overwrite: bool = option(False, "replace an existing run in --out")

    # the model
    lm_weight: float = option(
        0.0, "gpt: λ in L = L2 + λ·L1 (task loss + language-model loss); 0 disables L1"
    )
    from_scratch: bool = option(
        False, "train the checkpoint's architecture from fresh weights (a control)"
    )
    max_length: int = option(0, "ids per input including specials (0: the model's maximum)")
    dropout: float | None = option(
        None, "dropout while fine-tuning (default: the pretrained model's)"
    )

    # one step sees micro_batch * grad_accum * workers examples
    epochs: int = option(3, "passes over the training rows (when --max-steps is 0)")
    max_steps: int = option(0, "optimizer steps (0: epochs x steps per epoch)")
    micro_batch: int = option(32, "examples per worker per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    optim: OptimConfig = section(
        OptimConfig,
        "optimizer and schedule",
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=0,
        warmup_fraction=0.1,
        weight_decay=0.01,
        betas=[0.9, 0.999],
    )
    seed: int = option(1337, "random seed")
    scale: ScaleConfig = section(ScaleConfig, "scale", workers=1, cpus_per_worker=1.0, zero_stage=0)

    # evaluation and logging
    eval_every: int = option(0, "steps between evaluations (0: once an epoch)")
    log_every: int = option(10, "steps between metric lines")

    def check(self, source: str = "config") -> FinetuneConfig:
        self = self.typed(source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        for name, what in (
            ("checkpoint", "the pretrained checkpoint (--checkpoint)"),
            ("train", "the training JSONL (--train)"),
            ("eval", "the evaluation JSONL (--eval)"),
            ("out", "the run directory (--out)"),
        ):
            if not getattr(self, name):
                raise bad(name, f"required: {what}")
        if self.task not in TASKS:
            raise bad("task", f"{self.task!r} is not one of {', '.join(TASKS)} (--task)")
        scale, optim = self.scale.check(source), self.optim.check(source)
        if optim.lr is None:
            raise bad("lr", "required: the peak learning rate (--lr)")
        if optim.min_lr is None:
            optim = dataclasses.replace(optim, min_lr=optim.lr / 10)
        self = dataclasses.replace(self, scale=scale, optim=optim)
        for name in ("epochs", "micro_batch", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_length", "eval_every", "lm_weight"):
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if 0 < self.max_length < 3:
            raise bad("max_length", f"{self.max_length} leaves no room for text")
        return self

    def absolute(self) -> FinetuneConfig:
        """Paths made absolute (Ray workers run in another directory)."""
        return self.replace(
            **{
                k: str(Path(getattr(self, k)).expanduser().resolve())
                for k in ("checkpoint", "train", "eval", "out")
            }
        )
