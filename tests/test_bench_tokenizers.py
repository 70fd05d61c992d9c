"""`nlm bench tokenizers` on a tiny budget: real `nlm train` and `nlm eval` runs for two
tokenizers, the table, the JSON report and the PNG; a bad tokenizer name is one line, exit 2,
nothing written. The shards are written in-process (tests/train_shards.py, the shard contract
without a Ray Data `nlm prepare` per tokenizer); the prepare and train command lines the
benchmark builds are checked against the real parsers instead."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nlm.bench import tokenizers as bench
from nlm.tokenizers import train_tokenizer
from tests.train_shards import corpus_lines, write_shards

REPO = Path(__file__).resolve().parents[1]


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.slow
def test_word_and_char_on_a_tiny_budget(tmp_path, data_mirror, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # each nlm train starts its own local Ray
    work = tmp_path / "work"
    args = bench_args(
        "--models", "lstm", "--tokenizers", "word,char", "--steps", "3", "--preset", "tiny",
        "--workers", "1", "--seq-len", "16", "--test-lines", "3", "--work", str(work),
        "--output", str(tmp_path / "report.json"), "--plot", str(tmp_path / "tokenizers.png"),
    )  # fmt: skip
    lines = corpus_lines(data_mirror, 300)
    for kind, tokenizer in (
        ("word", train_tokenizer("word", lines, min_count=2)),
        ("char", train_tokenizer("char", lines)),
    ):  # where the benchmark looks for its shards, so that it reuses them
        write_shards(bench.shard_dir(work, kind, args), lines, seq_len=16, tokenizer=tokenizer)

    assert bench.run(args) == 0

    report = json.loads((tmp_path / "report.json").read_text())
    rows = {r["tokenizer"]: r for r in report["rows"]}
    assert [(r["model"], r["tokenizer"]) for r in report["rows"]] == [
        ("lstm", "word"),
        ("lstm", "char"),
    ]
    for r in rows.values():
        assert math.isfinite(r["bits_per_byte"]) and r["bits_per_byte"] > 0
        assert r["steps"] == 3 and r["wall_s"] > 0 and r["tokens"] > 0
    assert rows["word"]["bytes"] == rows["char"]["bytes"]  # the same text, scored per byte
    assert rows["char"]["tokens"] > rows["word"]["tokens"]
    word = rows["word"]
    assert word["unk_rate"] > 0
    assert word["bits_per_byte"] > word["bits_per_byte_closed_vocab"] > 0
    png = (tmp_path / "tokenizers.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    table = bench.markdown(report["rows"])
    assert "| lstm | word |" in table and "| lstm | char |" in table


def test_command_lines_parse(tmp_path):
    """What the benchmark runs is what `nlm prepare` and `nlm train` accept: spm kinds get the
    vocabulary size, word/char the frequency floor, gpt a block_size of --seq-len."""
    from nlm.cli import prepare, train

    args = bench_args("--seq-len", "96", "--vocab-size", "500", "--min-count", "2")
    prepare_parser = argparse.ArgumentParser()
    prepare.add_arguments(prepare_parser)
    for kind, field, value in (("bpe", "vocab_size", 500), ("char", "min_count", 2)):
        argv = bench.prepare_argv(kind, bench.shard_dir(tmp_path, kind, args), args)
        config = prepare.build_config(prepare_parser.parse_args(argv[1:]))
        assert config.tokenizer == bench.TOKENIZERS[kind] and config.seq_len == 96
        assert getattr(config, field) == value and config.line_docs

    train_parser = argparse.ArgumentParser()
    train.add_arguments(train_parser)
    recipe = REPO / "configs" / "gpt-small.yaml"
    argv = bench.train_argv("gpt", recipe, tmp_path / "s", tmp_path / "r", args)
    config = train.resolve_config(train_parser.parse_args(argv[1:]))
    assert config.model_overrides["block_size"] == 96 and config.max_steps == 600
    import yaml

    own = yaml.safe_load(recipe.read_text())["model_overrides"]  # the recipe's other overrides stay
    assert {k: config.model_overrides[k] for k in own if k != "block_size"} == {
        k: v for k, v in own.items() if k != "block_size"
    } and len(own) > 1


def test_bad_tokenizer_is_one_line_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "nlm", "bench", "tokenizers", "--tokenizers", "word,wordpiece",
           "--work", str(tmp_path / "work"), "--output", str(tmp_path / "r.json"),
           "--plot", str(tmp_path / "p.png")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "nlm: error: --tokenizers: unknown 'wordpiece' (known: word, char, bpe, unigram)"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--models", "lstm,bert"], "--models: unknown 'bert'"),
        (["--tokenizers", "char,char"], "--tokenizers: 'char,char' names one twice"),
        (["--steps", "0"], "--steps: 0 (at least 1)"),
        (["--preset", "huge"], "unknown preset 'huge'"),
    ],
)
def test_bad_values_are_refused_before_any_work(tmp_path, flags, message):
    from nlm.errors import NLMError

    args = bench_args(*flags, "--work", str(tmp_path / "work"))
    with pytest.raises(NLMError, match=re.escape(message)):
        bench.run(args)
    assert not (tmp_path / "work").exists()
