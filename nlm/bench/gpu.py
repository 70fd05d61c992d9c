"""`nlm bench gpu`: the one-shot GPU check (`scripts/gpu_check.sh` runs it).

Made for a lent machine with one NVIDIA GPU, a CUDA build of torch, DeepSpeed from carried
wheels, and no Ray: nothing on this path imports Ray (tests/test_gpu_check.py checks the import
chain). In one run, under a wall-time budget (default 450 s):

1. agreement: a seeded gpt answers the same prompts on the CPU (fp32) and on the GPU (fp32 and
   the serving dtype): greedy tokens through `nlm.inference.ContinuousGeneration` and scored
   log-probs (`causal_token_logprobs`). Stated tolerance: fp32 on the GPU gives the CPU's greedy
   tokens exactly and per-token log-probs within 1e-3 nats; bf16 within 0.05 nats on average.
2. generation: continuous-batching decode of a `base` gpt (GPT-2 124M) on the GPU in bf16 at 1,
   32 and 256 concurrent rows: output tokens/s, time to first token (the prefill) and time per
   output token (one decode step). Greedy, no `</s>` stop, so every row runs its full length.
3. training: gpt `base` (seq 1024) under DeepSpeed ZeRO-2 and ZeRO-1, bert `base` at seq 128
   and 512, each through nlm's own loop the way a torchrun user runs it
   (`python -m torch.distributed.run --standalone --nproc_per_node 1 -m nlm.cluster.train.loop
   CONFIG.yaml`: `LocalSession`, no Ray), on synthetic shards written in nlm's shard format
   (random token ids, full-length rows). tokens/s and MFU are the loop's own (metrics.jsonl),
   over the logged intervals after the first (which holds compilation and warm-up).

It prints one JSON summary as the last line of stdout (and writes it to `--output`). With
`--dry-run` the same steps run on the CPU with `tiny` sizes (CI runs it:
tests/test_gpu_check.py); the figures are then meaningless, the plumbing is what is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError


@dataclasses.dataclass
class TrainCase:
    name: str
    family: str  # gpt | bert
    preset: str
    seq_len: int
    micro_batch: int
    zero_stage: int


@dataclasses.dataclass
class Sizes:
    device: str
    dtype: str  # generation and agreement's low-precision dtype
    train: list[TrainCase]
    steps: int  # optimizer steps per training case
    log_every: int  # timing intervals; the first is left out
    gen_preset: str
    prompt_tokens: int
    new_tokens: int
    rows: tuple[int, ...]
    agree_preset: str
    agree_prompts: int
    agree_tokens: int


def gpu_sizes(
    micro_batch_gpt: int, micro_batch_bert128: int, micro_batch_bert512: int, steps: int
) -> Sizes:
    return Sizes(
        device="cuda",
        dtype="bfloat16",
        train=[
            # The goals' runs first: when the budget runs out, the last ones are skipped.
            TrainCase("gpt-base-zero2", "gpt", "base", 1024, micro_batch_gpt, 2),
            TrainCase("bert-base-seq128", "bert", "base", 128, micro_batch_bert128, 2),
            TrainCase("gpt-base-zero1", "gpt", "base", 1024, micro_batch_gpt, 1),
            TrainCase("bert-base-seq512", "bert", "base", 512, micro_batch_bert512, 2),
        ],
        steps=steps,
        log_every=10,
        gen_preset="base",
        prompt_tokens=64,
        new_tokens=128,
        rows=(1, 32, 256),
        agree_preset="small",
        agree_prompts=8,
        agree_tokens=32,
    )


def dry_run_sizes() -> Sizes:
    """The same steps with `tiny` models on the CPU (CI: about a minute on two busy cores)."""
    return Sizes(
        device="cpu",
        dtype="bfloat16",
        train=[
            TrainCase("gpt-tiny-zero2", "gpt", "tiny", 32, 4, 2),
            TrainCase("bert-tiny-seq16", "bert", "tiny", 16, 8, 2),
            TrainCase("gpt-tiny-zero1", "gpt", "tiny", 32, 4, 1),
            TrainCase("bert-tiny-seq32", "bert", "tiny", 32, 4, 2),
        ],
        steps=4,
        log_every=2,
        gen_preset="tiny",
        prompt_tokens=8,
        new_tokens=4,
        rows=(1, 32, 256),
        agree_preset="tiny",
        agree_prompts=4,
        agree_tokens=6,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps on the CPU with tiny sizes (CI)"
    )
    parser.add_argument(
        "--work",
        default="runs/gpu-check",
        help="scratch directory (an earlier check's is replaced)",
    )
    parser.add_argument("--output", help="also write the JSON summary here")
    parser.add_argument(
        "--budget-s", type=float, default=450.0, help="wall-time budget; later steps are skipped"
    )
    parser.add_argument("--no-compile", action="store_true", help="train without engine.compile()")
    parser.add_argument("--micro-batch-gpt", type=int, default=32)
    parser.add_argument("--micro-batch-bert128", type=int, default=256)
    parser.add_argument("--micro-batch-bert512", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=30, help="optimizer steps per training run (logged every 10)"
    )
    parser.add_argument(
        "--only", default="agreement,generate,train", help="comma-separated steps to run"
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    deadline = started + args.budget_s
    if args.dry_run:
        sizes = dry_run_sizes()
    else:
        from nlm.device import check_request

        check_request("cuda", "bfloat16")  # one line, exit 2, when no (bf16) GPU is visible
        sizes = gpu_sizes(
            args.micro_batch_gpt, args.micro_batch_bert128, args.micro_batch_bert512, args.steps
        )
    steps = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = steps - {"agreement", "generate", "train"}
    if unknown:
        raise NLMError(f"--only: unknown step(s) {', '.join(sorted(unknown))}")
    for flag in ("steps", "micro_batch_gpt", "micro_batch_bert128", "micro_batch_bert512"):
        if getattr(args, flag) < 1:
            raise NLMError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= 1")
    work = Path(args.work).resolve()
    marker = work / ".nlm-gpu-check"
    if work.exists() and any(work.iterdir()) and not marker.exists():
        raise NLMError(f"--work {work}: not empty and not an earlier check's: choose another")
    if work.exists():
        import shutil

        shutil.rmtree(work)  # an earlier check's scratch directory (it has the marker)
    work.mkdir(parents=True)
    marker.touch()

    summary: dict[str, Any] = {
        "check": "nlm bench gpu",
        "dry_run": bool(args.dry_run),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(sizes.device),
        "compile": not args.no_compile and not args.dry_run,
    }
    if "agreement" in steps:
        summary["agreement"] = _timed(lambda: agreement(sizes))
        _say("agreement", summary["agreement"])
    if "generate" in steps:
        summary["generate"] = _timed(lambda: generation(sizes))
        _say("generate", summary["generate"])
    if "train" in steps:
        summary["train"] = []
        for case in sizes.train:
            left = deadline - time.monotonic()
            if left < 30:
                summary["train"].append({"name": case.name, "skipped": "over the budget"})
                continue
            result = train_case(case, sizes, work, summary["compile"], timeout=left)
            summary["train"].append(result)
            _say(case.name, result)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    summary["ok"] = _all_ok(summary)
    line = json.dumps(summary)
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(line, flush=True)
    return 0 if summary["ok"] else 1


# ---------------------------------------------------------------- the machine


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
        )
    return info


# ---------------------------------------------------------------- 1. agreement


def agreement(sizes: Sizes) -> dict[str, Any]:
    """CPU fp32 vs the device in fp32 and in `sizes.dtype`: greedy tokens and scored log-probs."""
    from nlm.device import DTYPES
    from nlm.inference import GenerationJob, causal_token_logprobs, generate_batch
    from nlm.models import build_model

    torch.manual_seed(0)
    reference = build_model("gpt", sizes.agree_preset).eval()
    vocab = reference.config.vocab_size
    rng = random.Random(0)
    prompts = [
        [3] + [rng.randrange(7, vocab) for _ in range(rng.randrange(4, 24))]
        for _ in range(sizes.agree_prompts)
    ]  # 3 = </s>, the document boundary every prompt starts with; lengths differ (left padding)
    jobs = [
        GenerationJob(p, sizes.agree_tokens, temperature=0.0, stop_at_eos=False) for p in prompts
    ]

    def answers(model: torch.nn.Module) -> tuple[list[list[int]], list[torch.Tensor]]:
        generated = generate_batch(model, jobs)
        scored = causal_token_logprobs(
            model, [p + g[0] for p, g in zip(prompts, generated, strict=True)]
        )
        return [g[0] for g in generated], [s.double().cpu() for s in scored]

    base_tokens, base_scores = answers(reference)
    out: dict[str, Any] = {"preset": sizes.agree_preset, "prompts": len(prompts),
                           "new_tokens": sizes.agree_tokens}  # fmt: skip
    for dtype_name in dict.fromkeys(["float32", sizes.dtype]):
        import copy

        model = copy.deepcopy(reference).to(sizes.device, DTYPES[dtype_name]).eval()
        tokens, scores = answers(model)
        same = sum(
            a == b
            for x, y in zip(tokens, base_tokens, strict=True)
            for a, b in zip(x, y, strict=True)
        )
        total = sum(len(x) for x in base_tokens)
        # Log-probs of the same text: score the CPU's continuations with the device model.
        text = [p + t for p, t in zip(prompts, base_tokens, strict=True)]
        device_scores = [s.double().cpu() for s in causal_token_logprobs(model, text)]
        diffs = torch.cat([(a - b).abs() for a, b in zip(device_scores, base_scores, strict=True)])
        entry = {
            "greedy_tokens_identical": round(same / total, 4),
            "max_abs_logprob_diff": float(diffs.max()),
            "mean_abs_logprob_diff": float(diffs.mean()),
        }
        if dtype_name == "float32":
            entry["ok"] = same == total and entry["max_abs_logprob_diff"] <= 1e-3
        else:
            entry["ok"] = entry["mean_abs_logprob_diff"] <= 0.05
        out[f"{sizes.device}_{dtype_name}"] = entry
        del model
    return out


# ---------------------------------------------------------------- 2. generation


def generation(sizes: Sizes) -> dict[str, Any]:
    """Continuous-batching decode on the device: tokens/s, TTFT and TPOT at each row count."""
    from nlm.device import DTYPES
    from nlm.inference import ContinuousGeneration, GenerationJob
    from nlm.models import build_model

    device = torch.device(sizes.device)
    torch.manual_seed(0)
    model = build_model("gpt", sizes.gen_preset).to(device, DTYPES[sizes.dtype]).eval()
    vocab = model.config.vocab_size
    rng = random.Random(1)

    def jobs(rows: int, new: int) -> list[GenerationJob]:
        return [
            GenerationJob(
                [3] + [rng.randrange(7, vocab) for _ in range(sizes.prompt_tokens - 1)],
                new,
                temperature=0.0,
                stop_at_eos=False,
            )
            for _ in range(rows)
        ]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def decode(batch: list[GenerationJob]) -> tuple[float, list[float], float]:
        generation = ContinuousGeneration(model)
        sync()
        start = time.perf_counter()
        generation.add(batch)
        sync()
        prefill = time.perf_counter() - start
        steps = []
        while generation:
            t = time.perf_counter()
            generation.step()  # reads the sampled ids back (.tolist()): a sync per step
            steps.append(time.perf_counter() - t)
        return prefill, steps, time.perf_counter() - start

    decode(jobs(min(4, max(sizes.rows)), 4))  # warm-up: kernels, allocator
    results = []
    for rows in sizes.rows:
        prefill, steps, wall = decode(jobs(rows, sizes.new_tokens))
        results.append(
            {
                "rows": rows,
                "prompt_tokens": sizes.prompt_tokens,
                "new_tokens": sizes.new_tokens,
                "output_tokens_per_s": round(rows * sizes.new_tokens / wall, 1),
                "ttft_ms": round(1000 * prefill, 2),
                "tpot_ms": round(1000 * statistics.mean(steps), 3),
                "wall_s": round(wall, 3),
            }
        )
    return {
        "model": f"gpt {sizes.gen_preset}",
        "params": model.num_parameters(),
        "dtype": sizes.dtype,
        "device": str(device),
        "sampling": "greedy",
        "runs": results,
    }


# ---------------------------------------------------------------- 3. training


def write_synthetic_shards(out: Path, objective: str, seq_len: int, rows: int, vocab: int) -> Path:
    """A shard directory in nlm's format (nlm/shards.py) with random token ids in [7, vocab):
    clm rows of seq_len + 1 tokens, mlm rows [CLS] A [SEP] B [SEP] of exactly seq_len tokens.
    The tokenizer is a small word tokenizer (the model's vocabulary comes from the preset via
    model_overrides); nothing here tokenizes text."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs

    from nlm.shards import (
        MLM_SCHEMA,
        PIPELINE_VERSION,
        ClmPacker,
        Manifest,
        ShardWriter,
        schema_for,
        write_manifest,
    )
    from nlm.tokenizers import train_tokenizer
    from nlm.tokenizers.base import CLS_ID, SEP_ID, fingerprint

    tokenizer = train_tokenizer("word", [" ".join(f"w{i}" for i in range(64))], vocab_size=71)
    tokenizer.save(out / "tokenizer")
    rng = np.random.default_rng(0)
    fs = pafs.LocalFileSystem()
    splits = {}
    for split, count in (("train", rows), ("val", max(8, rows // 16))):
        writer = ShardWriter(fs, str(out), split, schema_for(objective), 65536)
        if objective == "clm":
            packer = ClmPacker(seq_len)
            stream = rng.integers(7, vocab, size=count * seq_len + 1, dtype=np.int32)
            writer.write(packer.push(stream))
            tokens = packer.tokens
        else:
            half = (seq_len - 3) // 2
            body = rng.integers(7, vocab, size=(count, seq_len), dtype=np.int32)
            body[:, 0], body[:, half + 1], body[:, seq_len - 1] = CLS_ID, SEP_ID, SEP_ID
            types = np.zeros((count, seq_len), dtype=np.int8)
            types[:, half + 2 :] = 1
            table = pa.Table.from_pydict(
                {
                    "input_ids": list(body),
                    "token_type_ids": list(types),
                    "nsp_label": rng.integers(0, 2, size=count, dtype=np.int8),
                },
                schema=MLM_SCHEMA,
            )
            writer.write(table)
            tokens = count * seq_len
        files = writer.close()
        splits[split] = {"rows": writer.rows, "tokens": int(tokens), "documents": count,
                         "files": files}  # fmt: skip
    manifest = Manifest(
        pipeline_version=PIPELINE_VERSION,
        objective=objective,
        seq_len=seq_len,
        seed=0,
        tokenizer={
            "kind": "word",
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": fingerprint(out / "tokenizer"),
        },  # fmt: skip
        sources=[{"path": "synthetic (nlm bench gpu)", "bytes": 0}],
        splits=splits,
        skipped={"documents": 0, "reasons": {}, "examples": []},
    )
    write_manifest(fs, str(out), manifest)
    return out


def train_case(
    case: TrainCase, sizes: Sizes, work: Path, compile_model: bool, timeout: float
) -> dict[str, Any]:
    """One training run through `torchrun -m nlm.cluster.train.loop` -> its timing figures."""
    from nlm.cluster.train.config import TrainConfig
    from nlm.models import model_class
    from nlm.models.presets import preset_config

    vocab = int(preset_config(case.family, case.preset)["vocab_size"])
    objective = model_class(case.family).objective
    rows = case.micro_batch * (sizes.steps + 2)
    shards = work / "shards" / f"{case.family}-{case.seq_len}"
    if not shards.exists():
        write_synthetic_shards(shards, objective, case.seq_len, rows, vocab)
    run_dir = work / "runs" / case.name
    # Flat keys, as in a YAML config: the scale and optim sections take theirs.
    config = TrainConfig.from_dict(
        {
            "data": str(shards),
            "model": case.family,
            "preset": case.preset,
            "model_overrides": {"vocab_size": vocab},
            "out": str(run_dir),
            "workers": 1,
            "device": "auto",
            "zero_stage": case.zero_stage,
            "micro_batch": case.micro_batch,
            "max_steps": sizes.steps,
            "shuffle": False,
            "warmup_steps": 10,  # capped at a fifth of the run (effective_warmup)
            "lr_schedule": "constant",
            "eval_every": sizes.steps,
            "eval_rows": case.micro_batch,
            "log_every": sizes.log_every,
            "keep_checkpoints": 1,
            "compile": compile_model,
        },
        source="nlm bench gpu",
    ).check()
    config_path = work / f"{case.name}.yaml"
    config.save_yaml(config_path)
    env = {**os.environ, "DS_ACCELERATOR": sizes.device, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
        "-m", "nlm.cluster.train.loop", str(config_path),
    ]  # fmt: skip
    started = time.monotonic()
    log = work / f"{case.name}.log"
    result: dict[str, Any] = {
        "name": case.name,
        "model": f"{case.family} {case.preset}",
        "seq_len": case.seq_len,
        "micro_batch": case.micro_batch,
        "zero_stage": case.zero_stage,
        "compile": compile_model,
        "steps": sizes.steps,
    }
    with open(log, "w", encoding="utf-8") as sink:
        # Its own process group: on a timeout, torchrun's worker goes too (killing torchrun
        # alone leaves the worker running).
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return {**result, "error": f"timed out after {timeout:.0f} s", "log_tail": _tail(log)}
        except BaseException:
            _kill_group(proc)
            raise
    result["wall_s"] = round(time.monotonic() - started, 1)
    if returncode != 0:
        return {**result, "error": f"exit status {returncode}", "log_tail": _tail(log)}
    return {**result, **_timing(run_dir / "metrics.jsonl")}


def _timing(path: Path) -> dict[str, Any]:
    """tokens/s, step time and MFU over the logged intervals after the first."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    intervals = [r for r in records if "tokens_per_s" in r]
    timed = intervals[1:] or intervals
    out: dict[str, Any] = {
        "tokens_per_s": round(statistics.mean(r["tokens_per_s"] for r in timed), 1),
        "step_ms": round(statistics.mean(r["step_ms"] for r in timed), 2),
        "first_interval_tokens_per_s": intervals[0]["tokens_per_s"] if intervals else None,
        "mfu": None,
        "final_loss": intervals[-1]["loss"] if intervals else None,
    }
    if all("mfu" in r for r in timed):
        out["mfu"] = round(statistics.mean(r["mfu"] for r in timed), 4)
    return out


# ---------------------------------------------------------------- helpers


def _timed(step: Any) -> dict[str, Any]:
    started = time.monotonic()
    try:
        result = step()
    except Exception as exc:  # noqa: BLE001 - the summary reports it; later steps still run
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def _all_ok(summary: dict[str, Any]) -> bool:
    parts = [summary.get("agreement", {}), summary.get("generate", {}), *summary.get("train", [])]
    if any("error" in p for p in parts):
        return False
    agreement = summary.get("agreement", {})
    return all(v.get("ok", True) for v in agreement.values() if isinstance(v, dict))


def _kill_group(proc: subprocess.Popen) -> None:
    """TERM the process group, then KILL it if it is still there after 10 s."""
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _say(what: str, result: dict[str, Any]) -> None:
    print(f"nlm bench gpu: {what}: {json.dumps(result)[:1500]}", file=sys.stderr, flush=True)
