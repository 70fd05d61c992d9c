"""Inference devices without a GPU: the `--device` / `--dtype` plumbing on the CPU, the Serve
deployments' GPU options as Ray sees them, and the one-line refusals when no GPU is visible.

What runs on a real GPU (the same answers there, within a stated tolerance) is in
nlm/bench/gpu.py (`scripts/gpu_check.sh`), which compares its GPU answers with CPU ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_inference import CAUSAL, FAMILIES, TEXTS

from nlm.checkpoint import load_checkpoint
from nlm.device import check_request, describe, load_for_inference, resolve_device
from nlm.errors import NLMError
from nlm.inference import ContinuousGeneration, Engine

REPO = Path(__file__).resolve().parents[1]
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def paths(tiny_checkpoints) -> dict[str, Path]:
    return tiny_checkpoints


def nlm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nlm", *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nlm: error:"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------- nlm.device


def test_cpu_and_auto_resolve_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    # auto on a CPU keeps float32 whatever was asked (bf16 matmuls are slow on CPUs)...
    if NO_GPU:
        assert check_request("auto", "bfloat16") == (torch.device("cpu"), torch.float32)
    # ...an explicit cpu is honoured
    assert check_request("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(NLMError, match="--device 'tpu'"):
        resolve_device("tpu")
    with pytest.raises(NLMError, match="--dtype 'int8'"):
        check_request("cpu", "int8")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(NLMError, match="--device cuda: no GPU is visible"):
        check_request("cuda", "float32")


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_placement_answers_exactly_as_before(paths, family):
    """The device path with `cpu`: the same engine answers, bit for bit."""
    plain = Engine(load_checkpoint(paths[family]))
    placed = Engine(load_for_inference(paths[family], "cpu", "float32"))
    assert describe(placed.model) == {"device": "cpu", "dtype": "float32"}
    texts = TEXTS[:3]
    assert plain.score([plain.score_job(t) for t in texts]) == placed.score(
        [placed.score_job(t) for t in texts]
    )
    assert plain.embed([plain.embed_job(t) for t in texts]) == placed.embed(
        [placed.embed_job(t) for t in texts]
    )
    if family in CAUSAL:
        jobs = [plain.generation_job(t, 6, temperature=0.0) for t in texts]
        assert plain.generate(jobs) == placed.generate(jobs)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_weights_score_in_float32_within_tolerance(paths, family):
    """bf16 weights (8 bits of mantissa): per-token log-probs stay within 0.1 nats of fp32's
    and come out as fp32 numbers; the continuous batch and its KV cache run in bf16."""
    fp32 = Engine(load_for_inference(paths[family], "cpu", "float32"))
    bf16 = Engine(load_for_inference(paths[family], "cpu", "bfloat16"))
    assert describe(bf16.model)["dtype"] == "bfloat16"
    for a, b in zip(
        fp32.score([fp32.score_job(t) for t in TEXTS]),
        bf16.score([bf16.score_job(t) for t in TEXTS]),
        strict=True,
    ):
        assert a["num_tokens"] == b["num_tokens"]
        assert abs(a["logprob"] - b["logprob"]) <= 0.1 * a["num_tokens"], (a, b)
    if family in CAUSAL:
        jobs = [bf16.generation_job(t, 5, temperature=0.8, seed=3) for t in TEXTS[:4]]
        together = bf16.generate(jobs)
        generation = ContinuousGeneration(bf16.model)
        generation.add(jobs[:2], keys=[0, 1])
        got = dict(generation.step())
        generation.add(jobs[2:], keys=range(2, len(jobs)))  # joins the bf16 cache mid-way
        while generation:
            got.update(generation.step())
        for key, answer in enumerate(together):
            assert got[key][0] == answer["token_ids"]


# ---------------------------------------------------------------- the CLIs


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_cli_device_cuda_without_a_gpu_is_one_line_before_loading(paths, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    gpt = str(paths["gpt"])
    one_line_error(
        nlm("generate", "--checkpoint", gpt, "--device", "cuda"), "--device cuda", "no GPU"
    )
    one_line_error(
        nlm("eval", "--checkpoint", gpt, "--input", str(text), "--device", "cuda"), "no GPU"
    )
    started = time.monotonic()
    one_line_error(nlm("serve", gpt, "--device", "cuda", "--port", "1"), "no GPU")
    assert time.monotonic() - started < 60  # refused before Ray starts, never a hang
    one_line_error(nlm("serve", gpt, "--device", "cuda", "--replica-gpus", "0"), "--replica-gpus 0")


def test_cli_generate_and_eval_run_on_the_chosen_device_and_dtype(paths, tmp_path):
    gpt = str(paths["gpt"])
    args = ["--prompt", "the game", "--max-tokens", "5", "--temperature", "0", "--json"]
    plain = nlm("generate", "--checkpoint", gpt, *args)
    cpu = nlm("generate", "--checkpoint", gpt, *args, "--device", "cpu")
    assert plain.returncode == cpu.returncode == 0, plain.stderr + cpu.stderr
    assert json.loads(plain.stdout) == json.loads(cpu.stdout)
    bf16 = nlm("generate", "--checkpoint", gpt, *args, "--dtype", "bfloat16")
    assert bf16.returncode == 0, bf16.stderr
    assert len(json.loads(bf16.stdout)["ids"]) == 5
    text = tmp_path / "t.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    scored = nlm("eval", "--checkpoint", gpt, "--input", str(text), "--no-progress",
                 "--device", "cpu", "--dtype", "bfloat16")  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["dtype"] == "bfloat16" and result["ppl"] > 1


# ---------------------------------------------------------------- Serve options


def built_deployments(app_args: dict) -> dict:
    """The deployments Serve would run for these application args (Ray's own builder)."""
    from ray.serve._private.build_app import build_app as build_serve_app

    from nlm.serve.app import build_app

    built = build_serve_app(build_app(app_args), name="nlm")
    return {d.name: d for d in built.deployments}


def test_deployments_carry_num_gpus_when_asked(paths):
    checkpoints = [str(paths["gpt"]), str(paths["bert"])]
    cpu = built_deployments({"checkpoints": checkpoints, "num_cpus": 0.25})
    for name in ("gpt", "bert"):
        assert not cpu[name].ray_actor_options.get("num_gpus")
        assert cpu[name].init_kwargs == {"device": "cpu", "dtype": "float32"}

    gpu = built_deployments(
        {"checkpoints": checkpoints, "num_cpus": 0.25, "device": "cuda", "dtype": "bfloat16",
         "num_gpus": 0.25}
    )  # fmt: skip
    for name in ("gpt", "bert"):
        assert gpu[name].ray_actor_options["num_gpus"] == 0.25
        assert gpu[name].ray_actor_options["num_cpus"] == 0.25
        assert gpu[name].init_kwargs == {"device": "cuda", "dtype": "bfloat16"}
    assert not gpu["Gateway"].ray_actor_options.get("num_gpus")
    whole = built_deployments({"checkpoints": checkpoints[:1], "device": "cuda"})
    assert whole["gpt"].ray_actor_options["num_gpus"] == 1.0  # cuda: a whole GPU by default
    with pytest.raises(NLMError, match="field 'num_gpus'"):
        built_deployments({"checkpoints": checkpoints, "device": "cuda", "num_gpus": 0})
    with pytest.raises(NLMError, match="field 'device'"):
        built_deployments({"checkpoints": checkpoints, "device": "gpu"})


def test_config_yaml_puts_generation_on_gpus_with_auto_devices():
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    )
    (app,) = config.applications
    assert app.args["device"] == "auto" and app.args["dtype"] in ("bfloat16", "float16")
    gpus = {d.name: getattr(d.ray_actor_options, "num_gpus", None) or 0 for d in app.deployments}
    assert 0 < gpus["gpt-small"] <= 1 and gpus["Gateway"] == 0


def test_gpu_requests_the_cluster_cannot_place_are_refused():
    from nlm.serve.placement import check_placeable

    check_placeable([0.25] * 4, 1)
    check_placeable([0.6, 0.6], 2)
    check_placeable([1.0, 0.5, 0.5], 2)
    check_placeable([0.0] * 9, 0)
    for requests, gpus in (([0.25] * 5, 1), ([0.6, 0.6], 1), ([1.0], 0), ([2.0], 1)):
        with pytest.raises(NLMError, match="but the cluster has"):
            check_placeable(requests, gpus)


def test_a_replica_without_a_gpu_runs_auto_on_the_cpu_in_float32(ray_local):
    """What a Serve replica decides, run where Ray decides it: inside a worker Ray gave no GPU."""
    from nlm.serve.placement import replica_placement

    @ray_local.remote(num_cpus=0.25, num_gpus=0)
    def decide(device: str, dtype: str):
        try:
            return replica_placement(device, dtype)
        except RuntimeError as exc:
            return str(exc)

    assert ray_local.get(decide.remote("auto", "bfloat16")) == ("cpu", "float32")
    assert ray_local.get(decide.remote("cpu", "bfloat16")) == ("cpu", "bfloat16")
    refused = ray_local.get(decide.remote("cuda", "bfloat16"))
    assert "given no GPU" in refused and "num_gpus" in refused
