"""The DeepSpeed config a run uses, built from its TrainConfig or FinetuneConfig (never a
separate JSON file).

The optimizer is ours (torch AdamW or SGD, passed to `deepspeed.initialize`): that avoids
JIT-building DeepSpeed's FusedAdam/CPUAdam ops on first use, at the price of
`zero_allow_untested_optimizer`. The learning rate schedule is ours too (a function of the
step, nlm.optim.Schedule), so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

from typing import Any

from nlm.cluster.train.config import TrainConfig
from nlm.errors import NLMError
from nlm.finetune.config import FinetuneConfig

# Parameters below this many elements stay whole on every rank under ZeRO-3 (DeepSpeed's
# default is 100k, which on the tiny preset would leave nothing partitioned); vectors
# (biases, norms) stay whole, matrices are split.
ZERO3_PERSISTENCE_THRESHOLD = 1024


def check_zero_stage(stage: int, device: str) -> None:
    """Refuse a stage this device cannot run, before any worker starts.

    On CPU (gloo, fp32, a client torch optimizer) stages 0-3 all train, for every family, ZeRO-3
    included with nn.LSTM and tied embeddings (tests/test_train.py runs each stage).
    """
    if stage not in (0, 1, 2, 3):
        raise NLMError(f"zero_stage {stage}: DeepSpeed ZeRO has stages 0, 1, 2, 3")
    if device not in ("cpu", "cuda"):
        raise NLMError(f"device {device!r}: DeepSpeed runs on 'cpu' or 'cuda'")


def deepspeed_config(
    config: TrainConfig | FinetuneConfig, device: str, world_size: int
) -> dict[str, Any]:
    """The dict passed as `deepspeed.initialize(config=...)`."""
    check_zero_stage(config.scale.zero_stage, device)
    zero: dict[str, Any] = {"stage": config.scale.zero_stage}
    if config.scale.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ZERO3_PERSISTENCE_THRESHOLD
        # Export gathers the full weights itself (GatheredParameters); nothing extra to save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    bf16 = device == "cuda"  # CPU runs stay fp32: bf16 matmuls are slow on most CPUs
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch,
        "gradient_accumulation_steps": config.grad_accum,
        "train_batch_size": config.micro_batch * config.grad_accum * world_size,
        "gradient_clipping": config.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
