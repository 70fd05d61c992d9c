"""`nlm bench serve`: throughput and latency of the service, batched vs unbatched vs plain.

    nlm bench serve --checkpoint runs/gpt-small            # or: no checkpoint, an untrained
    nlm bench serve --clients 1,8,32,128 --out reports/bench-serve    # small gpt is built

Three servers, each its own process on 127.0.0.1, all started first and stopped at the end:
- `batched`:   nlm serve with @serve.batch (max_batch_size 32),
- `unbatched`: the same with --no-batching (max_batch_size 1),
- `plain`:     one FastAPI + PyTorch process (`python -m nlm.bench.serve plain ...`, below): what
               a user would write instead, with the same nlm.inference code per request,
- `grouped` (only when asked, `--servers batched,grouped,...`): `batched` with
               --stream-batching-interval-ms 50, streamed tokens grouped in 50 ms chunks,
this process (a second one) drives /v1/generate (64 new tokens, no early stop, so every request
does the same work) and /v1/score with N concurrent clients, each sending its requests one after
another, and records requests/s, tokens/s and p50/p99 latency. `--endpoints stream` drives
/v1/completions with `stream: true` (the plain server streams the same way: one SSE chunk per
decoded token) and records time to first token (TTFT, p50/p99) and time per output token (TPOT:
the time from the first token to the last over the tokens after the first, p50/p99); tokens are
counted from each answer's usage chunk, since nlm serve's chunks group the tokens of
--stream-batching-interval-ms. Results go to OUT/results.json,
OUT/results.md and OUT/serve-bench.png (latency against throughput). Only numbers measured in
this run are reported; ratios are against this run's baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nlm.errors import NLMError
from nlm.serve.schemas import GenerateRequest, ScoreRequest  # module level: FastAPI resolves

# the plain server's annotations (strings, with `from __future__ import annotations`) here

SERVERS = ("batched", "unbatched", "plain")  # the default set
KNOWN_SERVERS = (*SERVERS, "grouped")
PROMPT = "The lobster is a species of"
SCORE_TEXT = (
    "Homarus gammarus , known as the European lobster or common lobster , is a species of "
    "lobster from the eastern Atlantic Ocean , Mediterranean Sea and parts of the Black Sea ."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", help="a causal checkpoint (default: build an untrained one)"
    )
    parser.add_argument(
        "--preset", default="small", help="gpt preset when building (default small)"
    )
    parser.add_argument("--clients", default="1,8,32,128", help="concurrency levels")
    parser.add_argument(
        "--endpoints", default="generate,score", help="generate, score and/or stream"
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"which servers to measure, of {', '.join(KNOWN_SERVERS)} (default %(default)s)",
    )
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument(
        "--min-requests", type=int, default=32, help="requests per level at least (default 32)"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads in every server (default 1: two threads per op on two busy cores "
        "spin more than they compute)",
    )
    parser.add_argument("--out", default="reports/bench-serve", help="results directory")


def run(args: argparse.Namespace) -> int:
    clients = _ints(args.clients, "--clients")
    endpoints = [e for e in args.endpoints.split(",") if e]
    servers = [s for s in args.servers.split(",") if s]
    if bad := sorted(set(endpoints) - {"generate", "score", "stream"}):
        raise NLMError(f"--endpoints: unknown {bad} (known: generate, score, stream)")
    if bad := sorted(set(servers) - set(KNOWN_SERVERS)):
        raise NLMError(f"--servers: unknown {bad} (known: {', '.join(KNOWN_SERVERS)})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = (
        Path(args.checkpoint) if args.checkpoint else build_checkpoint(out / "ckpt", args.preset)
    )

    # All servers run at once and the measurements interleave (each level: batched, unbatched,
    # plain), so a change in the machine's background load hits all three alike. An idle
    # server costs little; only the one being driven does work.
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        urls = {
            s: stack.enter_context(running(s, checkpoint, args.torch_threads, out)) for s in servers
        }
        for endpoint in endpoints:
            for url in urls.values():
                asyncio.run(drive(url, endpoint, 2, 2, args.max_tokens))  # warm-up
            for n in clients:
                total = math.ceil(max(args.min_requests, n) / n) * n
                for server, url in urls.items():
                    row = asyncio.run(drive(url, endpoint, n, total // n, args.max_tokens))
                    row.update(server=server, endpoint=endpoint, clients=n, load=os.getloadavg()[0])
                    results.append(row)
                    print(_fmt(row), flush=True)

    meta = {
        "checkpoint": str(checkpoint),
        "max_tokens": args.max_tokens,
        "torch_threads": args.torch_threads,
        "cpus": os.cpu_count(),
        "command": "nlm bench serve " + " ".join(sys.argv[3:]),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    plot(results, out / "serve-bench.png")
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise NLMError(f"{flag} {text}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise NLMError(f"{flag} {text}: expected positive integers")
    return values


# ---------------------------------------------------------------- the servers


def build_checkpoint(directory: Path, preset: str) -> Path:
    """An untrained gpt of `preset` with a word tokenizer of wt2-mini (the cost is the same)."""
    import torch

    from nlm.checkpoint import save_checkpoint
    from nlm.corpora import resolve_corpus
    from nlm.models import build_model
    from nlm.tokenizers import train_tokenizer

    if (directory / "config.json").is_file():
        return directory
    corpus = resolve_corpus("wt2-mini")
    lines = Path(corpus.train).read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer("word", lines)
    torch.manual_seed(0)
    model = build_model("gpt", preset, vocab_size=max(tokenizer.vocab_size, 64))
    return save_checkpoint(directory, model, tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class running:
    """Start one of the servers as a subprocess (own process group) and stop it on exit."""

    def __init__(self, server: str, checkpoint: Path, threads: int, out: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        py = sys.executable
        if server == "plain":
            self.cmd = [
                py,
                "-m",
                "nlm.bench.serve",
                "plain",
                str(checkpoint),
                "--port",
                str(self.port),
            ]
            self.cmd += ["--torch-threads", str(threads)]
        else:
            self.cmd = [py, "-m", "nlm", "serve", f"model={checkpoint}", "--port", str(self.port)]
            self.cmd += ["--replica-cpus", "1", "--torch-threads", str(threads)]
            self.cmd += ["--no-batching"] if server == "unbatched" else ["--max-batch-size", "32"]
            if server == "grouped":
                self.cmd += ["--stream-batching-interval-ms", "50"]
        self.log = out / f"server-{server}.log"

    def __enter__(self) -> str:
        import httpx

        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NLMError(f"{' '.join(self.cmd)} exited; see {self.log}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise NLMError(f"{' '.join(self.cmd)}: no /healthz within 300 s; see {self.log}")

    def __exit__(self, *exc: Any) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- the load


async def drive(
    url: str, endpoint: str, clients: int, per_client: int, max_tokens: int
) -> dict[str, Any]:
    """`clients` concurrent clients, each sending `per_client` requests in a row."""
    import httpx

    if endpoint == "stream":
        return await drive_stream(url, clients, per_client, max_tokens)
    if endpoint == "generate":
        body = {"model": "model", "prompt": PROMPT, "max_tokens": max_tokens, "stop_at_eos": False}
    else:
        body = {"model": "model", "text": SCORE_TEXT}
    latencies: list[float] = []
    tokens = 0
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(c: int) -> None:
            nonlocal tokens, errors
            for i in range(per_client):
                start = time.perf_counter()
                response = await http.post(
                    f"/v1/{endpoint}", json={**body, **_seed(endpoint, c, i)}
                )
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors += 1
                    continue
                answer = response.json()
                tokens += (
                    len(answer["token_ids"]) if endpoint == "generate" else answer["num_tokens"]
                )

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * _quantile(latencies, 0.50),
        "p99_ms": 1000 * _quantile(latencies, 0.99),
    }


async def drive_stream(url: str, clients: int, per_client: int, max_tokens: int) -> dict[str, Any]:
    """Streamed completions: TTFT and TPOT per request (see the module docstring)."""
    import httpx

    body = {
        "model": "model",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},  # chunks may group tokens: count from usage
        "ignore_eos": True,
    }
    ttfts: list[float] = []
    tpots: list[float] = []
    tokens = errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def client(c: int) -> None:
            nonlocal tokens, errors
            for i in range(per_client):
                start = time.perf_counter()
                first = last = None
                count = 0
                payload = {**body, "seed": 1000 * c + i}
                async with http.stream("POST", "/v1/completions", json=payload) as response:
                    if response.status_code != 200:
                        errors += 1
                        await response.aread()
                        continue
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line.removeprefix("data: "))
                        if not chunk["choices"]:  # the usage chunk: the tokens streamed
                            count = chunk["usage"]["completion_tokens"]
                            continue
                        last = time.perf_counter()
                        first = first or last
                if first is None or not count:
                    errors += 1
                    continue
                tokens += count
                ttfts.append(first - start)
                if count > 1:
                    tpots.append((last - first) / (count - 1))

        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    ttfts.sort()
    tpots.sort()
    done = len(ttfts)
    return {
        "requests": done,
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": done / wall,
        "tokens_per_s": tokens / wall,
        "p50_ms": 1000 * _quantile(ttfts, 0.50),  # stream rows: latency = TTFT
        "p99_ms": 1000 * _quantile(ttfts, 0.99),
        "tpot_p50_ms": 1000 * _quantile(tpots, 0.50) if tpots else float("nan"),
        "tpot_p99_ms": 1000 * _quantile(tpots, 0.99) if tpots else float("nan"),
    }


def _seed(endpoint: str, client: int, i: int) -> dict[str, int]:
    return {"seed": 1000 * client + i} if endpoint == "generate" else {}


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _fmt(row: dict[str, Any]) -> str:
    return (
        f"{row['server']:>9} {row['endpoint']:>8} c={row['clients']:<4} "
        f"{row['requests_per_s']:8.1f} req/s {row['tokens_per_s']:9.0f} tok/s "
        f"p50 {row['p50_ms']:8.0f} ms p99 {row['p99_ms']:8.0f} ms errors {row['errors']} "
        f"load {row['load']:.1f}"
    )


# ---------------------------------------------------------------- the report


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| endpoint | server | clients | req/s | tokens/s | p50 ms | p99 ms | p99/p50 | errors | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['endpoint']} | {r['server']} | {r['clients']} | {r['requests_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['p99_ms'] / r['p50_ms']:.2f} | {r['errors']} | {r['load']:.1f} |"
        )
    streamed = [r for r in results if r["endpoint"] == "stream"]
    if streamed:
        lines += ["", "Streaming (/v1/completions, stream: true): TTFT and TPOT", ""]
        lines += [
            "| server | clients | output tokens/s | TTFT p50 ms | TTFT p99 ms | p99/p50 | TPOT p50 ms | TPOT p99 ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in streamed:
            lines.append(
                f"| {r['server']} | {r['clients']} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.1f} | "
                f"{r['p99_ms']:.1f} | {r['p99_ms'] / r['p50_ms']:.2f} | {r['tpot_p50_ms']:.1f} | "
                f"{r['tpot_p99_ms']:.1f} |"
            )
    lines += ["", "Ratios of batched throughput (same endpoint and clients, this run):", ""]
    lines += [
        "| endpoint | clients | batched / unbatched | batched / plain |",
        "| --- | ---: | ---: | ---: |",
    ]
    index = {(r["server"], r["endpoint"], r["clients"]): r for r in results}
    for (server, endpoint, clients), r in index.items():
        if server != "batched":
            continue
        ratios = []
        for base in ("unbatched", "plain"):
            other = index.get((base, endpoint, clients))
            ratios.append(f"{r['requests_per_s'] / other['requests_per_s']:.2f}" if other else "-")
        lines.append(f"| {endpoint} | {clients} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoints = sorted({r["endpoint"] for r in results})
    fig, axes = plt.subplots(1, len(endpoints), figsize=(6 * len(endpoints), 4.5), squeeze=False)
    for ax, endpoint in zip(axes[0], endpoints, strict=True):
        colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
        for color, server in zip(colors, KNOWN_SERVERS, strict=True):
            rows = sorted(
                (r for r in results if r["server"] == server and r["endpoint"] == endpoint),
                key=lambda r: r["clients"],
            )
            if not rows:
                continue
            xs = [r["requests_per_s"] for r in rows]
            ax.plot(xs, [r["p50_ms"] for r in rows], "o-", color=color, label=f"{server} p50")
            ax.plot(
                xs,
                [r["p99_ms"] for r in rows],
                "x--",
                color=color,
                alpha=0.5,
                label=f"{server} p99",
            )
            for r in rows:
                ax.annotate(f"c={r['clients']}", (r["requests_per_s"], r["p50_ms"]), fontsize=7)
        stream = endpoint == "stream"  # its latency is the time to first token
        ax.set_xlabel("throughput (requests/s)")
        ax.set_ylabel("time to first token (ms)" if stream else "latency (ms)")
        ax.set_yscale("log")
        ax.set_title("/v1/completions, stream: true" if stream else f"/v1/{endpoint}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- the plain server


def plain_app(checkpoint: str, threads: int) -> Any:
    """A single-process FastAPI + PyTorch server: no Ray, no batching, one request at a time
    per worker thread (FastAPI runs `def` endpoints in its thread pool)."""
    import torch
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from nlm.checkpoint import load_checkpoint
    from nlm.inference import ContinuousGeneration, Engine, RequestError

    torch.set_num_threads(threads)
    engine = Engine(load_checkpoint(checkpoint))
    app = FastAPI(title="plain")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/generate")
    def generate(body: GenerateRequest) -> Any:
        try:
            job = engine.generation_job(
                body.prompt,
                body.max_tokens,
                body.temperature,
                body.top_k,
                body.top_p,
                body.seed,
                body.stop_at_eos,
            )
        except RequestError as exc:
            return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, exc.status)
        return {"model": body.model, **engine.generate([job])[0]}

    @app.post("/v1/completions")
    def completions(body: dict[str, Any]) -> Any:
        """Streamed completions the plain way: one generation per request, one SSE chunk per
        decoded token (the `def` runs in FastAPI's thread pool, as the other endpoints)."""
        try:
            job = engine.generation_job(
                body["prompt"],
                body.get("max_tokens", 16),
                body.get("temperature", 1.0),
                None,
                None,
                body.get("seed"),
                not body.get("ignore_eos", False),
            )
        except (RequestError, KeyError, TypeError) as exc:
            return JSONResponse({"error": {"code": "invalid_request", "message": str(exc)}}, 400)

        def events() -> Any:
            generation = ContinuousGeneration(engine.model)
            generation.add([job])
            sent = 0
            while generation:
                finished = generation.step()
                ids = finished[0][1][0] if finished else generation.rows[0].new_ids
                if len(ids) > sent:
                    text = engine.tokenizer.decode(ids[sent:], skip_special=True)
                    sent = len(ids)
                    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": None}
                    yield f"data: {json.dumps({'object': 'text_completion', 'choices': [choice]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"completion_tokens": sent}
                yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/score")
    def score(body: ScoreRequest) -> Any:
        try:
            job = engine.score_job(body.text)
        except RequestError as exc:
            return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, exc.status)
        return {"model": body.model, **engine.score([job])[0]}

    return app


def main_plain(argv: list[str]) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m nlm.bench.serve plain")
    parser.add_argument("checkpoint")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)
    app = plain_app(args.checkpoint, args.torch_threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    if sys.argv[1:2] == ["plain"]:
        main_plain(sys.argv[2:])
    else:
        parser = argparse.ArgumentParser(prog="python -m nlm.bench.serve")
        add_arguments(parser)
        raise SystemExit(run(parser.parse_args()))
