"""`nlm bench data`: corpus-pipeline throughput and memory against single-process encoding.

In one run, on one generated corpus (the shared WikiText repeated to --sizes, one paragraph per
line, written to a temporary directory and deleted afterwards):
  1. plain SentencePiece `encode(batch, num_threads=1)` in this process: what one core reaches;
  2. the same through nlm's tokenizer (`encode_batch`, which also maps literal special tokens
     such as WikiText's `<unk>` to their ids): the per-core ceiling of the pipeline's actors;
  3. `nlm prepare` (a subprocess with its own local Ray) with each --workers count on the
     largest corpus, and on each corpus size with the most workers (peak RSS vs corpus size).
Throughput is reported in MB of text per second (the same text for every row, so rows compare
whatever the tokenizer counts as a token) and in tokens per second. The pipeline's time is its
own (tokenize + pack + write), without Ray's start-up, which is reported separately.
Goal: prepare on N workers >= 0.7 x N x the single-process rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nlm.errors import NLMError

MB = 1 << 20
FILE_BYTES = 8 * MB


def _sizes(text: str) -> list[int]:
    from nlm.config import parse_size

    try:
        return sorted({parse_size(s) for s in text.split(",") if s.strip()})
    except argparse.ArgumentTypeError as exc:
        raise NLMError(f"--sizes: {exc}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default="50M,200M", help="corpus sizes (default 50M,200M)")
    p.add_argument("--workers", default="1,2", help="worker counts for prepare (default 1,2)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--workdir", help="where to generate the corpus (default: a temp dir, removed)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument(
        "--naive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time a plain read_text + map_batches pipeline (smallest corpus)",
    )


def generate_corpus(directory: Path, size: int, source_files: list[Path]) -> list[Path]:
    """Files of ~8 MB made by repeating the source texts, until `size` bytes are written."""
    directory.mkdir(parents=True, exist_ok=True)
    text = b"".join(p.read_bytes() for p in source_files)
    block = text * max(1, FILE_BYTES // len(text))
    files, written = [], 0
    while written < size:
        path = directory / f"part-{len(files):04d}.txt"
        path.write_bytes(block)
        files.append(path)
        written += len(block)
    return files


def _first_files(files: list[Path], size: int) -> list[Path]:
    """The shortest prefix of `files` holding at least `size` bytes."""
    total = 0
    for i, path in enumerate(files):
        total += path.stat().st_size
        if total >= size:
            return files[: i + 1]
    return files


def _lines(files: list[Path]):
    """Batches of ~1 MB of non-blank lines, file by file (bounded memory)."""
    for path in files:
        lines = [line for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
        batch, size = [], 0
        for line in lines:
            batch.append(line)
            size += len(line)
            if size >= MB:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch


def single_process(files: list[Path], encode) -> dict[str, float]:
    """Time only the encode calls (reading and splitting are not counted)."""
    tokens, seconds, cpu = 0, 0.0, 0.0
    for batch in _lines(files):
        start, start_cpu = time.perf_counter(), time.process_time()
        ids = encode(batch)
        seconds += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        tokens += sum(len(x) for x in ids)
    nbytes = sum(p.stat().st_size for p in files)
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens, "bytes": nbytes}


def run_prepare(
    files: list[Path], tokenizer: Path, out: Path, workers: int, seq_len: int
) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "nlm", "prepare", "--input", *map(str, files), "--line-docs",
        "--tokenizer-from", str(tokenizer), "--seq-len", str(seq_len), "--workers", str(workers),
        "--output", str(out), "--overwrite", "--no-progress",
    ]  # fmt: skip
    # Ray starts its workers at nice 15; the single-process rows run at this process's
    # niceness. Same priority for both, so that other load on the machine skews neither.
    env = dict(os.environ, RAY_worker_niceness="0")
    env.pop("RAY_ADDRESS", None)  # each run starts (and times) its own local instance
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise NLMError(f"nlm prepare failed ({result.returncode}): {result.stderr.strip()[-500:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return summary | {"bytes": sum(p.stat().st_size for p in files)}


class _NaiveTokenize:
    """The usual Ray Data pipeline: rows of lines from read_text, the blank-line filter folded
    into the batch function, ids returned as Python lists (converted to Arrow per token)."""

    def __init__(self, tokenizer_dir: str) -> None:
        from nlm.tokenizers import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)

    def __call__(self, batch: dict) -> dict:
        lines = [t for t in batch["text"] if t.strip()]
        return {"ids": self.tok.encode_batch(lines)}


def naive_ray_data(files: list[Path], tokenizer: Path, workers: int) -> dict[str, Any]:
    """Tokens/s of a straightforward Ray Data pipeline (no shards written), for comparison."""
    import logging

    import ray

    from nlm.cluster.launch import ensure_ray

    os.environ["RAY_worker_niceness"] = "0"  # as in run_prepare
    logging.getLogger("ray._private.worker").setLevel(logging.WARNING)
    ensure_ray(num_cpus=4)  # token and loopback, like every command's instance
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        ds = ray.data.read_text([str(p) for p in files]).map_batches(
            _NaiveTokenize,
            fn_constructor_kwargs={"tokenizer_dir": str(tokenizer)},
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0.5,
        )
        tokens = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            tokens += len(batch.column("ids").combine_chunks().flatten())
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    nbytes = sum(p.stat().st_size for p in files)
    return {"seconds": seconds, "tokens": tokens, "bytes": nbytes}


def run(args: argparse.Namespace) -> int:
    import sentencepiece as spm

    from nlm.corpora import data_file
    from nlm.tokenizers import load_tokenizer, train_tokenizer

    load_before = os.getloadavg()[0]
    sizes = _sizes(args.sizes)
    worker_counts = sorted({int(w) for w in args.workers.split(",")})
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nlm-bench-data-"))
    )
    try:
        sources = [data_file("wikitext-2/valid.txt"), data_file("wikitext-2/test.txt")]
        files = generate_corpus(workdir / "corpus", sizes[-1], sources)
        by_size = {s: _first_files(files, s) for s in sizes}
        lines = [
            line
            for p in sources
            for line in p.read_text(encoding="utf-8").split("\n")
            if line.strip()
        ]
        tok_dir = workdir / "tokenizer"
        train_tokenizer("spm-bpe", lines, vocab_size=args.vocab_size, seed=0).save(tok_dir)
        tok = load_tokenizer(tok_dir)
        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "spm.model"))
        print(
            f"corpus: {len(files)} files, {sum(p.stat().st_size for p in files) / MB:.0f} MB in {workdir}",
            file=sys.stderr,
        )

        results: list[dict[str, Any]] = []
        # The single-process references run on the smallest corpus: the same text, repeated.
        small = by_size[sizes[0]]
        for name, encode in (
            (
                "SentencePiece encode, 1 process, num_threads=1",
                lambda b: sp.encode(b, num_threads=1),
            ),
            ("nlm tokenizer encode_batch, 1 process", tok.encode_batch),
        ):
            print(f"measuring: {name}", file=sys.stderr)
            r = single_process(small, encode)
            results.append({"name": name, "workers": 1, "size": r["bytes"], **r})
        plan = [(sizes[-1], w) for w in worker_counts] + [
            (s, worker_counts[-1]) for s in sizes[:-1]
        ]
        for size, workers in plan:
            print(
                f"measuring: nlm prepare, {workers} worker(s), {size / MB:.0f} MB", file=sys.stderr
            )
            s = run_prepare(by_size[size], tok_dir, workdir / "shards", workers, args.seq_len)
            results.append({
                "name": f"nlm prepare, {workers} worker(s)", "workers": workers, "size": s["bytes"],
                "seconds": s["seconds"], "total_seconds": s["total_seconds"], "tokens": s["tokens"],
                "bytes": s["bytes"], "driver_peak_rss": s["driver_peak_rss"],
                "worker_peak_rss": s["worker_peak_rss"],
                "driver_private_rss": s["driver_private_rss"],
                "worker_private_rss": s["worker_private_rss"],
                "cpu_seconds": s["driver_cpu_seconds"] + s["workers_cpu_seconds"],
                "first_result_seconds": s["first_result_seconds"],
                "driver_cpu_seconds": s["driver_cpu_seconds"],
                "workers_cpu_seconds": s["workers_cpu_seconds"],
            })  # fmt: skip
        if args.naive:
            workers = worker_counts[-1]
            print(f"measuring: read_text + map_batches, {workers} workers", file=sys.stderr)
            r = naive_ray_data(by_size[sizes[0]], tok_dir, workers)
            name = f"Ray Data read_text + map_batches (the usual way), {workers} workers"
            results.append({"name": name, "workers": workers, "size": r["bytes"], **r})
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(report(results, os.cpu_count() or 0, (load_before, os.getloadavg()[0])))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


def report(results: list[dict[str, Any]], cores: int, load: tuple[float, float]) -> str:
    """A markdown table. 'x single' compares text rates (MB/s) with the first row; 'CPU s/MB'
    counts the driver's and the actors' CPU time (not Ray's own daemons), a check on the wall
    clock when other work shares the machine. Peak RSS is getrusage's; (private) is the largest
    anonymous RSS sampled per unit, without object-store pages the process has touched."""
    base = results[0]["bytes"] / results[0]["seconds"]
    ceiling = results[1]["bytes"] / results[1]["seconds"]
    rows = [
        f"{cores} CPU cores; load average {load[0]:.1f} before, {load[1]:.1f} after the run.",
        "",
        "| run | corpus | MB/s | tokens/s | x single | goal >= 0.7 x N | CPU s/MB | wall s (+ start-up) "
        "| driver peak RSS (private) | worker peak RSS (private) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rate = r["bytes"] / r["seconds"]
        ratio = rate / base
        cpu_per_mb = f"{r['cpu_seconds'] / (r['bytes'] / MB):.2f}" if "cpu_seconds" in r else ""
        if "total_seconds" in r:
            verdict = "met" if ratio >= 0.7 * r["workers"] else "missed"
            goal = f"{ratio / r['workers']:.2f} x N: {verdict}"
            wall = f"{r['seconds']:.1f} (+{r['total_seconds'] - r['seconds']:.1f})"
            rss = (
                f"{r['driver_peak_rss'] / MB:.0f} ({r['driver_private_rss'] / MB:.0f}) MB "
                f"| {r['worker_peak_rss'] / MB:.0f} ({r['worker_private_rss'] / MB:.0f}) MB"
            )
        else:
            goal, wall, rss = "", f"{r['seconds']:.1f}", " | "
        rows.append(
            f"| {r['name']} | {r['size'] / MB:.0f} MB | {rate / MB:.2f} "
            f"| {r['tokens'] / r['seconds']:,.0f} | {ratio:.2f} | {goal} | {cpu_per_mb} "
            f"| {wall} | {rss} |"
        )
    rows += ["", f"nlm's tokenizer alone: {ceiling / base:.2f} x plain SentencePiece on one core."]
    return "\n".join(rows)
