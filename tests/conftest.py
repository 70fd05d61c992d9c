"""Shared fixtures. Ray is started once per test session (every ray.init costs seconds)."""

from __future__ import annotations

import os
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
