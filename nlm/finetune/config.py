"""FinetuneConfig: every knob of `nlm finetune`, one dataclass that round-trips through YAML.

RUN/config.yaml holds the resolved config of a run; `nlm finetune --config FILE` reads one and
flags override it (configs/finetune-*.yaml are examples).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from nlm.config import Config
from nlm.errors import NLMError
from nlm.finetune.data import TASKS


@dataclasses.dataclass
class FinetuneConfig(Config):
    # what to fine-tune, on what, where the run goes
    checkpoint: str = ""  # pretrained gpt/bert checkpoint (or run directory)
    task: str = ""  # classify | tag
    train: str = ""  # JSONL training examples
    eval: str = ""  # JSONL evaluation examples (its labels must occur in train)
    out: str = ""  # the run directory: config.yaml, metrics.jsonl, tb/, model/
    overwrite: bool = False  # replace an existing run in `out`

    # the model
    lm_weight: float = 0.0  # gpt: L = L2 + lm_weight * L1; 0 disables L1
    from_scratch: bool = False  # same architecture and tokenizer, freshly initialised weights
    max_length: int = 0  # ids per input incl. [CLS]/[SEP] or <s>/</s>; 0: the model's maximum
    dropout: float | None = None  # None: the pretrained model's

    # optimisation: one step sees micro_batch * grad_accum * workers examples
    epochs: int = 3
    max_steps: int = 0  # 0: epochs x steps per epoch
    micro_batch: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr: float = 1e-5  # cosine decay from lr to min_lr at the last step
    warmup_fraction: float = 0.1  # of the steps, linear warm-up
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 1337

    # scale (Ray Train + DeepSpeed)
    workers: int = 1
    cpus_per_worker: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    zero_stage: int = 0
    torch_threads: int = 0  # 0: the node's cores / workers

    # evaluation and logging
    eval_every: int = 0  # steps between evaluations; 0: once an epoch (and always at the end)
    log_every: int = 10

    def check(self, source: str = "config") -> FinetuneConfig:
        check_types(self, source)

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
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"{self.device!r} is not one of auto, cpu, cuda")
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", f"{self.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
        for name in ("epochs", "micro_batch", "grad_accum", "workers", "log_every"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        for name in (
            "max_steps",
            "max_length",
            "eval_every",
            "torch_threads",
            "lm_weight",
            "min_lr",
            "weight_decay",
            "grad_clip",
        ):
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise bad("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise bad("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if not self.cpus_per_worker > 0:
            raise bad("cpus_per_worker", f"must be positive, got {self.cpus_per_worker}")
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


def check_types(config: Config, source: str) -> None:
    """YAML gives '1e-3' as a string: name the field whose value has the wrong type."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, expected = getattr(config, field.name), hints[field.name]
        if not _matches(value, expected):
            raise NLMError(
                f"{source} (field '{field.name}'): expected {_name(expected)}, got {value!r}"
            )
        if _accepts_float(expected) and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, field.name, float(value))  # 1 in YAML means 1.0


def _matches(value: Any, expected: Any) -> bool:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _accepts_float(expected: Any) -> bool:
    return expected is float or float in typing.get_args(expected)


def _name(expected: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if expected in names:
        return names[expected]
    return " or ".join(names.get(a, "null") for a in typing.get_args(expected))
