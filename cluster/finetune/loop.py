"""`nlm finetune` on Ray Train + DeepSpeed: the driver (`finetune`) and the per-worker loop.

Driver, `finetune(config) -> summary`:
1. `nlm.finetune.plan.plan_finetune` checks everything (both JSONL files, the label map, the
   checkpoint, the sizes) and encodes the examples, before Ray starts.
2. The payload (encoded rows, initial weights) goes into the object store once. Fine-tuning sets
   are small, so each worker keeps its share in memory (an interleaved, equal share: every rank
   runs the same number of steps) instead of streaming it through Ray Data as pretraining does.
3. A TorchTrainer runs `finetune_worker` on every rank, through the pretraining driver's own
   pieces (nlm.cluster.train.driver: `torch_trainer`, `fit`, `follow_progress`).

Worker: `FinetuneWorker` is fine-tuning's `TrainingLoop` (nlm.cluster.train.base_loop, the loop
pretraining uses): the same engine set-up, optimizer, schedule and step. Its hooks: batches
shuffled every epoch and grouped by length (less padding); the task loss (plus λ times the LM
loss for gpt); evaluation every `eval_every` steps on the eval rows (windows; B/M/E/S tags
Viterbi-decoded per window, other tags by argmax), summed over ranks; at the end rank 0
consolidates the weights, scores the eval file example by example with the exported model
(nlm.finetune.predict: whole sequences, Viterbi-decoded B/M/E/S), writes RUN/model, reloads it
and checks that it gives the engine's logits.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nlm.cluster.train.base_loop import Interval, TrainingLoop
from nlm.cluster.train.distributed import all_reduce_sum, barrier, seed_everything
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
    from nlm.cluster.train.driver import fit, resolve_device, torch_trainer, worker_resources

    plan, payload = plan_finetune(config)
    config = plan.finetune
    ensure_ray()
    plan.device = resolve_device(config.scale)
    worker = worker_resources(config.scale, plan.device)
    workers = config.scale.workers
    check_resources([worker] * workers, what=f"{workers} fine-tuning workers")

    run_dir = Path(plan.run_dir)
    if config.overwrite:
        for name in ("metrics.jsonl", "tb", "model", RUN_NAME):
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                missing_ok=True
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save_yaml(run_dir / "config.yaml")
    _write_text(run_dir / "plan.json", json.dumps(plan.to_dict(), indent=2) + "\n")

    trainer = torch_trainer(
        finetune_worker,
        {"plan": plan.to_dict(), "payload": ray.put(payload)},
        device=plan.device,
        workers=workers,
        worker=worker,
        name=RUN_NAME,
        storage=plan.run_dir,
        # No mid-run checkpoints (fine-tuning runs are short): a failure fails the run.
        max_failures=0,
    )
    follow = functools.partial(_follow, run_dir, plan) if progress else None
    return fit(trainer, run_dir, what="fine-tuning", follow=follow)


def _follow(run_dir: Path, plan: FinetunePlan, thread: Any) -> None:
    from nlm.cluster.train.driver import follow_progress

    def show(bar: Any, record: dict[str, Any]) -> None:
        if "loss" in record:
            bar.n = record["step"]
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        elif "eval_loss" in record:
            shown = {k: record[k] for k in ("eval_accuracy", "eval_span_f1") if k in record}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})

    desc = f"finetune {plan.family} {plan.task}"
    follow_progress(run_dir, thread, total=plan.max_steps, desc=desc, show=show)


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
    worker_class = Seq2SeqWorker if plan.task == "seq2seq" else FinetuneWorker
    worker = worker_class(
        plan,
        payload,
        context.get_world_rank(),
        context.get_world_size(),
        context.get_local_world_size(),
        device,
    )
    worker.run()


class FinetuneWorker(TrainingLoop):
    """One rank's fine-tuning: the task model on the engine, its share of the rows in memory."""

    what = "fine-tuning"

    def __init__(
        self,
        plan: FinetunePlan,
        payload: dict[str, Any],
        rank: int,
        world_size: int,
        local_world_size: int,
        device: torch.device,
    ) -> None:
        config = plan.finetune
        super().__init__(
            config,
            max_steps=plan.max_steps,
            eval_every=plan.eval_every,
            rank=rank,
            world_size=world_size,
            local_world_size=local_world_size,
            device=device,
            run_dir=plan.run_dir,
        )
        self.plan, self.payload = plan, payload
        seed_everything(config.seed + 1000 * (rank + 1))  # dropout differs per rank
        self.start_engine(self.build_model(payload["state"]))
        share = len(payload["train"]) // world_size  # equal shares: equal step counts
        self.train_rows = payload["train"][rank::world_size][:share]
        self.examples = 0  # training rows seen, all ranks

    def build_model(self, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """The model this worker trains (the task model: backbone and head), from `state`."""
        return build_task_model(self.plan, state)

    def forward(
        self,
        module: Any,
        batch: dict[str, torch.Tensor],
        labels: bool = True,
        device: torch.device | None = None,
    ) -> Any:
        """`module` on `batch` moved to `device` (default: this rank's)."""
        device = device or self.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return module(
            batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            labels=batch["labels"] if labels else None,
        )

    # -- the loop's hooks ----------------------------------------------------------------

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

    def log_start(self) -> None:
        plan = self.plan
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

    def train_forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = self.forward(self.engine, batch)
        accum = self.config.grad_accum
        parts = {
            "loss": out.loss.item() / accum,
            "task_loss": out.task_loss.item() / accum,
            "lm_loss": out.lm_loss.item() / accum if out.lm_loss is not None else 0.0,
            "rows": batch["input_ids"].size(0),
        }
        return out.loss, parts

    def interval_record(self, sums: dict[str, Any], interval: Interval, lr: float) -> dict:
        elapsed, steps = interval.elapsed, interval.steps
        keys = ("loss", "task_loss", "lm_loss")
        means = all_reduce_sum([sums[k] / steps for k in keys] + [sums["rows"]], self.device)
        rows = int(means.pop())
        self.examples += rows
        record = {"step": self.step, "epoch": round(self.step / self.plan.steps_per_epoch, 3)}
        record.update({k: round(v / self.world_size, 5) for k, v in zip(keys, means, strict=True)})
        if not self.config.lm_weight:
            record.pop("lm_loss")
        record.update(
            {
                "lr": lr,
                "rows_per_s": round(rows / elapsed, 1),
                "step_ms": round(1000 * elapsed / steps, 1),
            }
        )
        return record

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
        summed = all_reduce_sum([counts[k] for k in keys] + [loss_sum, labelled], self.device)
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
        state = self.consolidated_state()
        probe = collate(self.payload["eval"][:4], module.pad_left)
        self.engine.eval()
        with torch.no_grad():
            engine_logits = self.forward(self.engine, probe, labels=False).logits.float()
        final: dict[str, Any] = {}
        if self.rank == 0:
            model = self.build_model(state).eval()
            # Compare in the engine's precision (bf16 on GPU): the weights are what is checked.
            twin = copy.deepcopy(model).to(self.device, dtype=self.engine_dtype())
            with torch.no_grad():
                diff = self.check_export(
                    self.forward(twin, probe, labels=False).logits, engine_logits
                )
            del twin
            model = model.to(self.device)
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
            model = model.cpu()
            save_task_checkpoint(
                Path(plan.run_dir) / "model",
                model,
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
            # What a reader loads is what was checked (fp32, on the CPU).
            reloaded = load_task_checkpoint(Path(plan.run_dir) / "model")
            reloaded.model.eval()
            if reloaded.labels != plan.labels:
                raise RuntimeError(f"label map changed on save: {reloaded.labels} != {plan.labels}")
            cpu = torch.device("cpu")
            with torch.no_grad():
                again = self.forward(reloaded.model, probe, labels=False, device=cpu).logits
                saved = self.forward(model, probe, labels=False, device=cpu).logits
            if not torch.equal(again, saved):
                raise RuntimeError("the saved checkpoint does not reproduce the exported logits")
        barrier(self.device)
        return final


class Seq2SeqWorker(FinetuneWorker):
    """--task seq2seq: the encoder-decoder itself on log p(target | source), no head
    (nlm/finetune/seq2seq.py); exported as a plain checkpoint that `nlm serve` generates from."""

    def build_model(self, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        from nlm.models import model_class

        cls = model_class(self.plan.family)
        model = cls(cls.config_class.from_dict(self.plan.model_config))
        if state is not None:
            model.load_state_dict(state)
        return model

    def forward(self, module: Any, batch: dict[str, torch.Tensor], labels: bool = True,
                device: torch.device | None = None) -> Any:  # fmt: skip
        device = device or self.device
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return module(
            batch["input_ids"],
            targets=batch["targets"],
            attention_mask=batch["attention_mask"],
        )

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        from nlm.finetune.seq2seq import collate_seq2seq

        epoch, size = 0, self.config.micro_batch
        while True:
            generator = torch.Generator().manual_seed(
                self.config.seed * 1009 + epoch * 31 + self.rank
            )
            order = torch.randperm(len(self.train_rows), generator=generator).tolist()
            for start in range(0, len(order), size):
                yield collate_seq2seq([self.train_rows[i] for i in order[start : start + size]])
            epoch += 1

    def train_forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        out = self.forward(self.engine, batch)
        accum = self.config.grad_accum
        parts = {
            "loss": out.loss.item() / accum,
            "task_loss": out.loss.item() / accum,
            "lm_loss": 0.0,
            "rows": batch["input_ids"].size(0),
        }
        return out.loss, parts

    def evaluate(self) -> dict[str, Any]:
        """eval_loss (mean target-token NLL) and eval_ppl over the eval rows, all ranks."""
        from nlm.finetune.seq2seq import collate_seq2seq

        rows = self.payload["eval"]
        share = rows[self.rank :: self.world_size]
        size = self.config.micro_batch
        n_batches = math.ceil(math.ceil(len(rows) / self.world_size) / size)
        loss_sum = tokens = 0.0
        self.engine.eval()
        with torch.no_grad():
            for b in range(n_batches):
                part = share[b * size : (b + 1) * size]
                batch = collate_seq2seq(part or rows[:1])
                out = self.forward(self.engine, batch)  # every rank: ZeRO-3's are collective
                if part:
                    n = int((batch["targets"] != IGNORE_INDEX).sum())
                    loss_sum += float(out.loss) * n
                    tokens += n
        self.engine.train()
        loss_sum, tokens = all_reduce_sum([loss_sum, tokens], self.device)
        loss = loss_sum / max(1.0, tokens)
        return {"eval_loss": round(loss, 5), "eval_ppl": round(math.exp(min(loss, 50.0)), 5)}

    def export(self) -> dict[str, Any]:
        """RUN/model (rank 0): the consolidated model as a plain checkpoint, checked against the
        engine and reloaded."""
        from nlm.checkpoint import load_checkpoint, save_checkpoint
        from nlm.finetune.seq2seq import collate_seq2seq
        from nlm.tokenizers import load_tokenizer

        plan = self.plan
        state = self.consolidated_state()
        probe = collate_seq2seq(self.payload["eval"][:4])
        self.engine.eval()
        with torch.no_grad():
            engine_logits = self.forward(self.engine, probe).logits.float()
        final: dict[str, Any] = {}
        if self.rank == 0:
            model = self.build_model(state).eval()
            twin = copy.deepcopy(model).to(self.device, dtype=self.engine_dtype())
            with torch.no_grad():
                diff = self.check_export(self.forward(twin, probe).logits, engine_logits)
            del twin
            final = {
                "step": self.step,
                **{k: v for k, v in self.last_eval.items() if k != "step"},
                "examples_seen": self.examples,
                "params": plan.num_params,
                "export_max_abs_logit_diff": diff,
            }
            path = save_checkpoint(
                Path(plan.run_dir) / "model",
                model,
                load_tokenizer(plan.tokenizer_dir),
                metrics=final,
                extra={"finetune": {"task": "seq2seq", "base_checkpoint": self.config.checkpoint,
                                    "train": self.config.train, "steps": self.step}},
            )  # fmt: skip
            cpu = torch.device("cpu")
            with torch.no_grad():
                again = self.forward(load_checkpoint(path).model.eval(), probe, device=cpu).logits
                saved = self.forward(model, probe, device=cpu).logits
            if not torch.equal(again, saved):
                raise RuntimeError("the saved checkpoint does not reproduce the exported logits")
        barrier(self.device)
        return final


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + float(value)


def _write_text(path: Path, text: str) -> None:
    from nlm.files import write_text

    write_text(path, text)
