"""Training for real: DeepSpeed engines, Ray Train worker groups, checkpoints, a killed worker.

Tiny presets and a few hundred rows of wt2-mini. The loop is exercised twice: without Ray
(LocalSession, one process, the path used to measure GPUs) for every family (elmo and the
transformer also at every ZeRO stage, interrupted and resumed), and under Ray Train (the `ray_local` session) for the distributed behaviour: two workers, ZeRO-3 export,
fault tolerance and --resume.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from nlm.checkpoint import load_checkpoint
from nlm.cluster.train.config import TrainConfig
from nlm.cluster.train.metrics import read_metrics
from nlm.cluster.train.plan import list_checkpoints, plan_run
from nlm.errors import NLMError

from train_shards import corpus_lines, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_mirror) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shards")
    lines = corpus_lines(data_mirror, 400)
    return {
        "clm": write_shards(root / "clm", lines, seq_len=16),
        "mlm": write_shards(root / "mlm", lines, objective="mlm", seq_len=32),
        "span": write_shards(root / "span", lines, objective="span", seq_len=32),
    }


def tiny(shards: dict[str, Path], out: Path, model: str, **changes) -> TrainConfig:
    fields = dict(
        data=str(shards[{"bert": "mlm", "transformer": "span"}.get(model, "clm")]),
        model=model,
        preset="tiny",
        out=str(out),
        workers=1,
        micro_batch=8,
        max_steps=12,
        warmup_steps=2,
        lr=3e-3,
        eval_every=6,
        log_every=3,
        eval_rows=64,
    )
    fields.update(changes)
    return TrainConfig.from_dict(fields)


# --- without Ray: one process, every family ---------------------------------------------------


@pytest.mark.parametrize(
    ("model", "stage", "optimizer"),
    [
        ("fnn", 0, "adamw"),
        ("rnn", 1, "sgd"),
        ("lstm", 2, "sgd"),
        ("gpt", 1, "adamw"),
        ("bert", 2, "adamw"),
        ("elmo", 3, "adamw"),
        ("transformer", 3, "adamw"),
    ],
)
def test_every_family_trains_and_exports(
    process_group, shards, data_mirror, tmp_path, model, stage, optimizer
):
    from nlm.cluster.train.loop import LocalSession, run_worker

    lr = 1.0 if optimizer == "sgd" else 3e-3
    l2 = 1e-4 if optimizer == "sgd" else 0.0  # the notes' eq. 6-4 penalty, through the loop
    cfg = tiny(shards, tmp_path / model, model, zero_stage=stage, optimizer=optimizer, lr=lr,
               grad_clip=0.5, l2=l2)  # fmt: skip
    plan = plan_run(cfg)
    trainer = run_worker(plan, LocalSession(plan))
    if optimizer == "sgd":  # matrices penalised, biases not, in the engine's optimizer
        decays = [g["weight_decay"] for g in trainer.engine.optimizer.param_groups]
        assert decays == [l2, 0.0]

    losses = [r["loss"] for r in read_metrics(cfg.out) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert trainer.final["step"] == 12 and math_finite(trainer.final["val_loss"])
    if model == "bert":
        assert 0 <= trainer.final["val_mlm_acc"] <= 1 and "val_nsp_acc" in trainer.final
    if model == "elmo":  # the loss is the mean of the two directions' NLL
        final = trainer.final
        both = (final["val_forward_loss"] + final["val_backward_loss"]) / 2
        assert abs(both - final["val_loss"]) < 1e-4 and final["val_backward_ppl"] > 1
    # the serving checkpoint loads and is the trained model
    exported = load_checkpoint(cfg.out)
    if model == "transformer":  # nlm eval: perplexity of the span-corruption targets
        from nlm.evaluation import evaluate_documents

        lines = corpus_lines(data_mirror, 40)[-8:]
        scored = evaluate_documents(exported.model, exported.tokenizer, lines, seq_len=32)
        assert scored["ppl_kind"] == "span" and 1 < scored["ppl"] < plan.vocab_size
        assert scored["tokens"] > 0 and scored["bits_per_byte"] is None
        # the sentinels are the exported tokenizer's own last tokens (issue 18)
        assert (exported.path / "tokenizer" / "sentinels.json").is_file()
        assert exported.tokenizer.vocab_size == exported.model.config.vocab_size
        assert exported.tokenizer.id_to_token(exported.tokenizer.first_sentinel) == "<extra_id_0>"
    assert exported.family == model and exported.metrics["val_ppl"] == trainer.final["val_ppl"]
    assert trainer.final["export_max_abs_logit_diff"] <= 1e-5
    assert (Path(cfg.out) / "config.yaml").exists() is False  # written by the driver, not here
    assert list((Path(cfg.out) / "tb").iterdir())  # TensorBoard events


class _Killed(Exception):
    """Raised from inside the loop: the rank dies between two checkpoints."""


@pytest.mark.parametrize("stage", [0, 1, 2])  # ZeRO-3: test_every_family_trains_and_exports
@pytest.mark.parametrize("model", ["elmo", "transformer"])
def test_interrupted_run_resumes_where_its_checkpoint_left(
    process_group, shards, tmp_path, model, stage
):
    """A run that dies after step 5 resumes (--resume, one process, no Ray) from its step-3
    checkpoint with the same data position (elmo's clm windows, the transformer's span rows),
    optimizer state (ZeRO 0-2) and RNG (dropout on), so the replayed steps' losses and the
    step-5 evaluation (elmo: each direction's) equal the first attempt's."""
    from nlm.cluster.train.loop import LocalSession, Trainer, run_worker

    class DiesAtStep6(Trainer):
        def after_step(self) -> None:
            super().after_step()
            if self.step == 6:  # steps 4 and 5 are logged, the step-3 checkpoint is the last
                raise _Killed

    cfg = tiny(shards, tmp_path / model, model, zero_stage=stage, max_steps=6, log_every=1,
               checkpoint_every=3, eval_every=5, eval_rows=16,
               model_overrides={"dropout": 0.2})  # fmt: skip
    plan = plan_run(cfg)
    with pytest.raises(_Killed):
        DiesAtStep6(plan, LocalSession(plan)).run()
    assert [c["step"] for c in list_checkpoints(cfg.out)] == [3]
    assert not (Path(cfg.out) / "model").exists()

    plan = plan_run(cfg.replace(resume=True))
    trainer = run_worker(plan, LocalSession(plan))
    records = read_metrics(cfg.out, every_attempt=True)
    starts = [i for i, r in enumerate(records) if r.get("event") == "start"]
    assert len(starts) == 2 and records[starts[1]]["resumed_from_step"] == 3
    first, again = records[: starts[1]], records[starts[1] :]

    def losses(rows: list[dict]) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert sorted(losses(first)) == [1, 2, 3, 4, 5] and sorted(losses(again)) == [4, 5, 6]
    for step in (4, 5):  # 4: the data position and weights; 5: also the optimizer's state
        assert losses(again)[step] == pytest.approx(losses(first)[step], rel=1e-4), step
    (eval_first,) = [r for r in first if "val_loss" in r]
    eval_again = next(r for r in again if "val_loss" in r)
    assert eval_first["step"] == eval_again["step"] == 5
    keys = sorted(k for k in eval_first if k.startswith("val_"))
    if model == "elmo":
        assert {"val_forward_loss", "val_backward_loss"} <= set(keys)
    for key in keys:
        assert eval_again[key] == pytest.approx(eval_first[key], rel=1e-4), key
    assert trainer.final["step"] == 6 and load_checkpoint(cfg.out).metrics["step"] == 6


def test_zero3_export_gives_the_engines_logits(process_group, shards, tmp_path):
    """ZeRO-3 partitions every parameter; the export gathers them whole."""
    from nlm.cluster.train.loop import LocalSession, run_worker

    cfg = tiny(
        shards, tmp_path / "z3", "gpt", zero_stage=3, max_steps=3, eval_every=3, eval_rows=16
    )
    plan = plan_run(cfg)
    trainer = run_worker(plan, LocalSession(plan))
    engine = trainer.engine
    assert all(hasattr(p, "ds_id") for p in engine.module.parameters())  # ZeRO-3 owns them

    ids = torch.randint(7, plan.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    engine.eval()
    with torch.no_grad():
        expected = engine(ids).logits
    model = load_checkpoint(cfg.out).model
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and it has really trained: not the initial weights
    fresh = trainer.build_model()
    assert not torch.allclose(fresh(ids).logits, got)


@pytest.mark.parametrize("stage", [0, 2, 3])  # ZeRO-1 steps through ZeRO-2's optimizer class
def test_sgd_l2_step_under_deepspeed(process_group, stage):
    """`--optimizer sgd --l2 eps` through deepspeed.initialize (the client optimizer nlm passes
    it) and ZeRO's flattened param groups: one step is still the notes' eq. 6-4 on the weight
    matrix, W <- W - lr (dL/dW + eps W), and eq. 6-5 (no penalty) on the bias."""
    import deepspeed

    from nlm.cluster.train.deepspeed_config import deepspeed_config
    from nlm.optim import make_optimizer

    lr, eps = 0.1, 0.5
    cfg = TrainConfig.from_dict(dict(micro_batch=1, zero_stage=stage, optimizer="sgd", lr=lr,
                                     l2=eps, grad_clip=0.0))  # fmt: skip
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -1.0]]))
        layer.bias.copy_(torch.tensor([0.2]))
    engine, *_ = deepspeed.initialize(
        model=layer,
        optimizer=make_optimizer(layer, cfg.optim.check()),
        config=deepspeed_config(cfg, "cpu", world_size=1),
    )
    loss = engine(torch.tensor([[1.0, 2.0]])).sum()  # dL/dW = (1, 2), dL/db = 1
    engine.backward(loss)
    engine.step()
    with deepspeed.zero.GatheredParameters(list(layer.parameters()), enabled=stage == 3):
        weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    # W = (0.5, -1) - 0.1 ((1, 2) + 0.5 (0.5, -1)) = (0.375, -1.15); b = 0.2 - 0.1 = 0.1
    torch.testing.assert_close(weight, torch.tensor([[0.375, -1.15]]))
    torch.testing.assert_close(bias, torch.tensor([0.1]))
    engine.destroy()


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


# --- under Ray Train ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"workers": 3, "cpus_per_worker": 2.0},  # 6 CPUs on a 4-CPU cluster
        {"workers": 2, "worker_resources": {"trainer": 1}},  # a label no node has
    ],
)
def test_unplaceable_workers_fail_before_starting(ray_local, shards, tmp_path, changes):
    from nlm.cluster.train.driver import train

    cfg = tiny(shards, tmp_path / "big", "gpt", micro_batch=4, placement_timeout_s=2.0, **changes)
    started = time.monotonic()
    with pytest.raises(NLMError, match="cannot place"):
        train(cfg, progress=False)
    assert time.monotonic() - started < 60
    assert not Path(cfg.out).exists()


def test_bert_zero3_on_two_ray_workers(ray_local, shards, tmp_path):
    from nlm.cluster.train.driver import train

    cfg = tiny(shards, tmp_path / "bert", "bert", workers=2, zero_stage=3, max_steps=6,
               eval_every=3, keep_checkpoints=1)  # fmt: skip
    summary = train(cfg, progress=False)
    assert summary["step"] == 6 and summary["export_max_abs_logit_diff"] <= 1e-5
    assert 0 <= summary["val_mlm_acc"] <= 1
    start = [r for r in read_metrics(cfg.out) if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["zero_stage"] == 3
    assert len({w["pid"] for w in start[0]["workers"]}) == 2  # two processes
    kept = list_checkpoints(cfg.out)
    assert [c["step"] for c in kept] == [6]  # the last K=1
    ranks = sorted(p.name for p in Path(kept[0]["path"]).glob("rank_*.pt"))
    assert ranks == ["rank_00000.pt", "rank_00001.pt"]  # both ranks' state, merged by Ray
    assert TrainConfig.load_yaml(Path(cfg.out) / "config.yaml").scale.zero_stage == 3


def test_killed_worker_restarts_from_checkpoint_then_resume(ray_local, shards, tmp_path):
    """Kill rank 1 mid-run: Ray restarts the group, it resumes from the last checkpoint with
    the same data position, optimizer state and RNG (so the replayed steps reproduce the first
    attempt's losses) and finishes. Then --resume extends the finished run."""
    from nlm.cluster.train.driver import train

    out = tmp_path / "ft"
    cfg = tiny(shards, out, "lstm", workers=2, zero_stage=2, micro_batch=4, max_steps=150,
               log_every=5, eval_every=75, checkpoint_every=25, max_failures=1,
               optimizer="sgd", lr=1.0, lr_schedule="constant")  # fmt: skip
    result: dict = {}

    def run() -> None:
        try:
            result["summary"] = train(cfg, progress=False)
        except BaseException as exc:  # shown by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def logged_steps() -> list[int]:
        return [r["step"] for r in read_metrics(out) if "loss" in r]

    def committed_step() -> int | None:
        """The latest checkpoint Ray's controller has registered (not merely uploaded: the
        controller collects reports every couple of seconds, and one it has not collected when
        a worker dies is not used for the restart)."""
        snapshot = out / "checkpoints" / "checkpoint_manager_snapshot.json"
        if not snapshot.is_file():
            return None
        latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        return latest["metrics"]["step"] if latest else None

    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and thread.is_alive():
        done = committed_step()
        if done and done < 150 and max(logged_steps()) >= done + 5:
            start = next(r for r in read_metrics(out) if r.get("event") == "start")
            killed = start["workers"][1]["pid"]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.1)
    assert killed is not None, "the run never reached a checkpoint"
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in result, result.get("error")
    assert result["summary"]["step"] == 150

    records = read_metrics(out, every_attempt=True)  # the replayed steps of both attempts
    starts = [r for r in records if r.get("event") == "start"]
    assert len(starts) == 2
    assert {r["attempt"] for r in records} == {1, 2}
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == sorted(
        {r["step"] for r in records if "loss" in r}
    )  # read plainly, each step once
    resumed = starts[1]["resumed_from_step"]
    assert resumed and resumed % 25 == 0 and killed not in [w["pid"] for w in starts[1]["workers"]]
    first = {r["step"]: r["loss"] for r in records[: records.index(starts[1])] if "loss" in r}
    again = {r["step"]: r["loss"] for r in records[records.index(starts[1]) :] if "loss" in r}
    replayed = sorted(set(first) & set(again))
    assert replayed and min(replayed) == resumed + 5
    for step in replayed:  # the loss curve continues exactly where the checkpoint left it
        assert again[step] == pytest.approx(first[step], rel=1e-4), step
    assert max(again) == 150

    # --resume: a new fit on the same storage continues from step 150 to 160
    summary = train(cfg.replace(resume=True, max_steps=160), progress=False)
    assert summary["step"] == 160
    last_start = [r for r in read_metrics(out) if r.get("event") == "start"][-1]
    assert last_start["resumed_from_step"] == 150
    assert load_checkpoint(out).metrics["step"] == 160


# --- without Ray, several ranks: torchrun (how GPUs are measured where Ray is absent) ----------


def test_torchrun_two_ranks_without_ray(shards, tmp_path):
    import subprocess
    import sys

    cfg = tiny(shards, tmp_path / "run", "gpt", zero_stage=2, max_steps=4, eval_every=4,
               log_every=2, checkpoint_every=2, keep_checkpoints=1)  # fmt: skip
    config_file = tmp_path / "gpt.yaml"
    cfg.save_yaml(config_file)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nlm.cluster.train.loop", str(config_file)]  # fmt: skip
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start = next(r for r in read_metrics(cfg.out) if r.get("event") == "start")
    assert start["world_size"] == 2
    assert load_checkpoint(cfg.out).metrics["step"] == 4
    kept = list_checkpoints(cfg.out)
    assert [c["step"] for c in kept] == [4]  # keep_checkpoints=1 pruned step 2
    assert len(list(Path(kept[0]["path"]).glob("rank_*.pt"))) == 2
    assert TrainConfig.load_yaml(Path(cfg.out) / "config.yaml").scale.workers == 2


@pytest.mark.parametrize(
    ("model", "data"),
    [("gpt", "span"), ("elmo", "span"), ("bert", "span"), ("transformer", "clm"),
     ("transformer", "mlm")],
)  # fmt: skip
def test_span_and_clm_shards_are_refused_by_the_other_kind_of_model(
    shards, tmp_path, capsys, model, data
):
    """`nlm train` on shards of another objective: one line naming both, exit 2, nothing
    written (refused by plan_run, before Ray starts)."""
    from nlm.cli import main

    wanted = {"transformer": "span", "bert": "mlm"}.get(model, "clm")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(shards[data]), "--model", model, "--preset", "tiny",
              "--out", str(out), "--no-progress"])  # fmt: skip
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nlm: error: ")
    assert f"prepared for '{data}', but {model} trains on '{wanted}'" in err
    assert not out.exists()


def test_span_shards_from_before_the_sentinel_tokens_are_refused(shards, tmp_path):
    """Old span shard sets kept the sentinels as ids past the tokenizer (issue 18)."""
    import json
    import shutil

    old = tmp_path / "old-span"
    shutil.copytree(shards["span"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["tokenizer"]["sentinels"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny(shards, tmp_path / "run", "transformer", data=str(old))
    with pytest.raises(
        NLMError, match=r"old-span: span shards from before .*nlm prepare --objective span"
    ):
        plan_run(cfg)
    assert not (tmp_path / "run").exists()
