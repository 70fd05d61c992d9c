"""`nlm bench train`: what Ray Train + DeepSpeed cost against the loop a user would write.

    nlm bench train [--model lstm --preset small --steps 300 --micro-batch 20 --zero-stage 0]

In one run, on the same preset, data and per-worker micro-batch:
  1. plain: one process, plain PyTorch (torch.optim, clip_grad_norm_, batches in memory, the
     hidden state carried across windows for rnn/lstm: PyTorch's word_language_model loop),
     torch using every core;
  2. nlm train with 1 worker (the worker uses every core too);
  3. nlm train with 2 workers (one core each).
Throughput is tokens/s over the steps after warm-up (the first `--warmup` steps and the steps
around evaluations are left out), from each run's own timing (metrics.jsonl for nlm train).
Start-up (Ray, the worker group, DeepSpeed) is reported separately: it is paid once per run.
The data: wt2-mini at word level, prepared once into `--work`/shards (or `--data SHARDS`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError
from nlm.models.base import detach_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lstm", help="fnn | rnn | lstm | gpt")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", help="clm shard directory (default: prepare wt2-mini)")
    parser.add_argument("--seq-len", type=int, default=35, help="when preparing the shards")
    parser.add_argument("--work", default="runs/bench-train", help="scratch directory")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=20, help="per worker")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--optimizer", default="sgd", help="sgd | adamw")
    parser.add_argument("--lr", type=float, default=20.0)
    parser.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="torch threads of the plain loop and of 1 worker (0: every core); 1 measures the "
        "work per step with no thread spinning, what to use on a busy machine",
    )  # fmt: skip
    parser.add_argument("--output", help="also write the results as JSON here")


def run(args: argparse.Namespace) -> int:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data).resolve() if args.data else prepare_shards(work, args.seq_len)
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or cores
    results: list[dict[str, Any]] = []

    print(f"plain PyTorch loop, {threads} threads ...", file=sys.stderr)
    results.append(plain_loop(args, data, threads=threads))
    for workers in [int(w) for w in args.workers.split(",")]:
        print(f"nlm train, {workers} worker(s) ...", file=sys.stderr)
        per_worker = max(1, threads // workers) if args.threads else 0  # 0: the trainer decides
        results.append(nlm_train(args, data, work / f"run-{workers}w", workers, per_worker))

    base = results[0]["tokens_per_s"]
    for r in results:
        r["vs_plain"] = round(r["tokens_per_s"] / base, 3)
    report = {
        "model": args.model,
        "preset": args.preset,
        "micro_batch_per_worker": args.micro_batch,
        "seq_len": results[0]["seq_len"],
        "zero_stage": args.zero_stage,
        "optimizer": args.optimizer,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "cores": cores,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
        "results": results,
    }
    print(markdown(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


def prepare_shards(work: Path, seq_len: int) -> Path:
    shards = work / f"shards-wt2-word-{seq_len}"
    if not (shards / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "nlm", "prepare", "--corpus", "wt2-mini", "--line-docs",
               "--tokenizer", "word", "--seq-len", str(seq_len), "--output", str(shards),
               "--overwrite", "--no-progress"]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NLMError(f"nlm prepare failed: {done.stderr.strip().splitlines()[-1]}")
    return shards


# --- 1. the plain loop -------------------------------------------------------------------------


def plain_loop(args: argparse.Namespace, data: Path, threads: int) -> dict[str, Any]:
    """What a user writes without Ray or DeepSpeed: everything in memory, one process."""
    from nlm.models import build_model
    from nlm.shards import read_manifest, split_paths

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    manifest = read_manifest(data)
    rows = _read_rows(split_paths(data, manifest, "train"))  # (N, T+1)
    model = build_model(args.model, args.preset, vocab_size=manifest.tokenizer["vocab_size"])
    model.train()
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    recurrent = model.recurrent
    batch = args.micro_batch
    per_stream = rows.shape[0] // batch
    streams = rows[: batch * per_stream].view(
        batch, per_stream, -1
    )  # word_language_model's batchify
    state = None
    times, cpu_times = [], []
    for step in range(args.steps):
        started, cpu_started = time.perf_counter(), time.process_time()
        window = streams[:, step % per_stream].long()
        x, y = window[:, :-1], window[:, 1:]
        if recurrent:
            if step % per_stream == 0:
                state = None
            state = detach_state(state)
            out = model(x, targets=y, state=state)
            state = out.state
        else:
            out = model(x, targets=y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        optimizer.step()
        out.loss.item()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)
    timed = times[args.warmup :]
    tokens_per_step = batch * x.shape[1]
    return {
        "run": "plain PyTorch (1 process)",
        "workers": 1,
        "threads_per_worker": threads,
        "seq_len": x.shape[1],
        "step_ms": round(1000 * statistics.median(timed), 2),
        "step_cpu_ms": round(1000 * statistics.median(cpu_times[args.warmup :]), 2),
        "tokens_per_s": round(tokens_per_step / statistics.median(timed), 1),
        "startup_s": 0.0,
    }


def _read_rows(paths: list[str]) -> torch.Tensor:
    import numpy as np
    import pyarrow.parquet as pq

    pieces = []
    for path in paths:
        column = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
        pieces.append(np.array(column.values.to_numpy(), dtype=np.int32).reshape(len(column), -1))
    return torch.from_numpy(np.concatenate(pieces))


# --- 2, 3. nlm train ---------------------------------------------------------------------------


def nlm_train(
    args: argparse.Namespace, data: Path, out: Path, workers: int, threads: int
) -> dict[str, Any]:
    import shutil

    from nlm.cluster.train.config import TrainConfig
    from nlm.cluster.train.driver import train
    from nlm.cluster.train.metrics import read_metrics

    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig.from_dict(
        dict(
            data=str(data),
            model=args.model,
            preset=args.preset,
            out=str(out),
            workers=workers,
            zero_stage=args.zero_stage,
            micro_batch=args.micro_batch,
            max_steps=args.steps,
            optimizer=args.optimizer,
            lr=args.lr,
            warmup_steps=0,
            lr_schedule="constant",
            grad_clip=0.25,
            eval_every=args.steps,  # one evaluation, at the end
            log_every=10,
            eval_rows=64,
            torch_threads=threads,
        )
    )
    started = time.time()
    train(config, progress=False)
    records = read_metrics(out)
    start = next(r for r in records if r.get("event") == "start")
    steps = [r for r in records if "loss" in r and r["step"] > args.warmup]
    first = next(r for r in records if "loss" in r)
    step_ms = statistics.median(r["step_ms"] for r in steps)
    tokens_per_step = args.micro_batch * workers * _seq_len(data)
    return {
        "run": f"nlm train, {workers} worker{'s' if workers > 1 else ''}",
        "workers": workers,
        "threads_per_worker": start["torch_threads"],
        "seq_len": _seq_len(data),
        "step_ms": round(step_ms, 2),
        "step_cpu_ms": round(statistics.median(r["step_cpu_ms"] for r in steps), 2),
        "tokens_per_s": round(tokens_per_step / (step_ms / 1000), 1),
        # from the call to the first logged step (Ray, worker group, DeepSpeed, first batches)
        "startup_s": round(first["time"] - started - 10 * first["step_ms"] / 1000, 1),
    }


def _seq_len(data: Path) -> int:
    from nlm.shards import read_manifest

    return read_manifest(data).seq_len


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| run | workers x threads | step (ms) | rank-0 CPU per step (ms) | tokens/s | vs plain "
        "| start-up (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['run']} | {r['workers']} x {r['threads_per_worker']} | {r['step_ms']} | "
            f"{r['step_cpu_ms']} | "
            f"{r['tokens_per_s']:.0f} | {r['vs_plain']:.2f} | {r['startup_s']} |"
        )
    return "\n".join(lines)
