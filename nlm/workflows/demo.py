"""The end-to-end demo (`nlm demo`, `make demo`): the whole mission on one local Ray instance.

    run_demo(DemoConfig(out="runs/demo")) -> {"rows": [...], "requests": [...], "ok": bool}

1. One Ray instance (`ensure_ray`), reused by every step below: each `nlm train` starting its
   own would cost ~30 s of start-up five times over.
2. Ray Data (`prepare`): wt2-mini -> word-level clm shards (words seen >= 3 times), the same
   tokenizer -> mlm shards for bert and span shards for the transformer; pku-lm (pre-segmented
   Chinese, whitespace = word boundary) -> its own word-level clm shards.
3. Ray Train + DeepSpeed (`train`), 2 CPU workers each: fnn, rnn, lstm, gpt, bert, elmo and the
   transformer on wt2-mini, and an eighth model, an lstm, on pku-lm, `tiny` presets with step
   counts that fit the 2-core budget.
4. nlm.evaluation (what `nlm eval` runs) on each corpus's test split: ppl and bits/byte; bert
   pseudo-perplexity and MLM accuracy. A unigram row (add-one smoothed train counts) is the
   floor every trained model has to get clearly below.
5. Ray Serve (the application `nlm serve` builds, with its defaults), one request to every
   endpoint of every model over HTTP, the answers printed.
6. The summary table, results.json and report.md; Serve and Ray are shut down on the way out,
   Ctrl-C included.

Layout under OUT: shards/{wt2-clm,wt2-mlm,wt2-span,pku-clm}/, runs/<model>/ (config.yaml, metrics.jsonl,
tb/, checkpoints/, model/), results.json, report.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from nlm.errors import NLMError
from nlm.files import write_json
from nlm.models.learning_rates import DEMO_CLIP_NORM, DEMO_DEFAULT_LR, DEMO_LEARNING_RATES
from nlm.workflows.foundation_demo import (
    DEFAULT_FAMILIES,
    FAMILIES,
    clear_out_dir,
    ppl_cell,
    text_table,
    unigram_baseline,
)

SEQ_LEN = 64  # tokens per training row: the tiny gpt's and bert's context
MIN_COUNT = 3  # wt2-mini word vocabulary: the words seen at least 3 times (~6,700 ids)
PKU_MIN_COUNT = 2  # pku-lm is half as large: words seen twice keep ~6,100 ids

# Per model: TrainConfig fields on top of COMMON. Tiny models take large AdamW steps (the
# foundation demo's rates) so that a few hundred updates leave the unigram plateau; the
# recurrent nets need the tighter clip. 500 steps of 16 x 64 tokens are ~2.4 passes over
# wt2-mini's 200k training tokens and take ~40 s per model on 2 cores.
COMMON: dict[str, Any] = dict(
    preset="tiny", micro_batch=8, warmup_steps=20, weight_decay=0.01, log_every=25,
    zero_stage=1, eval_rows=64, keep_checkpoints=1, seed=1337,
)  # fmt: skip
# Per-step cost, one worker's micro-batch, relative to the tiny lstm's (measured side by side in
# one process): elmo 2.6 (two LSTM LMs and two softmaxes per row), transformer 0.8 (its decoder
# predicts only the ~15 % dropped spans), gpt 1.15, bert 0.4. 300 elmo and 500 transformer steps
# cost ~40 s and ~20 s on a quiet 2-core machine; with their Ray Train start-ups, evaluation,
# the span shards and two more replicas they add ~2 min to the demo.
STEPS = {"fnn": 500, "rnn": 500, "lstm": 500, "gpt": 500, "bert": 300, "elmo": 300}
STEPS["transformer"] = 500
SETTINGS: dict[str, dict[str, Any]] = {
    # min_lr: the trainer's default, lr / 10
    family: dict(
        max_steps=steps,
        lr=DEMO_LEARNING_RATES["tiny"].get(family, DEMO_DEFAULT_LR),
        grad_clip=DEMO_CLIP_NORM.get(family, 1.0),
    )
    for family, steps in STEPS.items()
}
DEFAULT_SETTINGS = dict(max_steps=500, lr=1e-3, min_lr=1e-4, grad_clip=1.0)  # a family not above
PKU_RUN = "lstm-pku"
PKU_STEPS = 300

# One request per endpoint: wt2-mini is English Wikipedia prose, pku-lm People's Daily news.
PROMPT = "The album was released in"
SENTENCE = "The game was released in Japan in 2010 ."
MASKED = "The game was [MASK] in Japan in 2010 ."
WORD = "game"
PKU_WORD = "经济"  # economy
PKU_PROMPT = "中国 经济"


@dataclasses.dataclass
class DemoConfig:
    out: str = "runs/demo"
    families: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_FAMILIES))
    workers: int = 2
    max_steps: int | None = None  # caps every model's steps (tests use a handful)
    test_lines: int | None = None  # score only the first N test documents (tests)
    max_pll_tokens: int = 1000  # bert: tokens scored for pseudo-perplexity
    pku: bool = True  # prepare pku-lm and train the sixth model (an lstm) on it
    port: int = 0  # Serve's HTTP port on 127.0.0.1; 0 picks a free one
    seed: int = 0
    progress: bool = True

    def check(self) -> DemoConfig:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise NLMError(f"--families: unknown model '{unknown[0] if unknown else ''}'")
        for flag, value, least in [
            ("--workers", self.workers, 1),
            ("--max-steps", 1 if self.max_steps is None else self.max_steps, 1),
            ("--test-lines", 1 if self.test_lines is None else self.test_lines, 1),
            ("--max-pll-tokens", self.max_pll_tokens, 1),
            ("--port", self.port, 0),
        ]:
            if value < least:
                raise NLMError(f"{flag} {value}: must be at least {least}")
        if self.port > 65535:
            raise NLMError(f"--port {self.port}: must be 0-65535")
        return self


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the pipeline (module docstring); print as it goes; return what results.json holds."""
    import ray

    config.check()
    started = time.monotonic()
    load_before = os.getloadavg()
    out = clear_out_dir(config.out).resolve()
    _log(f"writing under {out}; load average {_load(load_before)}")
    how = start_ray()
    _log(f"Ray: {how} instance, {ray.cluster_resources().get('CPU', 0):g} logical CPUs")
    serving, url = False, ""
    try:
        shards = prepare_all(config, out)
        rows = [baseline_row(shards["wt2"], config)]
        runs: dict[str, Path] = {}
        for name, family, corpus in planned_runs(config):
            row, runs[name] = train_and_evaluate(config, out, name, family, corpus, shards)
            rows.append(row)
        serving, t0 = True, time.monotonic()
        url = start_serve(list(runs.items()), config.port)
        _log(f"Serve: {len(runs)} models at {url} (up in {time.monotonic() - t0:.0f} s)")
        requests = send_requests(url, runs)
    finally:
        stop(how, serving)
    result = {
        "ok": all(r["status"] == 200 for r in requests),
        "wall_s": round(time.monotonic() - started, 1),
        "url": url,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "rows": rows,
        "requests": requests,
        "shards": {name: str(path) for name, path in shards.items()},
        "runs": {name: str(path) for name, path in runs.items()},
    }
    _write_json(out / "results.json", result)
    (out / "report.md").write_text(format_report(result, out) + "\n", encoding="utf-8")
    print("\n" + format_report(result, out, answers=False), flush=True)
    return result


def start_ray() -> str:
    """ensure_ray(), with Ray's own start-up failures (an overloaded machine, ports) as one
    NLMError line, as `nlm serve` reports them."""
    from nlm.cluster.launch import ensure_ray

    try:
        return ensure_ray()
    except NLMError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NLMError(f"could not start Ray: {first}") from None


# ------------------------------------------------------------------------- 1. shards


def prepare_all(config: DemoConfig, out: Path) -> dict[str, Path]:
    """wt2-mini clm + mlm (one tokenizer; + span when a seq2seq family is asked for), pku-lm
    clm; prints each manifest's summary."""
    from nlm.cluster.prepare.pipeline import PrepareConfig, prepare
    from nlm.models import model_class

    common = dict(line_docs=True, seq_len=SEQ_LEN, val_fraction=0.05, seed=config.seed)
    progress = None if config.progress else False  # None: a bar when stderr is a terminal
    jobs = [
        ("wt2", "wt2-mini", dict(tokenizer="word", min_count=MIN_COUNT)),
        ("wt2-mlm", "wt2-mini", dict(objective="mlm", tokenizer_from="wt2")),
    ]
    if any(model_class(f).objective == "span" for f in config.families):
        jobs.append(("wt2-span", "wt2-mini", dict(objective="span", tokenizer_from="wt2")))
    if config.pku:  # segmented comes from the corpus: pku-lm is pre-segmented
        jobs.append(("pku", "pku-lm", dict(tokenizer="word", min_count=PKU_MIN_COUNT)))
    shards: dict[str, Path] = {}
    for name, corpus, options in jobs:
        path = out / "shards" / {"wt2": "wt2-clm", "pku": "pku-clm"}.get(name, name)
        if "tokenizer_from" in options:
            options = {
                **options,
                "tokenizer_from": str(shards[options["tokenizer_from"]] / "tokenizer"),
            }
        t0 = time.monotonic()
        manifest, _ = prepare(
            PrepareConfig(corpus=corpus, output=str(path), progress=progress, **common, **options)
        )
        shards[name] = path
        train, val = manifest.splits["train"], manifest.splits["val"]
        tok = manifest.tokenizer
        _log(
            f"shards {path.name}: {corpus} {manifest.objective}, {tok['kind']} vocabulary "
            f"{tok['vocab_size']:,}{' (segmented)' if manifest.settings.get('segmented') else ''}"
            f", train {train['rows']:,} rows / {train['tokens']:,} tokens, val {val['rows']:,} "
            f"rows / {val['tokens']:,} tokens, {time.monotonic() - t0:.1f} s"
        )
    return shards


def planned_runs(config: DemoConfig) -> list[tuple[str, str, str]]:
    """(run name, family, corpus): the families on wt2-mini, then the lstm on pku-lm."""
    runs = [(family, family, "wt2-mini") for family in FAMILIES if family in config.families]
    if config.pku:
        runs.append((PKU_RUN, "lstm", "pku-lm"))
    return runs


# ------------------------------------------------------------------------- 2-3. train, eval


def train_config(config: DemoConfig, name: str, family: str, data: Path, out: Path) -> Any:
    from nlm.cluster.train.config import TrainConfig

    settings = {**COMMON, **SETTINGS.get(family, DEFAULT_SETTINGS)}
    if name == PKU_RUN:
        settings["max_steps"] = PKU_STEPS
    if config.max_steps is not None:
        settings["max_steps"] = min(settings["max_steps"], config.max_steps)
    settings["eval_every"] = settings["max_steps"]  # validate (and checkpoint) once, at the end
    settings["warmup_steps"] = min(settings["warmup_steps"], settings["max_steps"] // 4)
    return TrainConfig.from_dict(
        dict(data=str(data), model=family, out=str(out), workers=config.workers, **settings)
    )


def train_and_evaluate(
    config: DemoConfig, out: Path, name: str, family: str, corpus: str, shards: dict[str, Path]
) -> tuple[dict[str, Any], Path]:
    from nlm.checkpoint import load_checkpoint
    from nlm.cluster.train.driver import train
    from nlm.cluster.train.metrics import read_metrics
    from nlm.corpora import resolve_corpus
    from nlm.evaluation import evaluate_documents, read_documents
    from nlm.models import model_class

    objective = model_class(family).objective
    own = {"mlm": "wt2-mlm", "span": "wt2-span"}  # wt2-mini shards of the other objectives
    data = shards["pku" if corpus == "pku-lm" else own.get(objective, "wt2")]
    run_dir = out / "runs" / name
    t0 = time.monotonic()
    summary = train(train_config(config, name, family, data, run_dir), progress=config.progress)
    wall = time.monotonic() - t0
    speeds = sorted(r["tokens_per_s"] for r in read_metrics(run_dir) if "tokens_per_s" in r)

    t1 = time.monotonic()
    test_docs = read_documents(resolve_corpus(corpus).test)[: config.test_lines]
    ckpt = load_checkpoint(run_dir)
    scored = evaluate_documents(
        ckpt.model,
        ckpt.tokenizer,
        test_docs,
        batch_size=16,
        max_pll_tokens=config.max_pll_tokens,
        seed=config.seed,
        progress=config.progress,
    )
    row = {
        "model": name,
        "family": family,
        "corpus": corpus,
        "params": summary["params"],
        "steps": summary["step"],
        "wall_s": round(wall, 1),
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
        "val_ppl": summary.get("val_ppl"),
        "test_tokens": scored["tokens"],
        "ppl": scored["ppl"],
        "ppl_kind": scored["ppl_kind"],
        # open vocabulary: <unk> pays its spelling; a span model's evaluation reports no
        # bits/byte and no unk_rate (its kept tokens are not predicted): None
        "bits_per_byte": scored.get("bits_per_byte"),
        "bits_per_byte_closed_vocab": scored.get("bits_per_byte_closed_vocab"),
        "unk_rate": scored.get("unk_rate"),
        "mlm_accuracy": scored.get("mlm_accuracy"),
        "backward_ppl": scored.get("backward_ppl"),  # elmo's right-to-left direction
        "eval_s": round(time.monotonic() - t1, 1),
    }
    record_test_metrics(run_dir / "model", row)
    kind = {"pseudo": "pseudo-ppl", "span": "span ppl"}.get(row["ppl_kind"], "ppl")
    _log(
        f"{name}: {row['steps']} steps in {wall:.0f} s, {corpus} test {kind} {row['ppl']:.1f} "
        f"(evaluated in {row['eval_s']:.0f} s)"
    )
    return row, run_dir


def record_test_metrics(model_dir: Path, row: dict[str, Any]) -> None:
    """Add the test numbers to the checkpoint's metrics.json, where GET /v1/models reads them."""
    from nlm.checkpoint import record_metrics
    from nlm.evaluation import metrics_to_record

    record_metrics(model_dir, {**metrics_to_record(row), "test_corpus": row["corpus"]})


def baseline_row(shards: Path, config: DemoConfig) -> dict[str, Any]:
    """The unigram floor on wt2-mini test with the shards' own tokenizer."""
    from nlm.corpora import resolve_corpus
    from nlm.evaluation import read_documents, text_bytes, token_stream, unknown_text
    from nlm.tokenizers import load_tokenizer

    files = resolve_corpus("wt2-mini")
    tokenizer = load_tokenizer(shards / "tokenizer")
    test_docs = read_documents(files.test)[: config.test_lines]
    row = unigram_baseline(
        token_stream(tokenizer, read_documents(files.train)),
        token_stream(tokenizer, test_docs),
        text_bytes(test_docs),
        tokenizer.vocab_size,
        unknown_text(tokenizer, test_docs)["spelling_bits"],
    )
    return {**row, "family": "unigram", "corpus": "wt2-mini", "wall_s": None, "tokens_per_s": None}


# ------------------------------------------------------------------------- 4. serve


def start_serve(models: list[tuple[str, Path]], port: int) -> str:
    """The application `nlm serve` builds, with its default flags, on 127.0.0.1; its URL."""
    from nlm.serve import launch
    from nlm.serve.app import build_app

    port = port or _free_port()
    launch.check_port_free("127.0.0.1", port)
    app = build_app(launch.local_app_args([f"{name}={path}" for name, path in models]))
    return launch.deploy(app, host="127.0.0.1", port=port)


def demo_requests(runs: dict[str, Path]) -> list[tuple[str, str, dict[str, Any]]]:
    """(model, endpoint, body): one request per endpoint that applies to each model."""
    from nlm.checkpoint import read_checkpoint_config
    from nlm.inference import is_seq2seq, serving_endpoints
    from nlm.models import model_class

    plan = []
    # A seed per model: with one seed, small models whose distributions are alike (mostly
    # <unk>, "the", ",") draw the same tokens from the same random numbers.
    for seed, (name, path) in enumerate(runs.items(), start=1):
        cls = model_class(read_checkpoint_config(path)["family"])
        endpoints = serving_endpoints(cls)
        chinese = name == PKU_RUN
        sentence = PKU_PROMPT if chinese else SENTENCE
        if "fill-mask" in endpoints:
            plan.append((name, "fill-mask", {"model": name, "text": MASKED, "top_k": 5}))
        if "generate" in endpoints:
            prompt = PKU_PROMPT if chinese else PROMPT
            body = {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0.8}
            plan.append((name, "generate", {**body, "top_k": 40, "seed": seed}))
        score = {"model": name, "text": sentence}
        if is_seq2seq(cls):  # log p(text | source): the sentence given itself
            score["source"] = sentence
        plan.append((name, "score", score))
        plan.append((name, "embed", {"model": name, "texts": sentence}))
        word = PKU_WORD if chinese else WORD
        plan.append((name, "neighbors", {"model": name, "word": word, "k": 5}))
    return plan


def send_requests(url: str, runs: dict[str, Path]) -> list[dict[str, Any]]:
    import httpx

    answers = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for model, endpoint, body in demo_requests(runs):
            t0 = time.monotonic()
            response = client.post(f"/v1/{endpoint}", json=body)
            try:
                answer = response.json()
            except ValueError:
                answer = {"error": {"message": response.text[:200]}}
            entry = {
                "model": model,
                "endpoint": endpoint,
                "request": body,
                "status": response.status_code,
                "ms": round(1000 * (time.monotonic() - t0), 1),
                "answer": answer,
                "summary": summarize(endpoint, response.status_code, answer),
            }
            answers.append(entry)
            print(f"POST /v1/{endpoint:<9} {model:<9} {entry['summary']}", flush=True)
    return answers


def summarize(endpoint: str, status: int, answer: dict[str, Any]) -> str:
    """One line for an answer: what a reader wants to see of it."""
    if status != 200:
        return f"HTTP {status}: {answer.get('error', {}).get('message', answer)}"
    if endpoint == "generate":
        return f"-> {answer['text']!r}"
    if endpoint == "score":
        bits = answer.get("bits_per_byte")
        return (
            f"{answer['measure']} {answer['logprob']:.1f} over {answer['num_tokens']} tokens, "
            f"ppl {answer['ppl']:.1f}, "
            + ("no bits/byte" if bits is None else f"{bits:.2f} bits/byte")
            + (f", {answer['unk_tokens']} <unk>" if answer.get("unk_tokens") else "")
        )
    if endpoint == "fill-mask":
        candidates = answer["masks"][0]["candidates"]
        return "[MASK] -> " + ", ".join(f"{c['token']} {c['prob']:.2f}" for c in candidates)
    if endpoint == "embed":
        vector = answer["embeddings"][0]
        norm = sum(x * x for x in vector) ** 0.5
        return f"{answer['dim']}-dim vector, norm {norm:.2f}, first {[round(x, 2) for x in vector[:3]]}"
    if endpoint == "neighbors":
        near = ", ".join(f"{n['token']} {n['cosine']:.2f}" for n in answer["neighbors"])
        return f"{answer['word']}: {near}"
    return json.dumps(answer)[:200]


def stop(how: str, serving: bool) -> None:
    """Ray and Serve go, on success, on error and on Ctrl-C alike."""
    import ray

    from nlm.serve import launch

    if not ray.is_initialized():
        return
    if how == "local" or serving:
        _log("shutting down Ray" if how == "local" else "removing the Serve application")
        launch.shutdown(how)


# ------------------------------------------------------------------------- 5. report


def format_table(rows: list[dict[str, Any]]) -> str:
    return text_table(
        rows,
        [
            ("model", -12, lambda r: r["model"]),  # "transformer" and a space
            ("corpus", -10, lambda r: r["corpus"]),
            ("params", 9, lambda r: f"{r['params']:,}"),
            ("steps", 7, lambda r: "-" if r["steps"] is None else str(r["steps"])),
            ("wall", 7, lambda r: "-" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"),
            (
                "tokens/s",
                10,
                lambda r: "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
            ),
            ("", 2, lambda r: ""),
            ("test ppl", -28, ppl_cell),
            (
                "bits/byte",
                9,
                lambda r: "-" if r["bits_per_byte"] is None else f"{r['bits_per_byte']:.3f}",
            ),
        ],
    )


def format_report(result: dict[str, Any], out: Path, answers: bool = True) -> str:
    """The table, the answers (report.md; stdout has them already), the totals, where things are."""
    ok = sum(r["status"] == 200 for r in result["requests"])
    lines = [format_table(result["rows"]), ""]
    if answers:  # report.md: the table and the answers as preformatted blocks
        lines = ["```", *lines[:-1], "```", "", "```"]
        lines += [
            f"POST /v1/{r['endpoint']:<9} {r['model']:<9} {r['summary']}"
            for r in result["requests"]
        ]
        lines += ["```", ""]
    shard_names = ",".join(Path(p).name for p in result["shards"].values())
    lines += [
        f"{ok}/{len(result['requests'])} requests answered 200; total wall time "
        f"{result['wall_s'] / 60:.1f} min on {result['cpus']} CPUs (load average "
        f"{_load(result['load_before'])} before, {_load(result['load_after'])} after)",
        "",
        f"shards:       {_rel(out / 'shards')}/{{{shard_names}}}",
        f"runs:         {_rel(out / 'runs')}/<model>/ (config.yaml, checkpoints/, model/)",
        f"metrics:      {_rel(out / 'runs')}/<model>/metrics.jsonl, "
        f"tensorboard --logdir {_rel(out / 'runs')}",
        f"results JSON: {_rel(out / 'results.json')}",
        f"report:       {_rel(out / 'report.md')}",
        f"serve again:  nlm serve {' '.join(_rel(Path(p)) for p in result['runs'].values())}",
    ]
    return "\n".join(lines)


def _rel(path: Path) -> str:
    """Relative to the working directory where it lies below it: shorter to read and to paste."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(load: Any) -> str:
    return " / ".join(f"{x:.1f}" for x in load)


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data, ensure_ascii=False)


def _log(message: str) -> None:
    print(f"nlm demo: {message}", file=sys.stderr, flush=True)
