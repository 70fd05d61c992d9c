"""`ray job submit` on a real two-node Ray cluster on this machine.

The head carries the "data" label, the second node the "trainer" label (as cluster.yaml's
node types do). The corpus job (jobs/prepare_corpus.py) and the training job (jobs/pretrain.py)
are submitted with the real CLI and succeed; training workers that ask for the label run on the
trainer node (checked by node id: both nodes report the same IP); a job asking for more than the
cluster has fails with one clear line, in bounded time; jobs/deploy.py leaves an application
serving after its job ends.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from ray_nodes import BIN, REPO, LocalCluster, free_ports

# Real clusters on a 2-core machine shared with other work: generous hang guards, not goals.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

TRAIN = "tests/cluster_jobs/probe_train.py"


@pytest.fixture(scope="module")
def two_nodes():
    cluster = LocalCluster.create()
    try:
        cluster.start_head("--num-cpus=1", '--resources={"data": 2}')
        cluster.wait_for_nodes(1, timeout=300)
        cluster.start_worker("--num-cpus=2", '--resources={"trainer": 2}')
        cluster.wait_for_nodes(2, timeout=300)
        yield cluster
    finally:
        cluster.shutdown()


def submit(cluster: LocalCluster, *entrypoint: str) -> str:
    """`ray job submit --no-wait` under our own submission id."""
    job_id = f"nlm-test-{uuid.uuid4().hex[:8]}"
    result = cluster.ray(
        "job", "submit", "--address", cluster.dashboard_url, "--submission-id", job_id,
        "--no-wait", "--working-dir", ".", "--", *entrypoint,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return job_id


def follow(cluster: LocalCluster, job_id: str, timeout: float = 900) -> tuple[str, str]:
    """`ray job logs --follow` until the job ends; then its final status and its logs."""
    logs = cluster.ray(
        "job", "logs", "--address", cluster.dashboard_url, "--follow", job_id, timeout=timeout
    ).stdout
    result = cluster.ray("job", "status", "--address", cluster.dashboard_url, job_id)
    said = (result.stdout + result.stderr).lower()  # "Job '<id>' succeeded" / "... failed"
    for word in ("succeeded", "failed", "stopped"):
        if f"job '{job_id}' {word}" in said:
            return word.upper(), logs
    return said, logs


def node_ids_with(nodes: list[dict], label: str) -> set[str]:
    return {n["node_id"] for n in nodes if n["resources"].get(label)}


@pytest.fixture(scope="module")
def corpus_job(two_nodes, tmp_path_factory):
    """The corpus job, submitted once: (status, logs, shard directory)."""
    shards = tmp_path_factory.mktemp("corpus") / "shards"
    job = submit(
        two_nodes, "python", "jobs/prepare_corpus.py", "--config", "configs/prepare-wt2.yaml",
        "--output", str(shards), "--workers", "2", "--worker-resource", "data=1", "--no-progress",
    )  # fmt: skip
    return (*follow(two_nodes, job), shards)


def test_corpus_job_succeeds(corpus_job):
    status, logs, shards = corpus_job
    assert status == "SUCCEEDED", logs[-3000:]
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0 and manifest["tokenizer"]["kind"] == "word"


def test_pretrain_job_succeeds_on_the_corpus_jobs_shards(two_nodes, corpus_job, tmp_path: Path):
    status, _, shards = corpus_job
    assert status == "SUCCEEDED"
    # Submitted after the corpus job: two jobs at once with the same --working-dir package
    # raced in Ray's runtime-env set-up here (the second found its working dir gone).
    run = tmp_path / "run"
    train = submit(
        two_nodes, "python", "jobs/pretrain.py", "--data", str(shards), "--model", "lstm",
        "--preset", "tiny", "--out", str(run), "--workers", "2", "--cpus-per-worker", "0.5",
        "--micro-batch", "8", "--max-steps", "6", "--eval-every", "6", "--eval-rows", "16",
        "--log-every", "3", "--shared-fs", "--no-progress",
    )  # fmt: skip
    status, logs = follow(two_nodes, train)
    assert status == "SUCCEEDED", logs[-3000:]
    # `nlm train` ends with one JSON line: the run's summary.
    lines = [line for line in logs.splitlines() if line.startswith('{"')]
    summary = json.loads(lines[-1]) if lines else {}
    assert summary.get("step") == 6, logs[-3000:]
    assert (run / "model" / "config.json").is_file() and (run / "metrics.jsonl").stat().st_size


def test_training_workers_land_on_the_trainer_node(two_nodes, tmp_path: Path):
    # `nlm train` cannot ask for a custom resource yet (no worker-resources option), so the
    # label is exercised by a small TorchTrainer job that asks for {"trainer": 0.5} per worker.
    train = submit(
        two_nodes, "python", TRAIN, "--out", str(tmp_path), "--workers", "2",
        "--resources", '{"CPU": 0.5, "trainer": 0.5}',
    )  # fmt: skip
    status, logs = follow(two_nodes, train)
    assert status == "SUCCEEDED", logs[-3000:]

    nodes = json.loads((tmp_path / "nodes.json").read_text())
    assert len(nodes) == 2
    trainer_nodes = node_ids_with(nodes, "trainer")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["node_id"] for r in ranks} <= trainer_nodes, "workers left the trainer node"
    assert [r["sum"] for r in ranks] == [3.0, 3.0], "the all-reduce saw both ranks"


def test_a_job_the_cluster_cannot_hold_fails_with_a_clear_message(two_nodes, tmp_path: Path):
    # Three workers with a whole "trainer" each; the cluster has two.
    job = submit(
        two_nodes, "python", TRAIN, "--out", str(tmp_path), "--workers", "3",
        "--resources", '{"CPU": 0.5, "trainer": 1}', "--timeout", "5",
    )  # fmt: skip
    status, logs = follow(two_nodes, job, timeout=300)  # a hang fails here, not forever
    assert status == "FAILED"
    assert "nlm: error: the Ray cluster cannot place 3 workers within 5 s" in logs
    assert "trainer: 3" in logs and "trainer: 2" in logs  # needed vs. what the cluster has
    assert "Traceback" not in logs
    assert not list(tmp_path.glob("rank*.json")), "no worker started"


def tiny_checkpoint(directory: Path, data_mirror: Path) -> Path:
    import torch

    from nlm.checkpoint import save_checkpoint
    from nlm.models import build_model
    from nlm.tokenizers import train_tokenizer

    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer("word", lines[:300], vocab_size=500)
    torch.manual_seed(0)
    model = build_model("lstm", "tiny", vocab_size=tokenizer.vocab_size).eval()
    return save_checkpoint(directory / "lstm", model, tokenizer)


def test_serve_config_file_deploys_with_serve_deploy(two_nodes, tmp_path: Path, data_mirror):
    """`serve deploy serve/config.yaml`: the shipped file, with only what must differ on this
    two-core, two-"node" machine replaced (checkpoint paths, port, sizes). Its proxy runs on
    the head only, as docs/OPERATIONS.md says (and both local nodes share one loopback)."""
    import yaml

    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    (port,) = free_ports(1)
    assert config["proxy_location"] == "HeadOnly"
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["checkpoints"] = [f"lm={tiny_checkpoint(tmp_path, data_mirror)}"]
    shipped = {d["name"]: d for d in app["deployments"]}
    app["deployments"] = [shipped["Gateway"], {**shipped["lstm"], "name": "lm"}]
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.25
        deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config))

    def serve_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "serve"), *args, "--address", two_nodes.dashboard_url],
            env=two_nodes.env, cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    deployed = serve_cli("deploy", str(path))
    assert deployed.returncode == 0, deployed.stderr[-2000:]
    try:
        deadline, status = time.monotonic() + 600, ""
        while time.monotonic() < deadline:
            status = serve_cli("status").stdout
            if "RUNNING" in status and "DEPLOYING" not in status:
                break
            assert "DEPLOY_FAILED" not in status, status
            time.sleep(2)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert models.status_code == 200, status + models.text
        (info,) = models.json()["data"]
        assert info["name"] == "lm" and info["replica"]["max_batch_size"] == 32
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/generate",
            json={"model": "lm", "prompt": "the game", "max_tokens": 5, "seed": 1},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        assert 1 <= len(answer.json()["token_ids"]) <= 5
    finally:  # the next test starts its own application on this cluster
        serve_cli("shutdown", "-y")


def test_deploy_job_leaves_the_application_serving(two_nodes, tmp_path: Path, data_mirror):
    checkpoint = tiny_checkpoint(tmp_path, data_mirror)
    (port,) = free_ports(1)
    config = tmp_path / "deploy.yaml"
    config.write_text(
        f"checkpoints: [lm={checkpoint}]\nhost: 127.0.0.1\nport: {port}\nreplica_cpus: 0.25\n"
    )
    job = submit(two_nodes, "python", "jobs/deploy.py", str(config))
    status, logs = follow(two_nodes, job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "deployed onto the cluster" in logs

    # The job has ended; the application keeps answering on the head's loopback.
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    assert models.status_code == 200, models.text
    assert [m["name"] for m in models.json()["data"]] == ["lm"]
    score = httpx.post(
        f"http://127.0.0.1:{port}/v1/score", json={"model": "lm", "text": "the game"}, timeout=60
    )
    assert score.status_code == 200, score.text
