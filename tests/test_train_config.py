"""The training config, data layout and up-front checks: fast, no Ray, no DeepSpeed engine."""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nlm.cluster.train.batches import batches_per_epoch, micro_batches, reset_state
from nlm.cluster.train.config import TrainConfig
from nlm.cluster.train.plan import plan_run
from nlm.errors import NLMError
from nlm.optim import OptimConfig

from train_shards import corpus_lines, write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_mirror) -> Path:
    lines = corpus_lines(data_mirror, 300)
    return write_shards(tmp_path_factory.mktemp("cfg") / "clm", lines, seq_len=16)


def config(shards: Path, tmp_path: Path, **changes) -> TrainConfig:
    fields = dict(
        data=str(shards), model="gpt", preset="tiny", out=str(tmp_path / "run"), workers=2
    )
    fields.update(changes)
    return TrainConfig.from_dict(fields)


# --- config ------------------------------------------------------------------------------------


def test_yaml_round_trip_and_flags_override(tmp_path, shards):
    from nlm.cli.train import add_arguments, resolve_config

    original = config(shards, tmp_path, zero_stage=2, lr=1e-3, model_overrides={"dropout": 0.1})
    path = tmp_path / "c.yaml"
    original.save_yaml(path)
    assert TrainConfig.load_yaml(path) == original

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--zero-stage", "3", "--set", "n_layer=1"])
    resolved = resolve_config(args)
    assert resolved.scale.zero_stage == 3  # the flag wins
    assert resolved.optim.lr == 1e-3  # the file's value stays
    assert resolved.model_overrides == {"dropout": 0.1, "n_layer": 1}


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("workers: two\n", "workers"),
        ("lr: 1e-3\n", "lr"),  # YAML reads 1e-3 (no dot) as a string
        ("zero_stage: 4\n", "zero_stage"),
        ("optimiser: sgd\n", "optimiser"),
        ("model: t5\n", "model"),  # not a registered family
    ],
)
def test_bad_config_names_the_field(tmp_path, shards, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(f"data: {shards}\nout: {tmp_path / 'run'}\n{text}")
    with pytest.raises(NLMError, match=f"'{field}'"):
        TrainConfig.load_yaml(path).check(str(path))


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data: x\nworkers: [1,\n")
    with pytest.raises(NLMError, match=r"broken.yaml:\d+"):
        TrainConfig.load_yaml(path)


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.schedule().at(step)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig.from_dict(dict(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110))
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way: the mean of lr and min_lr
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_warmup_never_takes_more_than_a_fifth_of_the_run():
    cfg = TrainConfig.from_dict(dict(lr=1.0, min_lr=0.0, warmup_steps=100, max_steps=40))
    assert lr_at(7, cfg) == pytest.approx(1.0)  # peak after 40 // 5 = 8 steps
    assert lr_at(20, cfg) > 0.4
    constant = cfg.replace(lr_schedule="constant")
    assert lr_at(100, constant) == 1.0


# --- data layout -------------------------------------------------------------------------------


def clm_chunk(rows: int, width: int = 5, start: int = 0, gap_at: int | None = None):
    pos = torch.arange(start, start + rows)
    if gap_at is not None:
        pos[gap_at:] += 100  # a jump in the packed stream
    ids = pos[:, None] * 10 + torch.arange(width)[None, :]
    return {"input_ids": ids.int(), "stream_pos": pos}


def test_streams_continue_across_batches_and_reset_at_gaps():
    chunk = clm_chunk(24, gap_at=14)
    batches = list(
        micro_batches([chunk], kind="stream", batch_size=3, seed=0, epoch=0, rank=0, shuffle=False)
    )
    assert len(batches) == 8  # 24 rows = 3 streams x 8 windows
    assert batches[0]["reset"].all()  # a new chunk starts new streams
    for k in range(1, 8):
        prev, cur = batches[k - 1]["input_ids"], batches[k]["input_ids"]
        # stream b's window k is the row after its window k-1 ...
        contiguous = cur[:, 0] // 10 == prev[:, 0] // 10 + 1
        # ... except where stream_pos jumps (rows 13 -> 14 sit in stream 1, windows 5 -> 6)
        assert (batches[k]["reset"] == ~contiguous).all()
    assert batches[6]["reset"].tolist() == [False, True, False]


def test_reset_state_zeroes_only_flagged_streams_and_detaches():
    h = torch.ones(2, 3, 4, requires_grad=True) * 2
    c = torch.ones(2, 3, 4) * 3
    out = reset_state((h, c), torch.tensor([False, True, False]))
    assert not out[0].requires_grad
    assert out[0][:, 1].abs().sum() == 0 and out[1][:, 1].abs().sum() == 0
    assert (out[0][:, 0] == 2).all() and (out[1][:, 2] == 3).all()


def test_shuffle_is_reproducible_and_counts_match():
    chunks = [clm_chunk(20), clm_chunk(7, start=20)]

    def ids(seed: int, epoch: int) -> list[list[int]]:
        return [
            b["input_ids"][:, 0].tolist()
            for b in micro_batches(
                chunks, kind="clm", batch_size=4, seed=seed, epoch=epoch, rank=0, shuffle=True
            )
        ]

    assert ids(1, 0) == ids(1, 0)
    assert ids(1, 0) != ids(1, 1)  # a new order every epoch
    assert len(ids(1, 0)) == batches_per_epoch(27, kind="clm", batch_size=4, chunk=20) == 6


# --- checks before any worker starts -----------------------------------------------------------


def test_plan_reads_the_manifest(tmp_path, shards):
    plan = plan_run(config(shards, tmp_path))
    assert plan.objective == "clm" and plan.seq_len == 16
    assert plan.model_config["vocab_size"] == plan.vocab_size
    assert plan.train_rows > 0 and len(plan.train_files) >= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"preset": "huge"}, "huge"),
        ({"model": "bert"}, "mlm"),  # clm shards for an mlm model
        # names the field that bounds the model's positions (its max_positions_field)
        ({"model_overrides": {"block_size": 8}}, r"context of 8 .*\{block_size: 16\}"),
        ({"micro_batch": 10_000}, "fewer than one micro-batch"),
        ({"model_overrides": {"n_lahyer": 2}}, "n_lahyer"),
        ({"resume": True}, "no checkpoint to resume"),
    ],
)
def test_plan_refuses_bad_input(tmp_path, shards, changes, message):
    with pytest.raises(NLMError, match=message):
        plan_run(config(shards, tmp_path, **changes))


def test_plan_refuses_shards_of_another_tokenizer(tmp_path, shards, data_mirror):
    other = write_shards(tmp_path / "other", corpus_lines(data_mirror, 120)[60:], seq_len=16)
    # the manifest of `shards`, the tokenizer of `other`
    import shutil

    shutil.rmtree(shards.parent / "mixed", ignore_errors=True)
    mixed = shutil.copytree(shards, shards.parent / "mixed")
    shutil.rmtree(mixed / "tokenizer")
    shutil.copytree(other / "tokenizer", mixed / "tokenizer")
    with pytest.raises(NLMError, match="fingerprint"):
        plan_run(config(mixed, tmp_path))


def test_plan_refuses_an_existing_run_without_resume(tmp_path, shards):
    cfg = config(shards, tmp_path)
    Path(cfg.out).mkdir()
    (Path(cfg.out) / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(NLMError, match="--resume"):
        plan_run(cfg)


def test_resume_refuses_a_checkpoint_of_another_scale(tmp_path, shards):
    """workers and zero_stage live in the scale section; the resume check still sees them."""
    import json

    cfg = config(shards, tmp_path, resume=True, zero_stage=2)
    step = Path(cfg.out) / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    meta = {"step": 10, "model": "gpt", "preset": "tiny", "workers": 3, "zero_stage": 2}
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(NLMError, match="field 'workers'.*started with 3, this resume asks for 2"):
        plan_run(cfg)
    (step / "meta.json").write_text(json.dumps({**meta, "workers": 2, "zero_stage": 1}))
    with pytest.raises(
        NLMError, match="field 'zero_stage'.*started with 1, this resume asks for 2"
    ):
        plan_run(cfg)


def test_cli_bad_input_is_one_line_exit_2(tmp_path, shards):
    """The real CLI in a subprocess: an unknown preset fails before Ray starts."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "nlm", "train", "--data", str(shards), "--model", "lstm",
           "--preset", "gigantic", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("nlm: error:") and "gigantic" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_shipped_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*-small.yaml")):
        data = yaml.safe_load(path.read_text())
        if "model" not in data:
            continue  # another command's config
        cfg = TrainConfig.from_dict(data, source=str(path)).check(str(path))
        assert math.isfinite(cfg.optim.lr)


def test_deepspeed_config_per_device():
    from nlm.cluster.train.deepspeed_config import deepspeed_config

    cfg = TrainConfig.from_dict(dict(micro_batch=8, grad_accum=4, zero_stage=3, grad_clip=0.5))
    cpu = deepspeed_config(cfg, "cpu", world_size=2)
    assert cpu["train_batch_size"] == 8 * 4 * 2 and not cpu["bf16"]["enabled"]
    assert cpu["zero_optimization"]["stage"] == 3 and cpu["gradient_clipping"] == 0.5
    assert deepspeed_config(cfg, "cuda", world_size=2)["bf16"]["enabled"]  # GPUs train in bf16
    with pytest.raises(NLMError, match="stages 0, 1, 2, 3"):
        deepspeed_config(cfg.replace(zero_stage=4), "cpu", world_size=1)


def test_learning_rate_defaults_follow_family_preset_and_optimizer():
    def resolved(**fields) -> OptimConfig:
        return TrainConfig.from_dict(dict(data="shards", out="run", **fields)).check().optim

    assert (resolved(model="gpt").lr, resolved(model="gpt").min_lr) == (1e-3, 1e-4)
    assert resolved(model="lstm").lr == 3e-3
    assert resolved(model="lstm", optimizer="sgd").lr == 20.0
    assert resolved(model="rnn", optimizer="sgd").lr == 1.0
    assert resolved(model="gpt", preset="base").lr == 6e-4
    assert resolved(model="bert", preset="base").lr == 1e-4
    given = resolved(model="gpt", lr=5e-3)
    assert (given.lr, given.min_lr) == (5e-3, 5e-4)
    assert resolved(model="gpt", lr=5e-3, min_lr=0.0).min_lr == 0.0


def test_resume_of_a_run_recorded_before_a_model_field_existed(tmp_path, shards):
    """An fnn run whose plan.json predates fnn's `combine` / `activation` resumes: it ran with
    their defaults. Asking for another value is still a different run."""
    import json

    from nlm.files import write_json

    cfg = config(shards, tmp_path, model="fnn", workers=1)
    plan = plan_run(cfg.check())
    run = Path(cfg.out)
    run.mkdir()
    plan.train.save_yaml(run / "config.yaml")
    recorded = plan.to_dict()
    assert recorded["model_config"].pop("combine") == "concat"
    assert recorded["model_config"].pop("activation") == "tanh"
    write_json(run / "plan.json", recorded)
    (run / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    step = run / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    meta = {"step": 10, "model": "fnn", "preset": "tiny", "workers": 1, "zero_stage": 1}
    (step / "meta.json").write_text(json.dumps(meta))

    assert plan_run(cfg.replace(resume=True).check()).resume_from["step"] == 10
    other = cfg.replace(resume=True, model_overrides={"combine": "mean"}).check()
    with pytest.raises(NLMError, match=r"field 'model_overrides'.*\{'combine': 'mean'\}"):
        plan_run(other)


def test_sgd_l2_is_a_train_flag_and_an_error_with_adamw(tmp_path, shards):
    from nlm.cli.train import add_arguments, resolve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--data", str(shards), "--out", str(tmp_path / "run"), "--model", "lstm"]
    args = parser.parse_args([*base, "--optimizer", "sgd", "--l2", "1e-4"])
    assert resolve_config(args).optim.l2 == 1e-4
    with pytest.raises(NLMError, match="field 'l2'"):
        resolve_config(parser.parse_args([*base, "--l2", "1e-4"]))  # adamw, the default
