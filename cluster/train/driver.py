"""The driver side of `nlm train`: checks, Ray Data inputs, the TorchTrainer, fault tolerance.

    train(TrainConfig(...)) -> summary dict

1. Check everything that can be checked before a worker starts (plan.plan_run): shards,
   tokenizer, preset, context length, split sizes, run directory, ZeRO stage, device; and that
   the cluster can place the workers plus a CPU for Ray Data (cluster.launch.check_resources).
2. Write RUN/config.yaml (the resolved config: rerun it with `--config`) and RUN/plan.json (what
   `python -m nlm.cluster.train.loop` needs to run a rank without Ray).
3. Run a ray.train.torch.TorchTrainer: gloo on CPU, nccl with one GPU per worker on GPUs;
   `FailureConfig(max_failures)` restarts the worker group from the last checkpoint;
   `CheckpointConfig(num_to_keep)` keeps the last K; storage is RUN/checkpoints.
4. While it runs, draw a progress bar from RUN/metrics.jsonl (rank 0 writes it), which works
   whether or not worker output reaches the driver.

The workers export RUN/model at the end (nlm.cluster.train.loop.Trainer.export).

The pieces every TorchTrainer run shares, pretraining and fine-tuning (nlm.cluster.finetune.
loop.finetune): `resolve_device`, `worker_resources`, `torch_trainer` (the TorchTrainer with its
backend, scaling and worker environment), `fit` (fit on a thread while the progress bar follows
RUN/metrics.jsonl, Ray's failures mapped back to the worker's NLMError, RUN/model's metrics
returned) and `follow_progress`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nlm.cluster.train.config import TrainConfig
from nlm.cluster.train.deepspeed_config import check_zero_stage
from nlm.cluster.train.metrics import read_metrics
from nlm.cluster.train.plan import CHECKPOINTS, RunPlan, plan_run
from nlm.errors import NLMError
from nlm.scale import ScaleConfig

DATA_CPUS = 1.0  # kept free for Ray Data's read tasks (each asks for one CPU)


def train(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train per `config`; returns the final metrics (also in RUN/model/metrics.json)."""
    from nlm.cluster.launch import check_resources, ensure_ray

    # Every check that needs no cluster comes first: bad input fails before Ray starts.
    plan = plan_run(config.check())
    config = plan.train
    ensure_ray()
    plan.device = resolve_device(config.scale)
    check_zero_stage(config.scale.zero_stage, plan.device)
    check_storage(plan)
    worker = worker_resources(config.scale, plan.device)
    check_resources(
        [worker] * config.scale.workers + [{"CPU": DATA_CPUS}],
        config.placement_timeout_s or None,
        what=f"{config.scale.workers} training workers and Ray Data",
    )

    run_dir = Path(plan.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save_yaml(run_dir / "config.yaml")
    _write_json(run_dir / "plan.json", plan.to_dict())

    trainer = make_trainer(plan, worker)
    follow = functools.partial(_follow, run_dir, config) if progress else None
    return fit(trainer, run_dir, what="training", follow=follow)


def fit(
    trainer: Any,
    run_dir: Path,
    *,
    what: str,
    follow: Callable[[threading.Thread], None] | None = None,
) -> dict[str, Any]:
    """`trainer.fit()` on a thread while `follow(thread)` draws progress; the worker's NLMError
    re-raised as such; returns RUN/model/metrics.json plus `run` and `model_dir`."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the calling thread
            error.append(exc)

    thread = threading.Thread(target=run, name=f"nlm-{what}-fit", daemon=True)
    thread.start()
    if follow is not None:
        follow(thread)
    thread.join()
    if error:
        raise user_error(error[0]) or error[0]
    metrics_path = run_dir / "model" / "metrics.json"
    if not metrics_path.is_file():
        raise RuntimeError(f"{run_dir}: {what} finished but wrote no model/ (see the Ray logs)")
    summary = json.loads(metrics_path.read_text(encoding="utf-8"))
    return {**summary, "run": str(run_dir), "model_dir": str(run_dir / "model")}


def resolve_device(scale: ScaleConfig) -> str:
    """auto: cuda when the cluster has a GPU for every worker, else cpu."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if scale.device == "cuda" and gpus < scale.workers:
        raise NLMError(
            f"device 'cuda' needs {scale.workers} GPUs, the Ray cluster has {gpus:g}; "
            "use --device cpu or fewer --workers"
        )
    if scale.device == "auto":
        return "cuda" if gpus >= scale.workers else "cpu"
    return scale.device


def worker_resources(scale: ScaleConfig, device: str) -> dict[str, float]:
    """What each worker asks Ray for: its CPUs, a GPU on cuda, the custom resources."""
    resources = {"CPU": scale.cpus_per_worker}
    if device == "cuda":
        resources["GPU"] = 1.0
    for name, amount in scale.worker_resources.items():
        if name in ("CPU", "GPU"):
            raise NLMError(
                f"worker_resources: set {name} with --cpus-per-worker / --device, not here"
            )
        resources[name] = float(amount)
    return resources


def check_storage(plan: RunPlan) -> None:
    """Multi-node runs need the run directory on storage every node sees (a node-local storage_path fails only at checkpoint time)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    config = plan.train
    if len(nodes) > 1 and not config.shared_fs:
        raise NLMError(
            f"the Ray cluster has {len(nodes)} nodes, and {plan.run_dir} is local to this one: "
            "workers on other nodes could not write metrics, checkpoints or the model. Put --out "
            "(and --storage) on storage every node sees and pass --shared-fs, or use one node"
        )


def make_trainer(plan: RunPlan, worker: dict[str, float]) -> Any:
    import ray.data
    import ray.train

    from nlm.cluster.train.loop import train_worker

    config = plan.train
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run draws one bar of its own
    train_rows = ray.data.read_parquet(plan.train_files, shuffle=None)
    if plan.train_mb <= config.materialize_mb:
        # Read once into the object store: every epoch then splits blocks already in memory
        # instead of starting Parquet read tasks again (seconds per epoch on a small node).
        train_rows = train_rows.materialize()
    # preserve_order makes the split deterministic: the same rows reach the same rank on every
    # epoch and after a restart, which is what lets a resumed run skip to its data position.
    options = ray.data.ExecutionOptions(preserve_order=True)
    return torch_trainer(
        train_worker,
        {"plan": plan.to_dict()},
        device=plan.device,
        workers=config.scale.workers,
        worker=worker,
        name=CHECKPOINTS,
        storage=plan.storage,
        max_failures=config.max_failures,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        datasets={"train": train_rows},  # val is small: each worker reads its share directly
        dataset_config=ray.train.DataConfig(datasets_to_split="all", execution_options=options),
    )


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    *,
    device: str,
    workers: int,
    worker: dict[str, float],
    name: str,
    storage: str,
    max_failures: int,
    **options: Any,
) -> Any:
    """A TorchTrainer running `loop(loop_config)` on `workers` ranks: gloo on CPU, nccl with one
    GPU per worker on cuda; `max_failures` worker-group restarts; Ray Train's run directory is
    STORAGE/NAME. `options`: checkpoint_config (RunConfig), datasets, dataset_config."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from nlm.cluster.train.rendezvous import BoundTorchConfig

    cuda = device == "cuda"
    checkpoint_config = options.pop("checkpoint_config", None)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=BoundTorchConfig(backend="nccl" if cuda else "gloo"),  # store not on *
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cuda, resources_per_worker=worker
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoint_config,
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cuda" if cuda else "cpu"}},
        ),
        **options,
    )


def follow_progress(
    run_dir: Path,
    thread: threading.Thread,
    *,
    total: int,
    desc: str,
    show: Callable[[Any, dict[str, Any]], None],
) -> None:
    """A progress bar from RUN/metrics.jsonl until `thread` ends (rank 0 writes the file, so
    this works whether or not worker output reaches the driver); `show(bar, record)` per line."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step")
    seen = 0
    try:
        while thread.is_alive():
            thread.join(timeout=1.0)
            records = read_metrics(run_dir)
            for record in records[seen:]:
                show(bar, record)
                bar.refresh()
            seen = len(records)
    finally:
        bar.close()


def _follow(run_dir: Path, config: TrainConfig, thread: threading.Thread) -> None:
    def show(bar: Any, record: dict[str, Any]) -> None:
        if record.get("event") == "start":
            bar.n = record["step"]
            bar.set_description(f"train {config.model} (start at {record['step']})")
        elif "loss" in record:
            bar.n = record["step"]
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        elif "val_loss" in record:
            bar.set_postfix(val_ppl=f"{record['val_ppl']:.1f}")

    follow_progress(
        run_dir, thread, total=config.max_steps, desc=f"train {config.model}", show=show
    )


def user_error(exc: BaseException) -> NLMError | None:
    """An NLMError raised inside a worker, unwrapped from Ray's failure types."""
    pending = [exc]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, NLMError) or type(item).__name__ == "NLMError":
            return NLMError(str(item).strip().splitlines()[-1] if str(item).strip() else "error")
        pending.extend(getattr(item, "worker_failures", {}).values())
        pending += [getattr(item, "cause", None), item.__cause__, item.__context__]
        pending.append(getattr(item, "controller_failure", None))
    return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from nlm.files import write_json

    write_json(path, data)
