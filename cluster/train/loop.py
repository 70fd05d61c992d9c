"""The per-worker training loop: shard rows -> DeepSpeed engine -> metrics, checkpoints, export.

One function, `run_worker(plan, session)`, runs on every rank. The session (train_session.py)
says where rows, checkpoints and reports come from:

- `RaySession` inside a Ray Train worker (`train_worker`, the TorchTrainer's loop): rows from
  `ray.train.get_dataset_shard(...).iter_torch_batches`, checkpoints through `ray.train.report`
  / `ray.train.get_checkpoint`. Ray has set up the process group; DeepSpeed joins it.
- `LocalSession` without Ray (`torchrun -m nlm.cluster.train.loop CONFIG.yaml`, or RANK /
  WORLD_SIZE / MASTER_ADDR / MASTER_PORT set by hand; see `main`): rows straight from the
  Parquet files, checkpoints written to RUN/checkpoints. This is how GPU throughput is measured
  where only torch and DeepSpeed are installed; Ray's share of a step is the same as on CPU.

Checkpoints are DeepSpeed's own (sharded per rank, so ZeRO-3 works) plus one small file per
rank with its data position (epoch, micro-batches done), RNG states and recurrent state; a
resumed rank continues exactly where the checkpoint was taken. The run ends by exporting the
serving checkpoint (RUN/model), gathered from the engine and checked against its logits.

A step is `grad_accum` micro-batches; DeepSpeed accumulates and steps the optimizer at the
boundary. The learning rate is a pure function of the step (linear warm-up, then cosine or
constant), set on the optimizer before each step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from nlm.cluster.train.batches import (
    Batch,
    Chunk,
    batches_per_epoch,
    chunk_rows,
    micro_batches,
    reset_state,
    state_to,
)
from nlm.cluster.train.config import TrainConfig
from nlm.cluster.train.deepspeed_config import deepspeed_config
from nlm.cluster.train.metrics import MetricsLog, flops_per_token, peak_flops
from nlm.cluster.train.plan import CHECKPOINT_META, RunPlan, plan_run
from nlm.cluster.train.session import LocalSession, RaySession
from nlm.errors import NLMError

DS_TAG = "ds"  # DeepSpeed's tag inside every checkpoint directory


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine/constant."""
    warmup = effective_warmup(config)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def effective_warmup(config: TrainConfig) -> int:
    """The warm-up, capped at a fifth of the run: the default 100 steps on a `--max-steps 40`
    smoke run would otherwise end it before the learning rate ever reached its peak."""
    return min(config.warmup_steps, config.max_steps // 5)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (nanoGPT's rule), or plain SGD (the classic RNN recipe)."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


# --- the loop ----------------------------------------------------------------------------------


class Trainer:
    """One rank's state: the engine, the data position, the metrics log."""

    def __init__(self, plan: RunPlan, session: RaySession | LocalSession) -> None:
        import deepspeed

        # DeepSpeed's ZeRO-3 calls a collective torch 2.13 deprecates, once per parameter
        # gather: thousands of identical lines per run otherwise.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
        # DeepSpeed JIT-builds its CPU communication op into torch's shared extension cache; a
        # program building it with other flags makes the next run rebuild it (minutes on a
        # busy 2-core machine, seen here). nlm keeps its own copy.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_extensions_dir()))
        self.plan, self.session = plan, session
        self.config = config = plan.train
        self.rank, self.world_size = session.rank, session.world_size
        self.device = session.device()
        self.kind = "mlm" if config.model == "bert" else ("stream" if config.recurrent else "clm")
        self.threads = config.torch_threads or max(1, _cpus() // max(1, session.local_world_size))
        torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

        # Same seed on every rank for the weights; a rank-specific one for dropout/masking.
        _seed_everything(config.seed)
        model = self.build_model()
        if config.init_from:  # resuming overwrites these with the run's own checkpoint
            _load_init_weights(model, config.init_from)
        self.num_params = model.num_parameters()
        self.flops_per_token = flops_per_token(
            config.model, self.num_params, model.config, plan.seq_len
        )
        _seed_everything(config.seed + 1000 * (self.rank + 1))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=make_optimizer(model, config),
            config=deepspeed_config(config, self.device.type, self.world_size),
        )
        if self.world_size == 1 and config.zero_stage == 0:
            # One rank has nothing to average: skip DeepSpeed's per-step flatten / all-reduce /
            # unflatten of every gradient (ZeRO 1-3 need that path to fill their partitions).
            self.engine.enable_backward_allreduce = False
        self.mask_rng = torch.Generator().manual_seed(config.seed + 7919 * (self.rank + 1))
        self.log = MetricsLog(Path(plan.run_dir) if self.rank == 0 else None)

        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.epoch_batches = 0  # micro-batches consumed in the current epoch
        self.tokens = 0  # tokens trained on, all ranks
        self.state: Any = None  # recurrent hidden state carried across windows
        self.val_chunk: Chunk | None = None
        self.resumed_from: int | None = None
        self.rows_per_epoch: int | None = None
        self.final: dict[str, Any] = {}

    def build_model(self) -> torch.nn.Module:
        from nlm.models import model_class

        cls = model_class(self.config.model)
        return cls(cls.config_class.from_dict(self.plan.model_config))

    # -- data ------------------------------------------------------------------------------

    def batches(self) -> Iterator[Batch]:
        """Micro-batches from the current position on, epoch after epoch."""
        config = self.config
        skip = self.epoch_batches
        while True:
            rows_seen = [0]
            produced = 0
            stream = micro_batches(
                self.session.chunks("train", config.rows_per_chunk),
                kind=self.kind,
                batch_size=config.micro_batch,
                seed=config.seed,
                epoch=self.epoch,
                rank=self.rank,
                shuffle=config.shuffle and self.kind != "stream",
                rows_seen=rows_seen,
            )
            for index, batch in enumerate(stream):
                if index < skip:
                    continue  # resuming: these were trained on before the checkpoint
                self.epoch_batches = index + 1
                produced += 1
                yield batch
            if produced == 0 and skip == 0:
                raise NLMError(
                    f"{config.data}: epoch {self.epoch} gave this worker no micro-batch of "
                    f"{config.micro_batch} rows (it read {rows_seen[0]} rows)"
                )
            if self.rows_per_epoch is None and skip == 0:
                self.rows_per_epoch = rows_seen[0]
                self.report_split(rows_seen[0])
            self.epoch += 1
            self.epoch_batches = 0
            self.state = None
            skip = 0

    def report_split(self, rows: int) -> None:
        """Ray's equal split may drop up to workers-1 rows per epoch: count and log them."""
        total = _all_reduce_sum([float(rows)], self.device)[0]
        dropped = self.plan.train_rows - int(total)
        per_epoch = batches_per_epoch(
            rows,
            kind=self.kind,
            batch_size=self.config.micro_batch,
            chunk=self.config.rows_per_chunk,
        )
        unused = rows - per_epoch * self.config.micro_batch
        self.log.write(
            {
                "event": "epoch_rows",
                "step": self.step,
                "rows_per_worker": rows,
                "rows_dropped_by_split": dropped,
                "rows_unused_per_worker": unused,
                "micro_batches_per_epoch": per_epoch,
            }
        )

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- forward ---------------------------------------------------------------------------

    def forward(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """(loss, sums for metrics) of one micro-batch through the engine."""
        from nlm.models import IGNORE_INDEX

        if self.kind == "mlm":
            from nlm.objectives import mask_tokens

            masked, labels = mask_tokens(
                batch["input_ids"],
                self.plan.vocab_size,
                generator=generator,
                mask_prob=self.config.mlm_prob,
            )
            masked, labels = masked.to(self.device), labels.to(self.device)
            rest = self.to_device(
                {k: batch[k] for k in ("token_type_ids", "attention_mask", "nsp_label")}
            )
            out = self.engine(
                masked,
                token_type_ids=rest["token_type_ids"],
                attention_mask=rest["attention_mask"],
                mlm_labels=labels,
                nsp_labels=rest["nsp_label"],
            )
            targets = labels[labels != IGNORE_INDEX]
            mlm_loss = torch.nn.functional.cross_entropy(
                out.logits.float(), targets, reduction="sum"
            )
            nsp = out.nsp_logits.float()
            sums = {
                "mlm_loss": mlm_loss.detach(),
                "mlm_tokens": targets.numel(),
                "mlm_correct": (out.logits.argmax(-1) == targets).sum(),
                "nsp_loss": torch.nn.functional.cross_entropy(
                    nsp, rest["nsp_label"], reduction="sum"
                ).detach(),
                "nsp_correct": (nsp.argmax(-1) == rest["nsp_label"]).sum(),
                "rows": nsp.shape[0],
            }
            return out.loss, sums

        ids = batch["input_ids"].to(self.device, non_blocking=True)
        x, y = ids[:, :-1], ids[:, 1:]
        if self.kind == "stream":
            self.state = reset_state(self.state, batch["reset"].to(self.device))
            out = self.engine(x, targets=y, state=self.state)
            self.state = out.state
        else:
            out = self.engine(x, targets=y)
        return out.loss, {"loss": out.loss.detach() * y.numel(), "tokens": y.numel()}

    # -- train -----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        config = self.config
        self.restore()
        self.log_start()
        tokens_per_step = (
            config.micro_batch * config.grad_accum * self.world_size * self.plan.seq_len
        )
        batches = self.batches()
        progress = _progress(
            self.rank == 0 and isinstance(self.session, LocalSession), self.step, config.max_steps
        )
        # The loss is summed on the device and read at log steps only: `.item()` every step
        # would make the host wait for the GPU each time.
        interval_start, interval_steps = time.perf_counter(), 0
        interval_cpu = time.process_time()  # this process's CPU time (all its threads)
        timed_steps = 0  # steps since the clock started (evaluations restart it)
        loss_sum = torch.zeros((), device=self.device)
        while self.step < config.max_steps:
            lr = lr_at(self.step, config)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            for _ in range(config.grad_accum):
                loss, _ = self.forward(next(batches), self.mask_rng)
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().float() / config.grad_accum
            self.step += 1
            self.tokens += tokens_per_step
            interval_steps += 1
            timed_steps += 1
            last = self.step == config.max_steps

            if self.step % config.log_every == 0 or last:
                elapsed = time.perf_counter() - interval_start
                cpu = time.process_time() - interval_cpu
                mean = loss_sum.item() / interval_steps
                loss = _all_reduce_sum([mean], self.device)[0] / self.world_size
                if not math.isfinite(loss):
                    raise NLMError(
                        f"training diverged: loss is {loss} at step {self.step} (lr {lr:g}); "
                        "lower --lr or set --grad-clip"
                    )
                record = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "loss": round(loss, 5),
                    "lr": lr,
                    "tokens": self.tokens,
                    "tokens_per_s": round(timed_steps * tokens_per_step / elapsed, 1),
                    "step_ms": round(1000 * elapsed / timed_steps, 2),
                    "step_cpu_ms": round(1000 * cpu / timed_steps, 2),  # rank 0's CPU time
                }
                peak = peak_flops(self.device)
                if peak:
                    achieved = record["tokens_per_s"] * self.flops_per_token / self.world_size
                    record["mfu"] = round(achieved / peak, 4)
                self.log.write(record)
                progress.update(interval_steps, loss=loss, tok_s=record["tokens_per_s"])
                interval_start, interval_steps, timed_steps = time.perf_counter(), 0, 0
                interval_cpu = time.process_time()
                loss_sum.zero_()

            evaluate = self.step % config.eval_every == 0 or last
            save = self.step % config.checkpoint_interval == 0 or last
            if evaluate or save:
                metrics = {"step": self.step, "epoch": self.epoch}
                if evaluate:
                    metrics.update(self.evaluate())
                    self.log.write(metrics)
                self.checkpoint(metrics, save)
                # eval/checkpoint time is not training time
                interval_start, interval_cpu = time.perf_counter(), time.process_time()
                timed_steps = 0
        progress.close()

        if not self.final:  # resumed at max_steps: nothing trained, evaluate for the export
            self.final = {"step": self.step, **self.evaluate()}
        self.export()
        self.log.write({"event": "end", **self.final})
        self.log.close()
        return self.final

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Validation loss / perplexity over this worker's val rows, summed across ranks."""
        if self.val_chunk is None:
            self.val_chunk = self.read_val()
        rows = chunk_rows(self.val_chunk)
        streams = min(self.config.micro_batch, rows)
        self.engine.eval()
        generator = torch.Generator().manual_seed(self.config.seed)  # same masks every eval
        totals: dict[str, float] = {}
        saved_state, self.state = self.state, None
        with torch.no_grad():
            for batch in _eval_batches(self.val_chunk, self.kind, streams):
                _, sums = self.forward(batch, generator)
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
        self.state = saved_state
        self.engine.train()
        keys = sorted(totals)
        summed = dict(
            zip(keys, _all_reduce_sum([totals[k] for k in keys], self.device), strict=True)
        )
        if self.kind == "mlm":
            mlm_loss = summed["mlm_loss"] / max(1.0, summed["mlm_tokens"])
            result = {
                "val_loss": mlm_loss,
                "val_ppl": math.exp(min(mlm_loss, 50.0)),
                "val_mlm_acc": summed["mlm_correct"] / max(1.0, summed["mlm_tokens"]),
                "val_nsp_loss": summed["nsp_loss"] / max(1.0, summed["rows"]),
                "val_nsp_acc": summed["nsp_correct"] / max(1.0, summed["rows"]),
            }
        else:
            loss = summed["loss"] / max(1.0, summed["tokens"])
            result = {
                "val_loss": loss,
                "val_ppl": math.exp(min(loss, 50.0)),
                "val_tokens": int(summed["tokens"]),
            }
        result = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}
        self.final = {"step": self.step, **result}
        return result

    def read_val(self) -> Chunk:
        limit = self.config.eval_rows or None
        pieces, have = [], 0
        for chunk in self.session.chunks("val", 4096):
            pieces.append(chunk)
            have += chunk_rows(chunk)
            # Keep reading to the end: every rank must drain its split (the reads are collective).
        chunk = _concat_chunks(pieces, self.kind)
        if limit is not None:
            chunk = {k: v[:limit] for k, v in chunk.items()}
        return chunk

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self, metrics: dict[str, Any], save: bool) -> None:
        directory = None
        if save:
            directory = self.session.staging_dir(self.step)
            self.engine.save_checkpoint(str(directory), tag=DS_TAG)
            torch.save(self.rank_state(), directory / f"rank_{self.rank:05d}.pt")
            _barrier(self.device)
            if self.rank == 0:
                meta = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "tokens": self.tokens,
                    "model": self.config.model,
                    "preset": self.config.preset,
                    "workers": self.world_size,
                    "zero_stage": self.config.zero_stage,
                    **{k: v for k, v in metrics.items() if k.startswith("val_")},
                }
                (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2) + "\n")
        self.session.report(metrics, directory, self.step)

    def rank_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_batches": self.epoch_batches,
            "tokens": self.tokens,
            "torch_rng": torch.get_rng_state(),
            "mask_rng": self.mask_rng.get_state(),
            "python_rng": list(random.getstate()[1]),
            "stream_state": state_to(self.state, "cpu"),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def restore(self) -> None:
        with self.session.latest_checkpoint() as directory:
            if directory is None:
                return
            self.engine.load_checkpoint(str(directory), tag=DS_TAG)
            path = directory / f"rank_{self.rank:05d}.pt"
            if not path.is_file():
                raise NLMError(f"{directory}: no {path.name}; it was written by fewer workers")
            state = torch.load(path, weights_only=True)
        self.step, self.epoch = state["step"], state["epoch"]
        self.epoch_batches, self.tokens = state["epoch_batches"], state["tokens"]
        torch.set_rng_state(state["torch_rng"])
        self.mask_rng.set_state(state["mask_rng"])
        random.setstate((3, tuple(state["python_rng"]), None))
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.state = state_to(state["stream_state"], self.device)
        self.resumed_from = self.step

    def log_start(self) -> None:
        pids: list[Any] = [None] * self.world_size
        dist.all_gather_object(pids, {"pid": os.getpid(), "host": os.uname().nodename})
        self.log.write(
            {
                "event": "start",
                "step": self.step,
                "resumed_from_step": self.resumed_from,
                "epoch": self.epoch,
                "world_size": self.world_size,
                "device": str(self.device),
                "zero_stage": self.config.zero_stage,
                "torch_threads": self.threads,
                "params": self.num_params,
                "workers": pids,
            }
        )

    # -- export ----------------------------------------------------------------------------

    def export(self) -> None:
        """RUN/model: the serving checkpoint, consolidated from the (possibly ZeRO-3) engine,
        checked to give the engine's logits."""
        from nlm.checkpoint import load_checkpoint, save_checkpoint
        from nlm.tokenizers import load_tokenizer

        module = self.engine.module
        state_dict = None
        with _gathered(module, self.config.zero_stage == 3):
            if self.rank == 0:
                state_dict = {
                    k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()
                }
        # The probe: the first val micro-batch, through the engine on every rank (ZeRO-3's
        # forward is collective), and through the exported model on rank 0.
        probe = next(_eval_batches(self.val_chunk, self.kind, min(4, chunk_rows(self.val_chunk))))
        engine_logits = self.probe_logits(self.engine, probe)
        if self.rank == 0:
            model = self.build_model()
            model.load_state_dict(state_dict)
            # Compare in the engine's precision (bf16 on GPU): the weights are what is checked.
            dtype = next(self.engine.module.parameters()).dtype
            twin = copy.deepcopy(model).to(self.device, dtype=dtype)
            got = self.probe_logits(twin, probe)
            diff = (got - engine_logits).abs().max().item()
            tolerance = 1e-4  # fp32: the same numbers, up to the order of float additions
            if dtype != torch.float32:  # bf16: relative to the logits' size
                tolerance = 2e-2 * max(1.0, engine_logits.abs().max().item())
            if not diff <= tolerance:
                raise RuntimeError(
                    f"the exported weights' logits differ from the engine's by {diff}"
                )
            self.final["export_max_abs_logit_diff"] = diff
            run_dir = Path(self.plan.run_dir)
            save_checkpoint(
                run_dir / "model",
                model,
                load_tokenizer(self.plan.tokenizer_dir),
                metrics={**self.final, "params": self.num_params, "tokens": self.tokens},
                extra={"training": {"run": str(run_dir), "config": self.plan.config}},
            )
            # What a reader loads is what was checked (fp32, on the CPU, as nlm eval loads it).
            reloaded = load_checkpoint(run_dir / "model").model
            cpu_probe = {k: v.cpu() for k, v in probe.items()}
            if not torch.equal(
                self.probe_logits(reloaded, cpu_probe), self.probe_logits(model, cpu_probe)
            ):
                raise RuntimeError(f"{run_dir / 'model'}: reloading changed the logits")
        _barrier(self.device)

    def probe_logits(self, model: Any, batch: Batch) -> torch.Tensor:
        """Eval-mode logits of a probe batch, on the device `batch` is on (moved to `model`'s)."""
        was_training = model.training
        model.eval()
        device = self.device if model is self.engine else next(model.parameters()).device
        with torch.no_grad():
            ids = batch["input_ids"].to(device)
            if self.kind == "mlm":
                out = model(
                    ids,
                    token_type_ids=batch["token_type_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
            else:
                out = model(ids[:, :-1])
        model.train(was_training)
        return out.logits.float()


def _load_init_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """`--init-from`: the weights of an nlm checkpoint (plan_run checked that they fit)."""
    from nlm.checkpoint import load_checkpoint

    model.load_state_dict(load_checkpoint(checkpoint).model.state_dict())


def run_worker(plan: RunPlan, session: RaySession | LocalSession) -> Trainer:
    """Train on this rank until max_steps; returns the Trainer (engine included) for tests."""
    trainer = Trainer(plan, session)
    trainer.train()
    return trainer


def train_worker(loop_config: dict[str, Any]) -> None:
    """TorchTrainer's train_loop_per_worker: the plan comes in the train-loop config."""
    plan = RunPlan.from_dict(loop_config["plan"])
    run_worker(plan, RaySession(plan))


# --- helpers -----------------------------------------------------------------------------------


def _eval_batches(chunk: Chunk, kind: str, batch_size: int) -> Iterator[Batch]:
    """Every row of the val chunk once, in order (streams for rnn/lstm, last batch partial)."""
    if kind == "stream":
        yield from micro_batches(
            [chunk], kind=kind, batch_size=batch_size, seed=0, epoch=0, rank=0, shuffle=False
        )
        return
    rows = chunk_rows(chunk)
    for start in range(0, rows, batch_size):
        part = {k: v[start : start + batch_size] for k, v in chunk.items()}
        yield from micro_batches(
            [part], kind=kind, batch_size=chunk_rows(part), seed=0, epoch=0, rank=0, shuffle=False
        )


def _concat_chunks(pieces: list[Chunk], kind: str) -> Chunk:
    if not pieces:
        raise NLMError("this worker's share of the val split is empty")
    if kind != "mlm":
        return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    width = max(p["input_ids"].shape[1] for p in pieces)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    return {
        "input_ids": torch.cat([pad(p["input_ids"]) for p in pieces]),
        "token_type_ids": torch.cat([pad(p["token_type_ids"]) for p in pieces]),
        "lengths": torch.cat([p["lengths"] for p in pieces]),
        "nsp_label": torch.cat([p["nsp_label"] for p in pieces]),
    }


@contextlib.contextmanager
def _gathered(module: torch.nn.Module, zero3: bool) -> Iterator[None]:
    """Under ZeRO-3 each rank holds a slice of every parameter: gather them whole."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def _barrier(device: torch.device) -> None:
    """A barrier that names the GPU under NCCL (without it, barrier() can hang: field notes)."""
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _extensions_dir() -> Path:
    from nlm.corpora import cache_dir

    return cache_dir() / "torch_extensions"


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _NoProgress:
    def update(self, n: int, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Progress(_NoProgress):
    def __init__(self, start: int, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr)

    def update(self, n: int, **postfix: Any) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _progress(enabled: bool, start: int, total: int) -> _NoProgress:
    """A progress bar when this process owns the terminal (no Ray: the driver draws Ray's)."""
    return _Progress(start, total) if enabled else _NoProgress()


def main(argv: list[str] | None = None) -> None:
    """One rank without Ray, under torchrun (or RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT):

        torchrun --standalone --nproc_per_node 8 -m nlm.cluster.train.loop CONFIG.yaml

    CONFIG.yaml holds TrainConfig fields (as `nlm train --config`); `workers` is taken from
    WORLD_SIZE. Rank 0 checks it (train_plan.plan_run) and writes RUN/config.yaml and
    RUN/plan.json; every rank then trains with a LocalSession. Exit status 2 on bad input.
    """
    import deepspeed

    from nlm.cluster.train.config import TrainConfig

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m nlm.cluster.train.loop CONFIG.yaml (under torchrun)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("DS_ACCELERATOR", device)
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    try:
        # Rank 0 plans; the others get its plan (or its error) so no rank waits forever.
        message: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                config = TrainConfig.load_yaml(argv[0]).replace(workers=dist.get_world_size())
                plan = plan_run(config, device)
                run_dir = Path(plan.run_dir)
                run_dir.mkdir(parents=True, exist_ok=True)
                plan.train.save_yaml(run_dir / "config.yaml")
                message = [plan.to_dict()]
            except NLMError as exc:
                message = [f"nlm: error: {exc}"]
        dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], str):
            print(message[0], file=sys.stderr)
            raise SystemExit(2)
        plan = RunPlan.from_dict(message[0])
        run_worker(plan, LocalSession(plan))
    except NLMError as exc:
        print(f"nlm: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
