"""The one-shot GPU check's CPU rehearsal: `scripts/gpu_check.sh --dry-run` runs every step of
`nlm bench gpu` (agreement, continuous-batching generation at 1/32/256 rows, four training runs
through torchrun and the LocalSession loop) with tiny sizes, and the path it takes on the GPU
machine never imports Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_prints_one_json_summary(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run", "--work", str(tmp_path / "work"),
         "--output", str(tmp_path / "summary.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True
    assert summary["machine"]["torch"] == torch.__version__
    agreement = summary["agreement"]
    assert agreement["cpu_float32"]["greedy_tokens_identical"] == 1.0
    assert agreement["cpu_float32"]["max_abs_logprob_diff"] == 0.0
    assert agreement["cpu_bfloat16"]["ok"] is True
    runs = summary["generate"]["runs"]
    assert [r["rows"] for r in runs] == [1, 32, 256]
    for run in runs:
        assert run["output_tokens_per_s"] > 0 and run["tpot_ms"] > 0 and run["ttft_ms"] > 0
    names = [t["name"] for t in summary["train"]]
    assert names == ["gpt-tiny-zero2", "bert-tiny-seq16", "gpt-tiny-zero1", "bert-tiny-seq32"]
    for run in summary["train"]:
        assert "error" not in run and "skipped" not in run, run
        assert run["tokens_per_s"] > 0 and run["step_ms"] > 0 and run["final_loss"] > 0
        assert run["mfu"] is None  # a CPU has no MFU peak in the table
        model = tmp_path / "work" / "runs" / run["name"] / "model"
        assert (model / "model.safetensors").is_file()  # the loop ran to its export


def test_the_torchrun_path_never_imports_ray():
    """The lent GPU machine has no Ray: the loop, the local session, inference and the check
    itself must import without it."""
    code = (
        "import sys, nlm.bench.gpu, nlm.cluster.train.loop, nlm.cluster.train.session, "
        "nlm.inference, nlm.device, nlm.cli, nlm.cli.bench, deepspeed\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_check_refuses_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nlm", "bench", "gpu", "--work", str(tmp_path / "w")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("nlm: error: --device cuda: no GPU is visible")
    assert not (tmp_path / "w").exists()  # nothing written before the check
