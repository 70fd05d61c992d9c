"""Where inference runs: `--device {cpu,cuda,auto}` and `--dtype {float32,bfloat16,float16}`.

Every inference entry point (`nlm serve`, `nlm eval`, `nlm generate`, the serving replicas)
goes through `resolve_device` / `resolve_dtype` *before* it loads a model, so a request the
machine cannot honour (`cuda` with no visible GPU, bf16 on a GPU without bf16 kernels) is one
`NLMError` line, never a hang or a half-loaded replica.

Precision: the weights run in the chosen dtype, but every consumer of logits (scoring,
sampling, fill-mask, evaluation) upcasts them to float32 before the softmax (`.float()` in
nlm.inference, nlm.sampling, nlm.evaluation), so log-probabilities are fp32 sums of
fp32 terms whatever the weights' precision. Under `auto`, a model that lands on the CPU stays
float32 (bf16 matmuls are slow on most CPUs, the same rule as training's deepspeed config);
an explicit `--device cpu --dtype bfloat16` is honoured (it is how CI exercises the dtype path).

Plain PyTorch: no Ray here (serving asks Ray for GPUs; this module checks what it got).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from nlm.errors import NLMError

DEVICES = ("cpu", "cuda", "auto")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_TRIM_THRESHOLD = 1 * 2**30


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed tensor memory for the next allocation of this process
    (Linux with glibc; elsewhere a no-op). Returns whether it applied.

    By default glibc serves each block above its mmap threshold (128 KiB, growing with use to at
    most 32 MiB) with fresh pages from the kernel, unmaps it on free, and returns the heap's free
    top to the kernel once it passes the trim threshold; a CPU forward pass that allocates its
    activations and (rows, V) logits anew every batch then pays a page fault per 4 KiB each time.
    This sets the mmap threshold to 32 MiB and the trim threshold to 1 GiB (as
    `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` would; PyTorch's CPU performance guide
    suggests jemalloc or tcmalloc for the same reason). Measured on the 2-core machine, `nlm eval`
    of the small fnn on wt2 test: 27k -> 40k tokens/s; a DeepSpeed training worker of the small
    lstm: +4 %. The cost: the process keeps up to 1 GiB of freed memory instead of returning it.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # the parameter numbers above are glibc's: only a glibc (which has this symbol) gets them
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def resolve_device(name: str, what: str = "--device") -> torch.device:
    """`cpu`, `cuda` or `auto` -> a torch device; NLMError when `cuda` has no visible GPU.

    `auto` is the first GPU when torch sees one, else the CPU. `cuda` means cuda:0 of what is
    visible (Ray sets CUDA_VISIBLE_DEVICES to a replica's own GPUs).
    """
    if name not in DEVICES:
        raise NLMError(f"{what} {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        raise NLMError(f"{what} cuda: no GPU is visible here ({_why_no_gpu()})")
    return torch.device("cuda", 0)


def resolve_dtype(
    name: str, device: torch.device, requested_device: str = "cuda", what: str = "--dtype"
) -> torch.dtype:
    """The weights' dtype on `device`; NLMError for an unknown name or bf16 a GPU lacks.

    `requested_device` is what the user asked for: under `auto`, a CPU keeps float32.
    """
    if name not in DTYPES:
        raise NLMError(f"{what} {name!r}: expected one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cpu" and requested_device == "auto":
        return torch.float32
    if device.type == "cuda" and dtype == torch.bfloat16:
        if not torch.cuda.is_bf16_supported(including_emulation=False):
            gpu = torch.cuda.get_device_name(device)
            raise NLMError(
                f"{what} bfloat16: {gpu} has no bf16 kernels (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}; bf16 needs "
                "8.0+): use --dtype float16 or float32"
            )
    return dtype


def add_device_arguments(parser, default_device: str = "cpu") -> None:
    """`--device` and `--dtype` on an argparse parser (nlm eval / generate / serve)."""
    group = parser.add_argument_group("device")
    group.add_argument(
        "--device",
        choices=DEVICES,
        default=default_device,
        help=f"where the model runs (default {default_device}; auto: a GPU when one is visible)",
    )
    group.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="weights' precision (default float32); logits are upcast to float32 for scoring",
    )


def check_request(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Both checks at once, before anything is loaded: (device, dtype) or NLMError."""
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved, device)


def place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move a loaded model onto `device` in `dtype`, in eval mode."""
    return model.to(device=device, dtype=dtype).eval()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without parameters)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def load_for_inference(path: str | Path, device: str = "cpu", dtype: str = "float32"):
    """`nlm.checkpoint.load_checkpoint` onto `device` in `dtype`, checked before loading.

    Returns the Checkpoint with its model placed. The weights are read straight onto the
    device (safetensors), then cast.
    """
    from nlm.checkpoint import load_checkpoint

    resolved, torch_dtype = check_request(device, dtype)
    checkpoint = load_checkpoint(path, device=resolved)
    place(checkpoint.model, resolved, torch_dtype)
    return checkpoint


def describe(model: torch.nn.Module) -> dict[str, str]:
    """{"device", "dtype"} of a model's weights, as /v1/models and the CLIs report them."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        return {"device": "cpu", "dtype": "float32"}
    return {"device": str(parameter.device), "dtype": str(parameter.dtype).removeprefix("torch.")}


def _why_no_gpu() -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and not visible.strip():
        return "CUDA_VISIBLE_DEVICES is empty"
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no device"
