"""The one training loop: a DeepSpeed engine stepped to `max_steps`, with hooks for what differs.

Pretraining (nlm.cluster.train.loop.Trainer) and fine-tuning (nlm.cluster.finetune.loop.
FinetuneWorker) are subclasses of `TrainingLoop`; a new objective (a sequence-to-sequence
family, say) is one more. The loop owns what they share:

- set-up: torch threads per worker, the CUDA device, `deepspeed.initialize` with nlm's own
  optimizer (nlm.optim.make_optimizer) and DeepSpeed config, RUN/metrics.jsonl on rank 0;
- a step: the learning rate of the step (nlm.optim.Schedule, a pure function of the step, so a
  resumed run needs no scheduler state), `grad_accum` micro-batches through `engine.backward` /
  `engine.step` (DeepSpeed steps the optimizer at the boundary);
- every `log_every` steps a metrics line (and a stop when the loss is not finite), every
  `eval_every` steps (and at the last) an evaluation, a checkpoint when the subclass asks;
- at the end the export, checked against the engine's own logits (`check_export`).

Hooks (subclasses): `batches`, `train_forward`, `interval_record`, `evaluate`, `export`;
optional `restore`, `log_start`, `after_step`, `position`, `checkpoint_due`, `checkpoint`,
`progress_postfix`.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nlm.cluster.train.deepspeed_config import deepspeed_config
from nlm.cluster.train.distributed import cpu_count, gathered
from nlm.cluster.train.metrics import MetricsLog
from nlm.device import keep_freed_memory
from nlm.errors import NLMError
from nlm.optim import make_optimizer


class Interval:
    """Clocks of the steps since the last metrics line. Evaluations and checkpoints pause the
    clock (`pause`): their time is not training time."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.steps = 0  # steps since the last metrics line
        self.pause()

    def pause(self) -> None:
        self.start, self.cpu = time.perf_counter(), time.process_time()
        self.timed_steps = 0  # steps since the clock (re)started

    def tick(self) -> None:
        self.steps += 1
        self.timed_steps += 1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def cpu_elapsed(self) -> float:
        """This process's CPU time (all its threads) since the clock started."""
        return time.process_time() - self.cpu


class TrainingLoop:
    """One rank's training loop (see the module docstring for its hooks)."""

    what = "training"  # names the run in messages

    def __init__(
        self,
        config: Any,
        *,
        max_steps: int,
        eval_every: int,
        rank: int,
        world_size: int,
        local_world_size: int,
        device: torch.device,
        run_dir: str | Path,
    ) -> None:
        """`config`: a TrainConfig or FinetuneConfig (its optim and scale sections, micro_batch,
        grad_accum, log_every are read)."""
        # DeepSpeed's ZeRO-3 calls a collective torch 2.13 deprecates, once per parameter
        # gather: thousands of identical lines per run otherwise.
        warnings.filterwarnings(
            "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
        )
        use_own_extensions_dir()
        self.config = config
        self.max_steps, self.eval_every = max_steps, eval_every
        self.rank, self.world_size, self.device = rank, world_size, device
        self.threads = config.scale.torch_threads or max(1, cpu_count() // max(1, local_world_size))
        torch.set_num_threads(self.threads)
        keep_freed_memory()  # every step allocates the same activations again
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.log = MetricsLog(Path(run_dir) if rank == 0 else None)
        self.step = 0  # optimizer steps done
        self.last_eval: dict[str, Any] = {}  # the latest evaluation's metrics line
        self.engine: Any = None

    def start_engine(self, model: torch.nn.Module) -> None:
        """`deepspeed.initialize` on `model` with nlm's optimizer and DeepSpeed config."""
        import deepspeed

        config = self.config
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=make_optimizer(model, config.optim, fused=self.device.type == "cuda"),
            config=deepspeed_config(config, self.device.type, self.world_size),
        )
        if config.scale.compile:
            self.engine.compile()  # torch.compile of the module's forward and backward
        if self.world_size == 1 and config.scale.zero_stage == 0:
            # One rank has nothing to average: skip DeepSpeed's per-step flatten / all-reduce /
            # unflatten of every gradient (ZeRO 1-3 need that path to fill their partitions).
            self.engine.enable_backward_allreduce = False

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Train to max_steps, export; returns the final metrics (also the log's `end` line)."""
        config = self.config
        self.restore()
        self.log_start()
        schedule = config.optim.schedule(self.max_steps)
        batches = self.batches()
        progress = self.progress_bar()
        interval = Interval()
        # Sums stay on the device between metrics lines: `.item()` every step would make the
        # host wait for the GPU each time.
        sums: dict[str, Any] = {}
        while self.step < self.max_steps:
            lr = schedule.at(self.step)
            for group in self.engine.optimizer.param_groups:
                group["lr"] = lr
            for _ in range(config.grad_accum):
                loss, parts = self.train_forward(next(batches))
                self.engine.backward(loss)
                self.engine.step()
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value
            self.step += 1
            self.after_step()
            interval.tick()
            last = self.step == self.max_steps

            if self.step % config.log_every == 0 or last:
                record = self.interval_record(sums, interval, lr)
                if not math.isfinite(record["loss"]):
                    raise NLMError(
                        f"{self.what} diverged: loss is {record['loss']} at step {self.step} "
                        f"(lr {lr:g}); lower --lr or set --grad-clip"
                    )
                self.log.write(record)
                progress.update(interval.steps, **self.progress_postfix(record))
                interval.restart()
                sums = {}

            evaluate = self.step % self.eval_every == 0 or last
            save = self.checkpoint_due(last)
            if evaluate or save:
                metrics = {"step": self.step, **self.position()}
                if evaluate:
                    metrics.update(self.evaluate())
                    self.log.write(metrics)
                    self.last_eval = metrics
                self.checkpoint(metrics, save)
                interval.pause()
        progress.close()
        final = self.export()
        self.log.write({"event": "end", **final})
        self.log.close()
        return final

    # -- hooks -------------------------------------------------------------------------------

    def batches(self) -> Iterator[Any]:
        """Training micro-batches, endlessly (epoch after epoch)."""
        raise NotImplementedError

    def train_forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss to backpropagate, this micro-batch's share of the interval sums)."""
        raise NotImplementedError

    def interval_record(self, sums: dict[str, Any], interval: Interval, lr: float) -> dict:
        """The metrics line of the steps since the last one (with a finite-or-not "loss")."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        """Evaluation metrics, summed over the ranks (every rank runs the same forwards)."""
        raise NotImplementedError

    def export(self) -> dict[str, Any]:
        """Write RUN/model (rank 0), checked against the engine; returns the final metrics."""
        raise NotImplementedError

    def restore(self) -> None:
        """Continue from a checkpoint, if there is one (default: nothing to restore)."""

    def log_start(self) -> None:
        """The metrics log's `start` line."""

    def after_step(self) -> None:
        """Counters of an optimizer step (e.g. tokens seen)."""

    def position(self) -> dict[str, Any]:
        """Fields of the evaluation line besides the step (e.g. the epoch)."""
        return {}

    def checkpoint_due(self, last: bool) -> bool:
        return False

    def checkpoint(self, metrics: dict[str, Any], save: bool) -> None:
        """After an evaluation or when `checkpoint_due`: save (when `save`) and report."""

    def progress_bar(self) -> _NoProgress:
        return _NoProgress()

    def progress_postfix(self, record: dict[str, Any]) -> dict[str, float]:
        return {"loss": record["loss"]}

    # -- export helpers ----------------------------------------------------------------------

    def consolidated_state(self) -> dict[str, torch.Tensor] | None:
        """Rank 0: the engine's weights, whole (gathered under ZeRO-3), fp32 on the CPU; None
        on the other ranks (which must still call this: the gather is collective)."""
        module = self.engine.module
        state = None
        with gathered(module, self.config.scale.zero_stage == 3):
            if self.rank == 0:
                state = {
                    k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()
                }
        return state

    def engine_dtype(self) -> torch.dtype:
        return next(self.engine.module.parameters()).dtype

    def check_export(self, got: torch.Tensor, engine_logits: torch.Tensor) -> float:
        """The largest logit difference between the exported weights (in the engine's precision)
        and the engine; RuntimeError beyond the tolerance: fp32 gives the same numbers up to the
        order of float additions; bf16 is held to 2 % of the logits' size."""
        diff = (got.float() - engine_logits.float()).abs().max().item()
        tolerance = 1e-4
        if self.engine_dtype() != torch.float32:
            tolerance = 2e-2 * max(1.0, engine_logits.abs().max().item())
        if not diff <= tolerance:
            raise RuntimeError(f"the exported weights' logits differ from the engine's by {diff}")
        return diff


def use_own_extensions_dir() -> None:
    """Build DeepSpeed's JIT ops (its CPU communication op, built by `init_distributed`) in
    nlm's cache, not torch's shared one: a program building them with other flags makes the
    next run rebuild them (minutes on a busy 2-core machine), and a build killed there leaves a
    lock file every later build waits on. Call it before `deepspeed.init_distributed`."""
    from nlm.corpora import cache_dir

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions"))


class _NoProgress:
    def update(self, n: int, **postfix: Any) -> None:
        pass

    def close(self) -> None:
        pass


class Progress(_NoProgress):
    """A tqdm bar on stderr, for a process that owns the terminal (no Ray driver drawing one)."""

    def __init__(self, start: int, total: int, desc: str = "train") -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr)

    def update(self, n: int, **postfix: Any) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
