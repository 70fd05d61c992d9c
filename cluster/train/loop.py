"""Pretraining on one rank: shard rows -> DeepSpeed engine -> metrics, checkpoints, export.

`Trainer` is the pretraining objective's `TrainingLoop` (nlm.cluster.train.base_loop, the loop
fine-tuning shares): its hooks read shard rows, compute the clm/stream/mlm losses, evaluate
the val split, checkpoint, and export RUN/model. One function, `run_worker(plan, session)`,
runs on every rank. The session (nlm.cluster.train.session) says where rows, checkpoints and
reports come from:

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
boundary. The learning rate is a pure function of the step (nlm.optim.Schedule), set on the
optimizer before each step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nlm.cluster.train.base_loop import (
    Interval,
    Progress,
    TrainingLoop,
    _NoProgress,
    use_own_extensions_dir,
)
from nlm.cluster.train.batches import (
    Batch,
    Chunk,
    batches_per_epoch,
    chunk_rows,
    micro_batches,
    reset_state,
    state_to,
)
from nlm.cluster.train.checkpoint_digests import record_digests, verify_digests
from nlm.cluster.train.distributed import all_reduce_sum, barrier, seed_everything
from nlm.cluster.train.metrics import peak_flops
from nlm.cluster.train.plan import CHECKPOINT_META, RunPlan, plan_run
from nlm.cluster.train.session import LocalSession, RaySession
from nlm.errors import NLMError

DS_TAG = "ds"  # DeepSpeed's tag inside every checkpoint directory


# --- the loop ----------------------------------------------------------------------------------


class Trainer(TrainingLoop):
    """One rank's pretraining: the engine, the data position, the metrics log."""

    def __init__(self, plan: RunPlan, session: RaySession | LocalSession) -> None:
        config = plan.train
        super().__init__(
            config,
            max_steps=config.max_steps,
            eval_every=config.eval_every,
            rank=session.rank,
            world_size=session.world_size,
            local_world_size=session.local_world_size,
            device=session.device(),
            run_dir=plan.run_dir,
        )
        self.plan, self.session = plan, session
        self.kind = "stream" if config.recurrent else plan.objective

        # Same seed on every rank for the weights; a rank-specific one for dropout/masking.
        seed_everything(config.seed)
        model = self.build_model()
        if config.init_from:  # resuming overwrites these with the run's own checkpoint
            _load_init_weights(model, config.init_from)
        self.num_params = model.num_parameters()
        self.flops_per_token = model.flops_per_token(plan.seq_len)
        seed_everything(config.seed + 1000 * (self.rank + 1))
        self.start_engine(model)
        self.mask_rng = torch.Generator().manual_seed(config.seed + 7919 * (self.rank + 1))

        self.epoch = 0
        self.epoch_batches = 0  # micro-batches consumed in the current epoch
        self.tokens = 0  # tokens trained on, all ranks
        self.tokens_per_step = (
            config.micro_batch * config.grad_accum * self.world_size * plan.seq_len
        )
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
        total = all_reduce_sum([float(rows)], self.device)[0]
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

        if self.kind == "span":  # seq2seq: the encoder reads the input, the decoder the targets
            b = self.to_device(batch)
            out = self.engine(
                b["input_ids"], targets=b["targets"], attention_mask=b["attention_mask"]
            )
            tokens = (b["targets"] != IGNORE_INDEX).sum()
            return out.loss, {"loss": out.loss.detach() * tokens, "tokens": tokens}

        ids = batch["input_ids"].to(self.device, non_blocking=True)
        x, y = ids[:, :-1], ids[:, 1:]
        if self.kind == "stream":
            self.state = reset_state(self.state, batch["reset"].to(self.device))
            out = self.engine(x, targets=y, state=self.state)
            self.state = out.state
        else:
            out = self.engine(x, targets=y)
        sums = {"loss": out.loss.detach() * y.numel(), "tokens": y.numel()}
        # A two-direction LM (elmo, `backward_lm`): its loss is their mean; each is logged too.
        for direction, loss in (out.direction_losses or {}).items():
            sums[f"{direction}_loss"] = loss.detach() * y.numel()
        return out.loss, sums

    # -- the loop's hooks ----------------------------------------------------------------

    def train_forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, _ = self.forward(batch, self.mask_rng)
        return loss, {"loss": loss.detach().float() / self.config.grad_accum}

    def after_step(self) -> None:
        self.tokens += self.tokens_per_step

    def interval_record(self, sums: dict[str, Any], interval: Interval, lr: float) -> dict:
        elapsed, cpu, timed = interval.elapsed, interval.cpu_elapsed, interval.timed_steps
        mean = float(sums["loss"]) / interval.steps
        loss = all_reduce_sum([mean], self.device)[0] / self.world_size
        record = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": round(loss, 5),
            "lr": lr,
            "tokens": self.tokens,
            "tokens_per_s": round(timed * self.tokens_per_step / elapsed, 1),
            "step_ms": round(1000 * elapsed / timed, 2),
            "step_cpu_ms": round(1000 * cpu / timed, 2),  # rank 0's CPU time
        }
        peak = peak_flops(self.device)
        if peak:
            achieved = record["tokens_per_s"] * self.flops_per_token / self.world_size
            record["mfu"] = round(achieved / peak, 4)
        return record

    def progress_bar(self) -> _NoProgress:
        """A bar when this process owns the terminal (under Ray the driver draws one)."""
        if self.rank == 0 and isinstance(self.session, LocalSession):
            return Progress(self.step, self.config.max_steps)
        return _NoProgress()

    def progress_postfix(self, record: dict[str, Any]) -> dict[str, float]:
        return {"loss": record["loss"], "tok_s": record["tokens_per_s"]}

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def checkpoint_due(self, last: bool) -> bool:
        return self.step % self.config.checkpoint_interval == 0 or last

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
            zip(keys, all_reduce_sum([totals[k] for k in keys], self.device), strict=True)
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
            for key in keys:  # elmo: val_forward_loss / _ppl, val_backward_loss / _ppl
                if key.endswith("_loss") and key != "loss":
                    direction = summed[key] / max(1.0, summed["tokens"])
                    name = key.removesuffix("_loss")
                    result[f"val_{name}_loss"] = direction
                    result[f"val_{name}_ppl"] = math.exp(min(direction, 50.0))
        result = {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}
        self.final = {"step": self.step, **result}
        return result

    def read_val(self) -> Chunk:
        limit = self.config.eval_rows or None
        # Read to the end even past eval_rows: every rank must drain its split (the reads are
        # collective).
        pieces = list(self.session.chunks("val", 4096))
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
            record_digests(Path(self.plan.run_dir), self.step, directory)  # checked on resume
            barrier(self.device)
            if self.rank == 0:
                meta = {
                    "step": self.step,
                    "epoch": self.epoch,
                    "tokens": self.tokens,
                    "model": self.config.model,
                    "preset": self.config.preset,
                    "workers": self.world_size,
                    "zero_stage": self.config.scale.zero_stage,
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
            verify_digests(Path(self.plan.run_dir), directory)  # DeepSpeed unpickles its files
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
                "zero_stage": self.config.scale.zero_stage,
                "torch_threads": self.threads,
                "params": self.num_params,
                "workers": pids,
            }
        )

    # -- export ----------------------------------------------------------------------------

    def export(self) -> dict[str, Any]:
        """RUN/model: the serving checkpoint, consolidated from the (possibly ZeRO-3) engine,
        checked to give the engine's logits. Returns the final metrics."""
        from nlm.checkpoint import load_checkpoint, save_checkpoint
        from nlm.tokenizers import load_tokenizer

        if not self.final:  # resumed at max_steps: nothing trained, evaluate for the export
            self.final = {"step": self.step, **self.evaluate()}
        state_dict = self.consolidated_state()
        # The probe: the first val micro-batch, through the engine on every rank (ZeRO-3's
        # forward is collective), and through the exported model on rank 0.
        probe = next(_eval_batches(self.val_chunk, self.kind, min(4, chunk_rows(self.val_chunk))))
        engine_logits = self.probe_logits(self.engine, probe)
        if self.rank == 0:
            model = self.build_model()
            model.load_state_dict(state_dict)
            # Compare in the engine's precision (bf16 on GPU): the weights are what is checked.
            twin = copy.deepcopy(model).to(self.device, dtype=self.engine_dtype())
            diff = self.check_export(self.probe_logits(twin, probe), engine_logits)
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
        barrier(self.device)
        return self.final

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
    trainer.run()
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
    if kind == "span":  # pad each (n, width) tensor to the widest piece's

        def widest(t: torch.Tensor, key: str) -> torch.Tensor:
            if t.dim() == 1:
                return t
            width = max(p[key].shape[1] for p in pieces)
            return torch.nn.functional.pad(t, (0, width - t.shape[1]))

        return {k: torch.cat([widest(p[k], k) for p in pieces]) for k in pieces[0]}
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
    use_own_extensions_dir()
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
