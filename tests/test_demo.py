"""`nlm demo`'s Ray pipeline on a tiny budget, with every real component: Ray Data prepares the
wt2-mini and pku-lm shards, Ray Train + DeepSpeed trains all eight models (3 steps each, one
worker: two-worker runs are test_train's and test_finetune_ray's), nlm.evaluation scores them,
Ray Serve serves them on 127.0.0.1 and every endpoint answers a real HTTP request. Slow (a few
minutes on 2 cores), but it is the demo users run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import pytest

from nlm.checkpoint import load_checkpoint
from nlm.errors import NLMError
from nlm.workflows.demo import PKU_RUN, PKU_WORD, WORD, DemoConfig, format_table, run_demo
from nlm.workflows.foundation_demo import DEMO_MARKER, clear_out_dir

MODELS = ["fnn", "rnn", "lstm", "gpt", "bert", "elmo", "transformer", PKU_RUN]
STEPS = 3


@pytest.fixture(scope="module")
def demo(ray_local, data_mirror, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "stale").mkdir()  # what an earlier demo left: the new run replaces it
    (out / DEMO_MARKER).write_text("")
    config = DemoConfig(
        out=str(out), max_steps=STEPS, test_lines=5, max_pll_tokens=20, progress=False, workers=1
    )
    return out, run_demo(config)


def test_table_has_a_row_per_model(demo):
    out, result = demo
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["unigram", *MODELS]
    assert not (out / "runs" / "stale").exists()
    for name in MODELS:
        r = rows[name]
        assert r["steps"] == STEPS and r["params"] > 0 and r["tokens_per_s"] > 0
        assert r["corpus"] == ("pku-lm" if name == PKU_RUN else "wt2-mini")
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1 and r["wall_s"] > 0
        if name == "bert":
            assert r["ppl_kind"] == "pseudo" and 0 <= r["mlm_accuracy"] <= 1
            assert r["test_tokens"] > 0 and r["bits_per_byte"] is None
        elif name == "transformer":  # the span-corruption targets' perplexity
            assert r["ppl_kind"] == "span" and r["bits_per_byte"] is None
        else:
            assert r["ppl_kind"] == "causal" and r["bits_per_byte"] > 0
        # elmo's right-to-left direction has its own perplexity; no other model has one
        assert (r["backward_ppl"] is not None) == (name == "elmo")
    assert math.isfinite(rows["elmo"]["backward_ppl"]) and rows["elmo"]["backward_ppl"] > 1
    # 3 steps leave a 6,700-word softmax near uniform: far above the unigram floor
    assert rows["gpt"]["ppl"] > rows["unigram"]["ppl"]
    table = format_table(result["rows"]).splitlines()
    assert len(table) == 1 + len(rows)
    assert table[6].startswith("bert") and "pseudo" in table[6] and "MLM acc" in table[6]


def test_every_endpoint_answered(demo):
    _, result = demo
    asked = {(r["model"], r["endpoint"]) for r in result["requests"]}
    for name in MODELS:
        # bert fills masks, elmo (bidirectional, no generation) only scores, embeds and ranks
        own = {"bert": {"fill-mask"}, "elmo": set()}.get(name, {"generate"})
        assert {e for m, e in asked if m == name} == {*own, "score", "embed", "neighbors"}
    assert result["ok"] and all(r["status"] == 200 for r in result["requests"])
    models = {name: load_checkpoint(path).model for name, path in result["runs"].items()}
    for r in result["requests"]:
        answer, endpoint = r["answer"], r["endpoint"]
        assert answer["model"] == r["model"]
        if endpoint == "generate":
            assert len(answer["tokens"]) == len(answer["logprobs"]) <= 12
            assert (
                all(lp <= 0 for lp in answer["logprobs"]) and answer["seed"] == r["request"]["seed"]
            )
            if len(answer["tokens"]) < 12:
                assert answer["finish_reason"] == "end_of_document"
        elif endpoint == "score":
            assert answer["logprob"] < 0 and answer["ppl"] > 1 and answer["num_tokens"] > 0
        elif endpoint == "fill-mask":
            probs = [c["prob"] for c in answer["masks"][0]["candidates"]]
            assert (
                len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
            )
        elif endpoint == "embed":
            vector = answer["embeddings"][0]
            # H: n_embd, the recurrent cells, or elmo's two directions side by side
            width = models[r["model"]].hidden_size
            assert answer["dim"] == len(vector) == width and all(map(math.isfinite, vector))
        else:
            word = PKU_WORD if r["model"] == PKU_RUN else WORD
            cosines = [n["cosine"] for n in answer["neighbors"]]
            assert answer["word"] == word and len(cosines) == 5
            assert cosines == sorted(cosines, reverse=True)
            assert word not in [n["token"] for n in answer["neighbors"]]
        assert r["summary"] and "HTTP" not in r["summary"]


def test_run_dirs_load_and_outputs_are_written(demo):
    out, result = demo
    assert json.loads((out / "results.json").read_text(encoding="utf-8")) == result
    report = (out / "report.md").read_text(encoding="utf-8")
    assert all(name in report for name in MODELS) and "POST /v1/neighbors" in report
    for name, row in ((r["model"], r) for r in result["rows"][1:]):
        run_dir = out / "runs" / name
        ckpt = load_checkpoint(run_dir)
        assert ckpt.model.family == row["family"]
        kind = row["ppl_kind"]
        key = {"pseudo": "test_pseudo_ppl", "span": "test_span_ppl"}.get(kind, "test_ppl")
        assert ckpt.metrics[key] == pytest.approx(row["ppl"])
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in lines if "loss" in x][-1] == STEPS
        assert any((run_dir / "tb").iterdir()) and (run_dir / "config.yaml").is_file()
    for shards in ("wt2-clm", "wt2-mlm", "wt2-span", "pku-clm"):
        manifest = json.loads((out / "shards" / shards / "manifest.json").read_text())
        assert manifest["splits"]["train"]["rows"] > 0
    pku = json.loads((out / "shards" / "pku-clm" / "manifest.json").read_text())
    assert pku["settings"]["segmented"] is True


def test_clear_out_dir_replaces_a_demo_and_refuses_anything_else(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(NLMError, match="thesis.tex"):
        clear_out_dir(foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    old = tmp_path / "old-demo"  # a foundation demo's output, from before the marker existed
    (old / "lstm" / "model").mkdir(parents=True)
    (old / "results.json").write_text("[]")
    assert sorted(p.name for p in clear_out_dir(old).iterdir()) == [DEMO_MARKER]


def test_cli_rejects_bad_flags_before_starting_ray(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "nlm", "demo", "--workers", "0", "--out", str(tmp_path / "d")],
        capture_output=True,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "nlm: error: --workers 0: must be at least 1"
    )
    assert not (tmp_path / "d").exists()


def test_serve_is_shut_down_after_the_demo(demo):
    _, result = demo
    assert result["url"].startswith("http://127.0.0.1:")
    with pytest.raises(httpx.TransportError):  # nothing listens there any more
        httpx.get(result["url"] + "/healthz", timeout=5)
