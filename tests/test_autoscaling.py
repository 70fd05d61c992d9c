"""Autoscaling with Ray's fake multi-node provider, configured from cluster.yaml.

`ray.cluster_utils.AutoscalingCluster` is unusable in the ray 2.60 wheel (its example config is
not shipped, and it runs `ray stop --force`), so this follows the field notes' recipe: our own
fake_multinode config (cluster.yaml's trainer node type scaled down: min 0, max 2, 15 s idle
timeout), a head with CPU 0 started by `ray start --head --autoscaling-config` under
RAY_FAKE_CLUSTER=1. A driver joining through RAY_ADDRESS (the embedded default's second mode)
asks for two trainer workers: the autoscaler adds two nodes, training runs on them, and once
idle they are removed again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ray_nodes import REPO, LocalCluster, fake_autoscaling_config

pytestmark = pytest.mark.slow


@pytest.fixture
def autoscaling_cluster():
    cluster = LocalCluster.create(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    config = cluster.temp_dir / "autoscaling.yaml"
    config.write_text(
        yaml.safe_dump(fake_autoscaling_config(REPO / "cluster.yaml", cluster.gcs_address))
    )
    try:
        cluster.start_head("--num-cpus=0", f"--autoscaling-config={config}")
        cluster.wait_for_nodes(1, timeout=300)
        yield cluster
    finally:
        cluster.shutdown()


def test_training_job_scales_the_cluster_up_and_idle_nodes_go_away(
    autoscaling_cluster, tmp_path: Path
):
    cluster = autoscaling_cluster
    (head,) = cluster.nodes_alive()
    assert head["resources_total"].get("CPU", 0) == 0 and "trainer" not in head["resources_total"]

    env = dict(
        cluster.env,
        RAY_ADDRESS=cluster.gcs_address,
        # Node start-up counts against the worker group's start timeout (60 s by default).
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="180",
    )
    driver = subprocess.run(
        [
            sys.executable, "tests/cluster_jobs/probe_train.py", "--out", str(tmp_path),
            "--workers", "2", "--resources", '{"CPU": 1, "trainer": 1}', "--timeout", "180",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert driver.returncode == 0, driver.stderr[-3000:]

    # While training ran, the cluster had the head plus two autoscaled trainer nodes...
    nodes = json.loads((tmp_path / "nodes.json").read_text())
    added = {n["node_id"] for n in nodes if n["resources"].get("trainer")}
    assert len(added) == 2 and head["node_id"] not in added
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["node_id"] for r in ranks} == added, "one worker on each new node"

    # ...and after the idle timeout (15 s) only the head is left.
    deadline = time.monotonic() + 120
    alive = cluster.nodes_alive()
    while len(alive) > 1 and time.monotonic() < deadline:
        time.sleep(2)
        alive = cluster.nodes_alive()
    assert [n["node_id"] for n in alive] == [head["node_id"]]
