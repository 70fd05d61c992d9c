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

Efficiency, in the same invocation:
  - model FLOPs/s = the model's training FLOPs per token (`flops_per_token`: 6N plus attention,
    Kaplan et al. 2020) x tokens/s, against the fp32 matmul peak measured here on the same
    number of threads (`matmul_peak`: the best of a few timed large `torch.matmul`s), as a
    percentage: MFU against the measured peak, not against a datasheet;
  - evaluation: `nlm.evaluation.evaluate_documents` (what `nlm eval` runs, at its defaults) on
    the first `--eval-tokens` words of wt2-mini's test text with an untrained model of the
    same preset (the speed does not depend on the weights), on the plain loop's threads; as tokens/s
    and as a ratio to each run's training tokens/s (the goal: at least 3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
    parser.add_argument(
        "--eval-tokens", type=int, default=20_000,
        help="words of the test text scored to time evaluation (0: skip)",
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

    flops = train_flops_per_token(args, data)
    evaluation = eval_throughput(args, data, threads) if args.eval_tokens > 0 else None
    add_efficiency(results, flops, evaluation)
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
        "train_flops_per_token": flops,
        "evaluation": evaluation,
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


# --- efficiency: the measured matmul peak, the model's FLOPs, evaluation speed -----------------


def add_efficiency(
    results: list[dict[str, Any]],
    flops_per_token: float,
    evaluation: dict[str, Any] | None,
    peak: Callable[[int], float] | None = None,
) -> None:
    """Add to each run: vs_plain (tokens/s against the first run's), model GFLOP/s, the matmul
    peak measured on the threads the run used (workers x threads per worker), MFU against it
    (%), and evaluation tokens/s over the run's training tokens/s."""
    peak = peak or matmul_peak
    peaks: dict[int, float] = {}
    base = results[0]["tokens_per_s"]
    for r in results:
        r["vs_plain"] = round(r["tokens_per_s"] / base, 3)
        threads_used = r["workers"] * r["threads_per_worker"]
        if threads_used not in peaks:
            peaks[threads_used] = peak(threads_used)
        model_flops = flops_per_token * r["tokens_per_s"]
        r["model_gflops_per_s"] = round(model_flops / 1e9, 2)
        r["matmul_peak_gflops_per_s"] = round(peaks[threads_used] / 1e9, 2)
        r["mfu_vs_measured_peak"] = round(100 * model_flops / peaks[threads_used], 1)
        r["eval_vs_train"] = (
            round(evaluation["tokens_per_s"] / r["tokens_per_s"], 2) if evaluation else None
        )


def matmul_peak(threads: int, size: int = 1536, repeats: int = 5) -> float:
    """fp32 FLOP/s of a large square `torch.matmul` on `threads` threads: the best of `repeats`
    timed products (2 n^3 FLOPs each) after one warm-up. What this machine's BLAS reaches now,
    under whatever else runs on it: the denominator of MFU-vs-measured-peak."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.matmul(a, b)  # warm-up: thread pool, caches
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
        return 2.0 * size**3 / best
    finally:
        torch.set_num_threads(previous)


def train_flops_per_token(args: argparse.Namespace, data: Path) -> float:
    """Training FLOPs per token of the benchmarked model (`LanguageModel.flops_per_token`)."""
    from nlm.models import build_model
    from nlm.shards import read_manifest

    manifest = read_manifest(data)
    model = build_model(args.model, args.preset, vocab_size=manifest.tokenizer["vocab_size"])
    return float(model.flops_per_token(manifest.seq_len))


def eval_throughput(args: argparse.Namespace, data: Path, threads: int) -> dict[str, Any]:
    """tokens/s of `evaluate_documents` (nlm eval's defaults, and its allocator setting) on the
    test text's first `--eval-tokens` words, with an untrained model of the preset and the
    shards' tokenizer."""
    from nlm.corpora import resolve_corpus
    from nlm.device import keep_freed_memory
    from nlm.evaluation import DEFAULT_BATCH_SIZE, evaluate_documents, read_documents
    from nlm.models import build_model
    from nlm.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(data / "tokenizer")
    documents, words = [], 0
    for doc in read_documents(resolve_corpus("wt2-mini").test):
        documents.append(doc)
        words += len(doc.split())
        if words >= args.eval_tokens:
            break
    torch.manual_seed(0)
    model = build_model(args.model, args.preset, vocab_size=tokenizer.vocab_size)
    keep_freed_memory()  # as nlm.evaluation.evaluate_file
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        result = evaluate_documents(model, tokenizer, documents, batch_size=DEFAULT_BATCH_SIZE)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {
        "threads": threads,
        "tokens": result["tokens"],
        "seconds": round(seconds, 2),
        "tokens_per_s": round(result["tokens"] / seconds, 1),
        "batch_size": DEFAULT_BATCH_SIZE,
        "seq_len": result["seq_len"],
        "stride": result.get("stride"),
    }


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
    evaluation = report.get("evaluation")
    lines = [
        "| run | workers x threads | step (ms) | rank-0 CPU per step (ms) | tokens/s | vs plain "
        "| start-up (s) | model GFLOP/s | matmul peak GFLOP/s | MFU vs measured peak "
        "| eval / train tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        ratio = r.get("eval_vs_train")
        lines.append(
            f"| {r['run']} | {r['workers']} x {r['threads_per_worker']} | {r['step_ms']} | "
            f"{r['step_cpu_ms']} | "
            f"{r['tokens_per_s']:.0f} | {r['vs_plain']:.2f} | {r['startup_s']} | "
            f"{r['model_gflops_per_s']} | {r['matmul_peak_gflops_per_s']} | "
            f"{r['mfu_vs_measured_peak']} % | {'-' if ratio is None else ratio} |"
        )
    if evaluation:
        lines.append(
            f"\nnlm eval ({report['model']} {report['preset']}, batch {evaluation['batch_size']}, "
            f"seq_len {evaluation['seq_len']}"
            + (f", stride {evaluation['stride']}" if evaluation["stride"] else "")
            + f", {evaluation['threads']} threads): {evaluation['tokens_per_s']:.0f} tokens/s "
            f"over {evaluation['tokens']} tokens"
        )
    return "\n".join(lines)
