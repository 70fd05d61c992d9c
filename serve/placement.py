"""GPUs for serving: which device a replica loads onto, and whether a request can be placed.

A model deployment asks Ray for GPUs with `ray_actor_options.num_gpus` (fractional allowed:
0.25 packs four replicas on one GPU). Ray then sets the replica's CUDA_VISIBLE_DEVICES to its
GPU, so `cuda` inside the replica is cuda:0. The application args carry `device` and `dtype`
(nlm.device); under `auto` a replica uses a GPU exactly when Ray gave it one, which is how
serve/config.yaml puts one model on a GPU and the others on CPUs with one `device: auto`.

`check_placeable` runs in `nlm serve` before `serve.run`: a request for more GPUs than the
cluster has would otherwise leave the deployment waiting for resources forever.
"""

from __future__ import annotations

from typing import Any

from nlm.errors import NLMError


def replica_device(device: str) -> str:
    """The device a replica loads its model onto: `device`, with `auto` settled by whether Ray
    assigned this replica a GPU. Raises RuntimeError (the replica fails to start, and Serve
    reports it) for `cuda` without an assigned GPU."""
    import ray

    gpus = ray.get_gpu_ids()
    if device == "auto":
        return "cuda" if gpus else "cpu"
    if device == "cuda" and not gpus:
        raise RuntimeError(
            "device cuda, but this replica was given no GPU: set ray_actor_options.num_gpus "
            "for its deployment (serve/config.yaml) or --replica-gpus"
        )
    return device


def replica_placement(device: str, dtype: str) -> tuple[str, str]:
    """(device, dtype) a replica loads with: `replica_device`, and under `auto` a replica that
    got no GPU keeps float32 (nlm.device: bf16 matmuls are slow on most CPUs)."""
    where = replica_device(device)
    if device == "auto" and where == "cpu":
        return where, "float32"
    return where, dtype


def gpus_per_replica(device: str, num_gpus: float | None) -> float:
    """GPUs each model replica asks Ray for: `num_gpus`, or one whole GPU under `cuda`."""
    if num_gpus is None:
        return 1.0 if device == "cuda" else 0.0
    if num_gpus < 0:
        raise NLMError(f"application args (field 'num_gpus'): must be >= 0, got {num_gpus}")
    if device == "cuda" and num_gpus == 0:
        raise NLMError(
            "application args (field 'num_gpus'): device cuda needs a GPU share per replica "
            "(> 0, e.g. 0.25 for four replicas per GPU)"
        )
    if num_gpus > 1 and num_gpus != int(num_gpus):
        raise NLMError(
            f"application args (field 'num_gpus'): {num_gpus}: Ray takes fractions only below 1"
        )
    return float(num_gpus)


def check_placeable(requests: list[float], available: float) -> None:
    """NLMError when replicas asking `requests` GPUs (one entry per replica) cannot all fit on
    a cluster with `available` GPUs. Fractions share a GPU only up to 1 per GPU: packed
    first-fit-decreasing, the same greedy rule that Ray's scheduler follows for one node."""
    wanted = sorted((r for r in requests if r > 0), reverse=True)
    if not wanted:
        return
    whole = int(available)
    free = [1.0] * whole
    for share in wanted:
        need = int(share) if share >= 1 else 0
        if need:
            if sum(1 for f in free if f == 1.0) < need:
                break
            for _ in range(need):
                free.remove(1.0)
            continue
        for i, room in enumerate(free):
            if room + 1e-9 >= share:
                free[i] = room - share
                break
        else:
            break
    else:
        return
    raise NLMError(
        f"the replicas ask for {sum(wanted):g} GPU(s) ({len(wanted)} replica(s), "
        f"{', '.join(f'{w:g}' for w in wanted[:4])}{' ...' if len(wanted) > 4 else ''} each) "
        f"but the cluster has {available:g}: lower --replica-gpus or --replicas, or add GPUs"
    )


def gpu_requests(app_args: dict[str, Any], models: int) -> list[float]:
    """One entry per model replica: the GPUs it asks for under these application args."""
    per = gpus_per_replica(app_args.get("device", "cpu"), app_args.get("num_gpus"))
    return [per] * (models * int(app_args.get("num_replicas") or 1))


def check_device_args(device: str, dtype: str) -> None:
    """The names only (the driver may have no GPU; the replicas check what they got)."""
    from nlm.device import DEVICES, DTYPES

    if device not in DEVICES:
        raise NLMError(
            f"application args (field 'device'): {device!r} is not one of {', '.join(DEVICES)}"
        )
    if dtype not in DTYPES:
        raise NLMError(
            f"application args (field 'dtype'): {dtype!r} is not one of {', '.join(DTYPES)}"
        )
