"""The foundation commands through the real CLI (`python -m nlm`, a subprocess): `nlm eval`
prints one JSON line, `nlm generate` samples, and bad input is one `nlm: error:` line with exit
status 2 and no traceback. Plus the foundation demo's machinery on a tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from nlm.checkpoint import load_checkpoint, save_checkpoint
from nlm.models import build_model
from nlm.tokenizers import train_tokenizer


def nlm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nlm", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,  # a hang guard; a busy 2-core machine is slow
    )


def assert_user_error(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nlm: error: "), proc.stderr
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_mirror):
    """Tiny lstm, gpt and bert checkpoints sharing a word tokenizer, and a text to score."""
    root = tmp_path_factory.mktemp("cli")
    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer("word", lines[:300], vocab_size=500)
    for family in ("lstm", "gpt", "bert"):
        torch.manual_seed(0)
        model = build_model(family, "tiny", vocab_size=tokenizer.vocab_size)
        save_checkpoint(root / family, model, tokenizer)
    test = (data_mirror / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines()
    (root / "text.txt").write_text("\n".join(test[:12]) + "\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("family", ["lstm", "bert"])
def test_eval_prints_one_json_line(family, workdir):
    proc = nlm("eval", "--checkpoint", workdir / family, "--input", workdir / "text.txt",
               "--max-pll-tokens", "50")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["family"] == family and result["model"] == str(workdir / family)
    assert result["tokens"] > 100 and result["bytes"] > 500
    assert math_ok(result["nll"]) and result["ppl"] > 1
    # the scoring time alone (the benchmark's evaluation speed): tokens / eval_s
    assert result["eval_s"] > 0
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["eval_s"], rel=0.05)
    if family == "bert":
        assert result["pll_tokens"] == 50 and 0 <= result["mlm_accuracy"] <= 1
        assert result["bits_per_byte"] is None
    else:
        assert 0 < result["bits_per_byte"] < 10


def test_eval_record_writes_the_test_figures_into_the_checkpoint(workdir, tmp_path):
    import shutil

    ckpt = tmp_path / "lstm"
    shutil.copytree(workdir / "lstm", ckpt)
    proc = nlm("eval", "--checkpoint", ckpt, "--input", workdir / "text.txt", "--record")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    metrics = load_checkpoint(ckpt).metrics
    assert metrics["test_ppl"] == result["ppl"] and metrics["test_tokens"] == result["tokens"]
    assert metrics["test_bits_per_byte"] == result["bits_per_byte"]
    assert metrics["test_file"] == "text.txt"


def math_ok(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def test_generate(workdir):
    args = ("generate", "--checkpoint", workdir / "gpt", "--prompt", "it was the", "--max-tokens",
            "12", "--seed", "7", "--top-k", "50", "--json")  # fmt: skip
    first, second = nlm(*args), nlm(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout.strip().splitlines()[-1])
    assert out == json.loads(second.stdout.strip().splitlines()[-1])  # seeded
    assert out["text"].startswith("it was the ")
    assert len(out["ids"]) <= 12 and 3 not in out["ids"]  # stops before </s>
    shown = [i for i in out["ids"] if i == 1 or i > 6]  # decode drops markup tokens, not <unk>
    assert len(out["text"].split()) == 3 + len(shown)  # word level: one word per id
    assert all(lp <= 0 for lp in out["logprobs"])
    # a prompt longer than gpt's 64 positions is cut from the left, not an error
    long = nlm(
        "generate", "--checkpoint", workdir / "gpt", "--prompt", "the " * 100, "--max-tokens", "5"
    )
    assert long.returncode == 0, long.stderr
    assert long.stdout.startswith("the the the")
    assert_user_error(
        nlm("generate", "--checkpoint", workdir / "bert", "--prompt", "x"), "cannot generate"
    )


def _make_bad(workdir, tmp_path, case):
    """A checkpoint dir and input file for one bad-input case."""
    import shutil

    ckpt, text = workdir / "lstm", workdir / "text.txt"
    if case in ("unknown-model", "mismatched-weights"):
        ckpt = tmp_path / "ckpt"
        shutil.copytree(workdir / "lstm", ckpt)
        config = json.loads((ckpt / "config.json").read_text())
        if case == "unknown-model":
            config["family"] = "xlnet"
        else:  # gpt weights under an lstm config
            shutil.copy(workdir / "gpt" / "model.safetensors", ckpt / "model.safetensors")
        (ckpt / "config.json").write_text(json.dumps(config))
    elif case == "empty":
        text = tmp_path / "empty.txt"
        text.write_text("\n \n")
    elif case == "latin1":
        text = tmp_path / "latin1.txt"
        text.write_bytes("caf\u00e9 ok\n".encode() + "na\u00efve\n".encode("latin-1"))
    elif case == "missing-input":
        text = tmp_path / "nope.txt"
    elif case == "missing-checkpoint":
        ckpt = tmp_path / "no-such-ckpt"
    return ckpt, text


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown-model", "field 'family' is 'xlnet'"),
        ("mismatched-weights", "weights do not match"),
        ("empty", "empty.txt: no text to evaluate"),
        ("latin1", "latin1.txt:2: not UTF-8 (byte 0xef at byte offset 11)"),
        ("missing-input", "nope.txt: no such file"),
        ("missing-checkpoint", "no-such-ckpt: no such checkpoint"),
    ],
)
def test_eval_bad_input(case, message, workdir, tmp_path):
    ckpt, text = _make_bad(workdir, tmp_path, case)
    proc = nlm("eval", "--checkpoint", ckpt, "--input", text)
    assert_user_error(proc, message)
    assert proc.stdout == ""  # nothing that looks like a result


def test_demo_machinery(tmp_path):
    """Every family through train -> save -> evaluate on a tiny budget (a spent clock still
    trains min_steps, bert a tenth of them); lstm trains long enough to beat its untrained self."""
    from nlm.workflows.foundation_demo import format_table, run_foundation_demo

    out = tmp_path / "demo"
    small = dict(preset="tiny", vocab_size=2000, test_lines=8, max_pll_tokens=50, progress=False)
    results = run_foundation_demo(
        out_dir=out, min_steps=5, seconds=0.001, bert_seconds=0.001, **small
    )
    families = ["fnn", "rnn", "lstm", "gpt", "bert", "elmo", "transformer"]
    assert [r["model"] for r in results] == ["unigram", *families]
    assert json.loads((out / "results.json").read_text()) == results
    for r in results[1:]:
        steps = 1 if r["model"] == "bert" else 5
        assert r["steps"] == steps and r["params"] > 0
        run_dir = out / r["model"]
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == steps
        assert any((run_dir / "tb").iterdir())
        assert load_checkpoint(run_dir).metrics["steps"] == steps  # the run dir loads
    table = format_table(results)
    assert "pseudo-ppl" in table and len(table.splitlines()) == 9
    assert results[7]["ppl_kind"] == "span" and results[7]["ppl"] > 1

    untrained = results[3]["ppl"]  # 5 warmup steps: as good as untrained
    trained = run_foundation_demo(
        out_dir=out, families=("lstm",), max_steps=40, seconds=600, min_steps=1000, **small
    )
    assert trained[1]["steps"] == 40 and trained[1]["ppl"] < untrained / 2


def test_demo_cli_rejects_unknown_family(tmp_path):
    assert_user_error(nlm("demo", "--families", "lstm,gru", "--out", tmp_path), "gru")
