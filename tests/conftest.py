"""Shared fixtures. Ray is started once per test session (every ray.init costs seconds)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # decided explicitly: tests use no token auth
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Absolute: `ray job submit` runs its entrypoint in an unpacked copy of the working dir, where
# CI's relative "../shared/data" would point nowhere.
os.environ["NLM_DATA_MIRROR"] = str(
    Path(
        os.environ.get("NLM_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data"
    ).resolve()
)


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    path = Path(os.environ["NLM_DATA_MIRROR"])
    assert path.is_dir(), f"NLM_DATA_MIRROR={path} is not a directory"
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session.

    4 logical CPUs on a 2-core machine on purpose: Train workers and Serve replicas take
    fractional CPUs and Ray Data still needs room to schedule its tasks (see the field notes).
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo group in the test process, as torchrun would set it up.

    One per session, never torn down between modules: DeepSpeed caches its groups in module
    globals (deepspeed.utils.groups), so a second init_process_group after a destroy leaves it
    holding the first world's group ("Group ... is not registered").
    """
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    # The trainer's own extension cache (cluster/train/loop.py): DeepSpeed JIT-builds its CPU
    # communication op on init_distributed, and the shared default cache may be locked.
    from nlm.corpora import cache_dir

    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
