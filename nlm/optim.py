"""The optimizer and learning-rate schedule every training loop in nlm uses.

`OptimConfig` is the optimizer/schedule section of `TrainConfig` (pretraining) and
`FinetuneConfig` (fine-tuning), each with its own defaults; `make_optimizer` builds the torch
optimizer from it and `Schedule.at(step)` gives the learning rate of a step. The rate is a pure
function of the step, set on the optimizer before each step, so a resumed run needs no scheduler
state. The one-process demo (nlm.workflows.foundation_demo) uses the same `Schedule`.

Regularisation differs by optimizer, and each has its own field:
- AdamW: `weight_decay`, decoupled from the gradient (Loshchilov & Hutter 2019).
- SGD: `l2`, the course notes' regularised risk (section 3, eqs. 6-2 to 6-5)
      R(W, b) = 1/N sum_n L(y_n, y^_n) + eps/2 ||W||_F^2
  whose gradient step, with learning rate l (`lr`) and eps (`l2`), is
      W <- W - l (dL/dW + eps W)        (6-4; dL/dW is the mean loss's gradient)
      b <- b - l dL/db                  (6-5: the penalty leaves biases alone)
  i.e. L2 added to the gradient, which is exactly PyTorch SGD's `weight_decay` (coupled: with
  `momentum` the decayed gradient goes into the momentum buffer). It is a separate field because
  AdamW's default decay of 0.1 would, at SGD's learning rates (20 for the LSTM), flip a matrix's
  sign in one step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from nlm.config import Config, option
from nlm.errors import NLMError

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass
class OptimConfig(Config):
    """Optimizer and schedule: linear warm-up to `lr`, then cosine to `min_lr` (or constant)."""

    optimizer: str = option("adamw", "adamw | sgd")
    lr: float | None = option(
        None, "peak learning rate (nlm train: by family and preset, nlm.models.learning_rates)"
    )
    min_lr: float | None = option(
        None, "learning rate at the end of the cosine decay (unset: lr / 10)"
    )
    warmup_steps: int = option(100, "linear warm-up steps (at most a fifth of the run)")
    warmup_fraction: float = option(
        0.0, "fraction of the steps in linear warm-up (when set, instead of warmup_steps)"
    )
    lr_schedule: str = option("cosine", "cosine | constant (after warm-up)")
    weight_decay: float = option(
        0.1, "AdamW's decoupled weight decay (matrices only; SGD uses --l2)"
    )
    l2: float = option(
        0.0,
        "SGD's L2 penalty eps of the regularised risk L + eps/2 ||W||^2: "
        "W <- W - lr (dL/dW + eps W), matrices only (torch SGD weight_decay)",
    )
    betas: list[float] = option([0.9, 0.95], "AdamW betas, e.g. 0.9,0.95")
    momentum: float = option(0.0, "SGD momentum")
    grad_clip: float = option(1.0, "gradient norm clipping (0: off)")

    def check(self, source: str = "config") -> OptimConfig:
        """Types and ranges (lr may still be None: its owner fills in the default)."""
        self = self.typed(source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"{self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise bad("lr_schedule", f"{self.lr_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if len(self.betas) != 2:
            raise bad("betas", "two numbers, e.g. [0.9, 0.95]")
        for name in ("warmup_steps", "weight_decay", "l2", "grad_clip", "momentum", "min_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise bad(name, f"must not be negative, got {value}")
        if self.l2 and self.optimizer != "sgd":
            raise bad("l2", "the L2 penalty of --optimizer sgd; AdamW decays by weight_decay")
        if self.lr is not None and not self.lr > 0:
            raise bad("lr", f"must be positive, got {self.lr}")
        if not 0 <= self.warmup_fraction < 1:
            raise bad("warmup_fraction", f"must be in [0, 1), got {self.warmup_fraction}")
        return self

    def schedule(self, max_steps: int) -> Schedule:
        """The schedule of a run of `max_steps` optimizer steps (lr and min_lr resolved)."""
        if self.lr is None or self.min_lr is None:
            raise ValueError("OptimConfig.schedule needs lr and min_lr resolved (check first)")
        warmup = (
            int(self.warmup_fraction * max_steps) if self.warmup_fraction else self.warmup_steps
        )
        # capped at a fifth of the run: the default 100 steps on a `--max-steps 40` smoke run
        # would otherwise end it before the learning rate ever reached its peak
        warmup = min(warmup, max_steps // 5)
        return Schedule(self.lr, min(self.min_lr, self.lr), warmup, max_steps, self.lr_schedule)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """lr(step): linear warm-up over `warmup` steps to `lr`, then cosine from `lr` to `min_lr`
    at step `total` (SGDR's cosine, Loshchilov & Hutter 2017, without restarts), or constant."""

    lr: float
    min_lr: float
    warmup: int
    total: int
    kind: str = "cosine"

    def at(self, step: int, progress: float | None = None) -> float:
        """The rate of optimizer step `step` (0-based). `progress` (0 -> 1) replaces the step
        count's position in the decay, for runs whose budget is time rather than steps."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.lr
        if progress is None:
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
        progress = min(1.0, max(0.0, progress))
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - self.min_lr)


def make_optimizer(
    model: torch.nn.Module, config: OptimConfig, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (nanoGPT's rule: never on biases, norms, embeddings'
    vectors of rank 1), or SGD (the classic RNN recipe) with the notes' L2 penalty `l2` (eps of
    eq. 6-4, torch SGD's `weight_decay`) on the same matrices: W <- W - lr (dL/dW + eps W), and
    b <- b - lr dL/db for every parameter of rank 1 (eq. 6-5). Shared parameters count once.

    Under DeepSpeed (nlm.cluster.train) this optimizer is the client optimizer given to
    `deepspeed.initialize`; ZeRO keeps its param groups, so each group's weight_decay applies.
    Gradient clipping (`grad_clip`) acts on dL/dW before the penalty is added.

    `fused`: PyTorch's fused AdamW kernel (one launch for every tensor; GPU runs), a client
    optimizer DeepSpeed accepts under zero_allow_untested_optimizer, so its own FusedAdam op is
    never JIT-built."""
    import torch

    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    if config.lr is None:
        raise ValueError("make_optimizer needs lr resolved (check the config first)")
    # The notes' W are the layers' weight matrices; the embedding table, a matrix too (and the
    # output layer's W when tied), is penalised with them.
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # the notes' b: biases (and norms' gains)
    if config.optimizer == "sgd":
        if not config.l2:  # one group, as before `l2` existed: older runs' state still resumes
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        groups = [
            {"params": decay, "weight_decay": config.l2},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [group for group in groups if group["params"]]  # ZeRO flattens each group
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=fused or None)
