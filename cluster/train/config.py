"""TrainConfig: every knob of `nlm train`, in one dataclass that round-trips through YAML.

A run writes its fully resolved config to RUN/config.yaml; `nlm train --config FILE` loads one
and command-line flags override it, so any run can be repeated from its own directory.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from nlm.config import Config
from nlm.errors import NLMError

FAMILIES = ("fnn", "rnn", "lstm", "gpt", "bert")
RECURRENT = ("rnn", "lstm")


@dataclasses.dataclass
class TrainConfig(Config):
    # what to train, on what, where the run goes
    data: str = ""  # shard directory written by `nlm prepare`
    model: str = "gpt"  # fnn | rnn | lstm | gpt | bert
    preset: str = "tiny"  # tiny | small | base (| notes for fnn/rnn/lstm)
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {dropout: 0.3}
    out: str = ""  # the run directory (RUN)
    # start from this nlm checkpoint's weights and model config (e.g. `nlm import`'s); "": fresh
    init_from: str = ""

    # scale
    workers: int = 2
    cpus_per_worker: float = 0.5  # fractional on small machines: Ray Data needs CPUs too
    # custom Ray resources each worker asks for, e.g. {trainer: 1} to land on labelled nodes
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    device: str = "auto"  # auto | cpu | cuda (cuda: one GPU per worker, nccl, bf16)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0..3
    torch_threads: int = 0  # 0: the node's cores / workers on the node

    # batches: one optimizer step sees micro_batch * grad_accum * workers sequences.
    # rnn/lstm: micro_batch is the number of parallel streams per worker (hidden state carried)
    micro_batch: int = 16
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    shuffle: bool = True  # shuffle rows within a chunk (never for rnn/lstm streams)
    chunk_rows: int = 0  # rows read per chunk; 0: micro_batch*64, or 65536 for rnn/lstm
    materialize_mb: int = 1024  # load a train split up to this size into Ray's object store

    # optimisation
    optimizer: str = "adamw"  # adamw | sgd
    lr: float | None = None  # peak; None: the family and preset's (default_lr)
    min_lr: float | None = None  # cosine decays from lr to min_lr at max_steps; None: lr / 10
    warmup_steps: int = 100  # capped at max_steps // 5 (train_loop.effective_warmup)
    lr_schedule: str = "cosine"  # cosine | constant (both after linear warm-up)
    weight_decay: float = 0.1  # AdamW only; never on biases, norms, embeddings
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.0  # SGD only
    grad_clip: float = 1.0  # 0: off
    mlm_prob: float = 0.15  # bert
    seed: int = 1337

    # evaluation, logging, checkpoints
    eval_every: int = 200  # steps between val evaluations (and the last step)
    eval_rows: int = 0  # val rows per worker to score; 0: the whole val split
    log_every: int = 10
    checkpoint_every: int = 0  # 0: at every evaluation
    keep_checkpoints: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint before giving up
    resume: bool = False  # continue from RUN/checkpoints (the latest)
    placement_timeout_s: float = 0.0  # wait this long for the cluster to place workers; 0: default
    storage: str = ""  # Ray Train storage; default RUN/checkpoints. s3://... for multi-node
    shared_fs: bool = False  # RUN is on a filesystem every node sees (needed for multi-node)

    def check(self, source: str = "config") -> TrainConfig:
        """Types and ranges of every field; NLMError naming the field."""
        _check_types(self, source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        if not self.data:
            raise bad("data", "required: the shard directory from `nlm prepare` (--data)")
        if not self.out:
            raise bad("out", "required: the run directory (--out)")
        if self.model not in FAMILIES:
            raise bad("model", f"{self.model!r} is not one of {', '.join(FAMILIES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise bad("device", f"{self.device!r} is not one of auto, cpu, cuda")
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", f"{self.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.optimizer not in ("adamw", "sgd"):
            raise bad("optimizer", f"{self.optimizer!r} is not one of adamw, sgd")
        if self.lr_schedule not in ("cosine", "constant"):
            raise bad("lr_schedule", f"{self.lr_schedule!r} is not one of cosine, constant")
        if self.lr is None:
            self.lr = default_lr(self.model, self.preset, self.optimizer)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if len(self.betas) != 2:
            raise bad("betas", "two numbers, e.g. [0.9, 0.95]")
        positive = ("workers", "micro_batch", "grad_accum", "max_steps", "eval_every", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        non_negative = (
            "warmup_steps",
            "chunk_rows",
            "eval_rows",
            "checkpoint_every",
            "max_failures",
            "torch_threads",
            "materialize_mb",
            "placement_timeout_s",
            "weight_decay",
            "grad_clip",
            "min_lr",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise bad(name, f"must not be negative, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "must be at least 1 (resume needs the latest)")
        if not self.cpus_per_worker > 0:
            raise bad("cpus_per_worker", f"must be positive, got {self.cpus_per_worker}")
        if not self.lr > 0:
            raise bad("lr", f"must be positive, got {self.lr}")
        if not 0 < self.mlm_prob < 1:
            raise bad("mlm_prob", f"must be in (0, 1), got {self.mlm_prob}")
        return self

    @property
    def recurrent(self) -> bool:
        return self.model in RECURRENT

    @property
    def rows_per_chunk(self) -> int:
        if self.chunk_rows:
            return max(self.chunk_rows, self.micro_batch)
        return 65536 if self.recurrent else self.micro_batch * 64

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.eval_every

    def save_yaml(self, path: str | Path) -> None:
        """Write through a temporary name: a half-written config never looks complete."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        tmp.rename(path)

    @classmethod
    def load_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml(path), source=str(path))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise NLMError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise NLMError(f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError:
        raise NLMError(f"{path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NLMError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def default_lr(family: str, preset: str, optimizer: str) -> float:
    """The peak learning rate when none is given: what trained these sizes in the quality-bar
    runs (docs/BENCHMARKS.md: AdamW 1e-3 for gpt, 2e-3 to 3e-3 for fnn/rnn; SGD 20 for lstm,
    as PyTorch's word_language_model), and GPT-2 / BERT's own rates for `base`. A single 3e-4
    for everything left a 40-step `tiny` run at the perplexity of a uniform guess."""
    if optimizer == "sgd":
        return 20.0 if family == "lstm" else 1.0  # tanh RNNs and the fnn diverge at 20
    if preset == "base":
        return {"gpt": 6e-4, "bert": 1e-4}.get(family, 1e-3)
    return 1e-3 if family in ("gpt", "bert") else 3e-3


def _check_types(config: Config, source: str) -> None:
    """YAML gives strings where numbers were meant ('1e-3' stays a str): say which field."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        expected = hints[field.name]
        if not _matches(value, expected):
            raise NLMError(
                f"{source} (field '{field.name}'): expected {_type_name(expected)}, got {value!r}"
            )
        if expected is float and isinstance(value, int):  # 1 in YAML means 1.0
            setattr(config, field.name, float(value))


def _matches(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(expected))
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        _, item = typing.get_args(expected)
        return isinstance(value, dict) and all(
            isinstance(k, str) and _matches(v, item) for k, v in value.items()
        )
    if expected is Any:
        return True
    if expected is type(None):
        return value is None
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if expected in names:
        return names[expected]
    origin = typing.get_origin(expected)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return str(expected)
