"""`nlm finetune` on Ray Train + DeepSpeed: the driver (`finetune`) and the per-worker loop.

Driver, `finetune(config) -> summary`:
1. `nlm.finetune.plan.plan_finetune` checks everything (both JSONL files, the label map, the
   checkpoint, the sizes) and encodes the examples, before Ray starts.
2. The payload (encoded rows, initial weights) goes into the object store once. Fine-tuning sets
   are small, so each worker keeps its share in memory (an interleaved, equal share: every rank
   runs the same number of steps) instead of streaming it through Ray Data as pretraining does.
3. A TorchTrainer runs `finetune_worker` on every rank (gloo on CPU, nccl on GPUs); the driver
   draws a progress bar from RUN/metrics.jsonl meanwhile.

Worker: the pretraining loop's own pieces (train_loop.make_optimizer and lr_at, the DeepSpeed
config, MetricsLog): `deepspeed.initialize` on the task model, `engine.backward`, `engine.step`.
Batches are shuffled every epoch and grouped by length (less padding). Evaluation runs every
`eval_every` steps on the eval rows (windows; B/M/E/S tags Viterbi-decoded per window, other
tags by argmax), summed over ranks. At the end rank 0
consolidates the weights, scores the eval file example by example with the exported model
(nlm.finetune.predict: whole sequences, Viterbi-decoded B/M/E/S), writes RUN/model, reloads it
and checks that it gives the engine's logits.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nlm.cluster.train.config import TrainConfig
from nlm.cluster.train.deepspeed_config import deepspeed_config
from nlm.cluster.train.loop import (
    _all_reduce_sum,
    _cpus,
    _gathered,
    _seed_everything,
    lr_at,
    make_optimizer,
)
from nlm.cluster.train.metrics import MetricsLog, read_metrics
from nlm.errors import NLMError
from nlm.finetune.config import FinetuneConfig
from nlm.finetune.cws import viterbi_bmes
from nlm.finetune.data import collate
from nlm.finetune.metrics import (
    classification_counts,
    classification_metrics,
    tagging_counts,
    tagging_metrics,
)
from nlm.finetune.plan import FinetunePlan, build_task_model, plan_finetune
from nlm.models import IGNORE_INDEX

RUN_NAME = "finetune"  # Ray Train's run directory under RUN/


# --- the driver --------------------------------------------------------------------------------


def finetune(config: FinetuneConfig, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune per `config`; returns the final metrics (also in RUN/model/metrics.json)."""
    import shutil

    import ray

    from nlm.cluster.launch import check_resources, ensure_ray
    from nlm.cluster.train.driver import _user_error, resolve_device

    plan, payload = plan_finetune(config)
    config = plan.finetune
    ensure_ray()
    plan.device = resolve_device(config)  # type: ignore[arg-type]  (reads .device, .workers)
    worker = {"CPU": config.cpus_per_worker, **({"GPU": 1.0} if plan.device == "cuda" else {})}
    check_resources([worker] * config.workers, what=f"{config.workers} fine-tuning workers")

    run_dir = Path(plan.run_dir)
    if config.overwrite:
        for name in ("metrics.jsonl", "tb", "model", RUN_NAME):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_text(run_dir / "config.yaml", _yaml(config.to_dict()))
    _write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")

    trainer = make_trainer(plan, worker, ray.put(payload))
    error: list[BaseException] = []

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the calling thread
            error.append(exc)

    thread = threading.Thread(target=fit, name="nlm-finetune-fit", daemon=True)
    thread.start()
    _follow(run_dir, plan, thread, progress)
    thread.join()
    if error:
        raise _user_error(error[0]) or error[0]
    metrics_path = run_dir / "model" / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(
            f"{run_dir}: fine-tuning finished but wrote no model/ (see the Ray logs)"
        )
    summary = json.loads(metrics_path.read_text(encoding="utf-8"))
    return {**summary, "run": str(run_dir), "model_dir": str(run_dir / "model")}


def make_trainer(plan: FinetunePlan, worker: dict[str, float], payload_ref: Any) -> Any:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = plan.device == "cuda"
    return TorchTrainer(
        finetune_worker,
        train_loop_config={"plan": plan.to_dict(), "payload": payload_ref},
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=plan.finetune.workers, use_gpu=cuda, resources_per_worker=worker
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=plan.run_dir,
            # No mid-run checkpoints (fine-tuning runs are short): a failure fails the run.
            failure_config=ray.train.FailureConfig(max_failures=0),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cuda else "cpu"}},
        ),
    )


def _follow(run_dir: Path, plan: FinetunePlan, thread: threading.Thread, enabled: bool) -> None:
    if not enabled:
        return
    from tqdm import tqdm

    bar = tqdm(total=plan.max_steps, desc=f"finetune {plan.family} {plan.task}", unit="step")
    seen = 0
    try:
        while thread.is_alive():
            thread.join(timeout=1.0)
            records = read_metrics(run_dir)
            for record in records[seen:]:
                if "loss" in record:
                    bar.n = record["step"]
                    bar.set_postfix(loss=f"{record['loss']:.3f}")
                elif "eval_loss" in record:
                    shown = {k: record[k] for k in ("eval_accuracy", "eval_span_f1") if k in record}
                    bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})
                bar.refresh()
            seen = len(records)
    finally:
        bar.close()


# --- the worker --------------------------------------------------------------------------------


def finetune_worker(loop_config: dict[str, Any]) -> None:
    """TorchTrainer's train_loop_per_worker."""
    import ray
    import ray.train

    plan = FinetunePlan.from_dict(loop_config["plan"])
    payload = ray.get(loop_config["payload"])
    context = ray.train.get_context()
    if plan.device == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    worker = FinetuneWorker(
        plan,
        payload,
        context.get_world_rank(),
        context.get_world_size(),
        context.get_local_world_size(),
        device,
    )
    worker.train()


def optimizer_config(plan: FinetunePlan) -> TrainConfig:
    """The pretraining loop's TrainConfig, for its optimizer, schedule and DeepSpeed helpers."""
    c = plan.finetune
    return TrainConfig(
        data="-",
        out=plan.run_dir,
        model=plan.family,
        micro_batch=c.micro_batch,
        grad_accum=c.grad_accum,
        max_steps=plan.max_steps,
        optimizer="adamw",
        lr=c.lr,
        min_lr=min(c.min_lr, c.lr),
        warmup_steps=plan.warmup_steps,
        lr_schedule="cosine",
        weight_decay=c.weight_decay,
        betas=[0.9, 0.999],
        grad_clip=c.grad_clip,
        zero_stage=c.zero_stage,
        seed=c.seed,
    )


class FinetuneWorker:
    def __init__(
        self,
        plan: FinetunePlan,
        payload: dict[str, Any],
        rank: int,
        world_size: int,
        local_world_size: int,
        device: torch.device,
    ) -> None:
        import deepspeed

        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
        self.plan, self.payload = plan, payload
        self.config = config = plan.finetune
        self.optim = optimizer_config(plan)
        self.rank, self.world_size, self.device = rank, world_size, device
        torch.set_num_threads(config.torch_threads or max(1, _cpus() // max(1, local_world_size)))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        _seed_everything(config.seed + 1000 * (rank + 1))  # dropout differs per rank
        model = build_task_model(plan, payload["state"])
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=make_optimizer(model, self.optim),
            config=deepspeed_config(self.optim, device.type, world_size),
        )
        self.log = MetricsLog(Path(plan.run_dir) if rank == 0 else None)
        share = len(payload["train"]) // world_size  # equal shares: equal step counts
        self.train_rows = payload["train"][rank::world_size][:share]
        self.step = 0
        self.examples = 0  # training rows seen, all ranks
        self.last_eval: dict[str, Any] = {}

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def forward(self, module: Any, batch: dict[str, torch.Tensor], labels: bool = True) -> Any:
        batch = self.to_device(batch)
        return module(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            labels=batch["labels"] if labels else None,
        )

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Micro-batches, epoch after epoch: shuffled, grouped by length in pools of 50."""
        epoch, size = 0, self.config.micro_batch
        while True:
            generator = torch.Generator().manual_seed(
                self.config.seed * 1009 + epoch * 31 + self.rank
            )
            order = torch.randperm(len(self.train_rows), generator=generator).tolist()
            groups = []
            for start in range(0, len(order), size * 50):
                pool = sorted(
                    order[start : start + size * 50],
                    key=lambda i: len(self.train_rows[i]["input_ids"]),
                )
                groups += [pool[j : j + size] for j in range(0, len(pool), size)]
            for g in torch.randperm(len(groups), generator=generator).tolist():
                yield collate([self.train_rows[i] for i in groups[g]], self.engine.module.pad_left)
            epoch += 1

    def train(self) -> None:
        config, plan = self.config, self.plan
        self.log.write(
            {
                "event": "start",
                "step": 0,
                "world_size": self.world_size,
                "device": str(self.device),
                "params": plan.num_params,
                "max_steps": plan.max_steps,
                "steps_per_epoch": plan.steps_per_epoch,
                "data": plan.data_stats,
                "labels": plan.labels,
            }
        )
        batches = self.batches()
        sums = {"loss": 0.0, "task_loss": 0.0, "lm_loss": 0.0}
        interval_start, interval_steps, interval_rows = time.perf_counter(), 0, 0
        while self.step < plan.max_steps:
            lr = lr_at(self.step, self.optim)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            for _ in range(config.grad_accum):
                batch = next(batches)
                out = self.forward(self.engine, batch)
                self.engine.backward(out.loss)
                self.engine.step()
                sums["loss"] += out.loss.item() / config.grad_accum
                sums["task_loss"] += out.task_loss.item() / config.grad_accum
                if out.lm_loss is not None:
                    sums["lm_loss"] += out.lm_loss.item() / config.grad_accum
                interval_rows += batch["input_ids"].size(0)
            self.step += 1
            interval_steps += 1
            last = self.step == plan.max_steps
            if self.step % config.log_every == 0 or last:
                elapsed = time.perf_counter() - interval_start
                means = _all_reduce_sum(
                    [v / interval_steps for v in sums.values()] + [interval_rows], self.device
                )
                rows = int(means.pop())
                self.examples += rows
                record = {"step": self.step, "epoch": round(self.step / plan.steps_per_epoch, 3)}
                record.update(
                    {k: round(v / self.world_size, 5) for k, v in zip(sums, means, strict=True)}
                )
                if not config.lm_weight:
                    record.pop("lm_loss")
                if not math.isfinite(record["loss"]):
                    raise NLMError(
                        f"fine-tuning diverged: loss is {record['loss']} at step {self.step}; lower --lr"
                    )
                record.update(
                    {
                        "lr": lr,
                        "rows_per_s": round(rows / elapsed, 1),
                        "step_ms": round(1000 * elapsed / interval_steps, 1),
                    }
                )
                self.log.write(record)
                sums = dict.fromkeys(sums, 0.0)
                interval_start, interval_steps, interval_rows = time.perf_counter(), 0, 0
            if self.step % plan.eval_every == 0 or last:
                self.last_eval = {"step": self.step, **self.evaluate()}
                self.log.write(self.last_eval)
                interval_start = time.perf_counter()
        final = self.export()
        self.log.write({"event": "end", **final})
        self.log.close()

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """eval_* metrics over the eval rows (each rank a share), summed across ranks."""
        plan, rows = self.plan, self.payload["eval"]
        share = rows[self.rank :: self.world_size]
        size = self.config.micro_batch
        # Every rank runs the same number of forwards (ZeRO-3's are collective): a rank whose
        # share ran out runs a dummy batch and ignores it.
        n_batches = math.ceil(math.ceil(len(rows) / self.world_size) / size)
        counts: dict[str, float] = {}
        loss_sum = labelled = 0.0
        self.engine.eval()
        with torch.no_grad():
            for b in range(n_batches):
                part = share[b * size : (b + 1) * size]
                batch = collate(part or rows[:1], self.engine.module.pad_left)
                out = self.forward(self.engine, batch)
                if not part:
                    continue
                gold = batch["labels"]
                n = int((gold != IGNORE_INDEX).sum())
                loss_sum += float(out.task_loss) * n
                labelled += n
                _add(counts, self.batch_counts(out.logits.float().cpu(), gold))
        self.engine.train()
        if not counts:  # this rank had no eval rows: the same keys, all zero
            empty = collate(rows[:1], self.engine.module.pad_left)
            counts = {
                k: 0.0
                for k in self.batch_counts(
                    torch.zeros(*empty["labels"].shape, len(plan.labels)), empty["labels"]
                )
            }
        keys = sorted(counts)
        summed = _all_reduce_sum([counts[k] for k in keys] + [loss_sum, labelled], self.device)
        labelled, loss_sum = summed.pop(), summed.pop()
        counts = dict(zip(keys, summed, strict=True))
        result: dict[str, Any] = {"eval_loss": round(loss_sum / max(1.0, labelled), 5)}
        if plan.task == "classify":
            metrics = classification_metrics(counts, len(plan.labels))
        else:
            metrics = tagging_metrics(counts)
        result.update({f"eval_{k}": v for k, v in metrics.items()})
        return result

    def batch_counts(self, logits: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
        labels = self.plan.labels
        if self.plan.task == "classify":
            return classification_counts(gold.tolist(), logits.argmax(-1).tolist(), len(labels))
        gold_seqs, pred_seqs = [], []
        for g, row in zip(gold, logits, strict=True):
            keep = g != IGNORE_INDEX
            scores = row[keep]
            # B/M/E/S windows are decoded as the predictor does (argmax breaks the grammar often)
            if self.plan.scheme == "bmes":
                predicted = viterbi_bmes(scores.log_softmax(-1))
            else:
                predicted = scores.argmax(-1).tolist()
            gold_seqs.append([labels[i] for i in g[keep].tolist()])
            pred_seqs.append([labels[i] for i in predicted])
        return tagging_counts(gold_seqs, pred_seqs, self.plan.scheme or "plain")

    # -- export ----------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """RUN/model (rank 0): consolidated weights, test metrics, checked against the engine."""
        from nlm.finetune.heads import TaskCheckpoint, load_task_checkpoint, save_task_checkpoint
        from nlm.finetune.predict import Predictor, evaluate
        from nlm.tokenizers import load_tokenizer

        plan, module = self.plan, self.engine.module
        state = None
        with _gathered(module, self.config.zero_stage == 3):
            if self.rank == 0:
                state = {
                    k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()
                }
        probe = collate(self.payload["eval"][:4], module.pad_left)
        self.engine.eval()
        with torch.no_grad():
            engine_logits = self.forward(self.engine, probe, labels=False).logits.float()
        final: dict[str, Any] = {}
        if self.rank == 0:
            model = build_task_model(plan, state).to(self.device).eval()
            with torch.no_grad():
                diff = (
                    (self.forward(model, probe, labels=False).logits.float() - engine_logits)
                    .abs()
                    .max()
                    .item()
                )
            tolerance = 1e-4 if self.device.type == "cpu" else 5e-2  # bf16 engine on GPU
            if not diff <= tolerance:
                raise RuntimeError(
                    f"consolidated model's logits differ from the engine's by {diff}"
                )
            tokenizer = load_tokenizer(plan.tokenizer_dir)
            predictor = Predictor(TaskCheckpoint(Path(plan.run_dir), model, tokenizer, {}, {}))
            test = evaluate(
                predictor, self.payload["eval_examples"], set(self.payload["train_words"]) or None
            )
            final = {
                "step": self.step,
                **{k: v for k, v in self.last_eval.items() if k != "step"},
                **{f"test_{k}": v for k, v in test.items()},
                "examples_seen": self.examples,
                "params": plan.num_params,
                "export_max_abs_logit_diff": diff,
            }
            c = self.config
            save_task_checkpoint(
                Path(plan.run_dir) / "model",
                model.cpu(),
                tokenizer,
                metrics=final,
                finetune={
                    "base_checkpoint": c.checkpoint,
                    "from_scratch": c.from_scratch,
                    "max_length": plan.max_length,
                    "train": c.train,
                    "eval": c.eval,
                    "steps": self.step,
                },
            )
            reloaded = load_task_checkpoint(Path(plan.run_dir) / "model", device=self.device)
            if reloaded.labels != plan.labels:
                raise RuntimeError(f"label map changed on save: {reloaded.labels} != {plan.labels}")
            with torch.no_grad():
                again = self.forward(reloaded.model, probe, labels=False).logits.float()
            if not (again - engine_logits).abs().max().item() <= tolerance:
                raise RuntimeError("the saved checkpoint does not reproduce the engine's logits")
        if dist.is_initialized():
            dist.barrier()
        return final


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + float(value)


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _write_text(path: Path, text: str) -> None:
    from nlm.files import write_text

    write_text(path, text)
