"""Distributed helpers every training loop uses (pretraining, fine-tuning): one rank's view of
the process group that Ray Train or torchrun set up.

- `barrier(device)`: names the GPU under NCCL; a bare `dist.barrier()` there guesses the device
  from the rank and can hang when that guess is wrong (torch.distributed.barrier, device_ids).
- `all_reduce_sum(values, device)`: floats summed over the ranks (float64, so counts stay exact).
- `seed_everything(seed)`: Python, NumPy and torch generators.
- `gathered(module, zero3)`: a context in which every parameter is whole on every rank (under
  ZeRO-3 each rank holds a slice; DeepSpeed's GatheredParameters gathers them).
- `cpu_count()`: the cores this process may run on.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist


def barrier(device: torch.device) -> None:
    """Wait for every rank; with NCCL, on this rank's GPU (a bare barrier() can hang there:
    ray-project/ray PR #42751)."""
    if not dist.is_initialized():
        return
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed element-wise over the ranks (as is, without a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def gathered(module: torch.nn.Module, zero3: bool) -> Iterator[None]:
    """Under ZeRO-3, every parameter of `module` gathered whole for the duration (read-only:
    changes are not scattered back); otherwise nothing to do."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
