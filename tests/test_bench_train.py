"""`nlm bench train`'s efficiency columns without Ray: the matmul peak it measures, MFU against
it from the model's own FLOPs per token, and evaluation tokens/s next to training tokens/s.
(The nlm train runs themselves are the benchmark's, not a test's: they start Ray.)"""

from __future__ import annotations

import argparse
import math

import pytest

from nlm.bench.train import (
    add_efficiency,
    eval_throughput,
    markdown,
    matmul_peak,
    plain_loop,
    train_flops_per_token,
)
from nlm.models import build_model
from tests.train_shards import corpus_lines, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory, data_mirror):
    return write_shards(tmp_path_factory.mktemp("bench") / "shards", corpus_lines(data_mirror, 300))


def test_mfu_against_the_measured_peak_and_eval_ratio(shards):
    args = argparse.Namespace(
        model="lstm", preset="tiny", steps=3, warmup=1, micro_batch=4, optimizer="sgd", lr=1.0,
        eval_tokens=300,
    )  # fmt: skip
    plain = plain_loop(args, shards, threads=1)
    assert plain["tokens_per_s"] > 0

    flops = train_flops_per_token(args, shards)
    model = build_model("lstm", "tiny", vocab_size=256)
    assert flops == model.flops_per_token(16) == 6.0 * model.num_parameters()

    evaluation = eval_throughput(args, shards, threads=1)
    assert evaluation["tokens"] >= 300 and evaluation["tokens_per_s"] > 0

    peak = matmul_peak(1, size=256, repeats=2)
    assert peak > 1e8  # any CPU BLAS does well over 0.1 GFLOP/s on one thread

    results = [
        plain,
        {**plain, "run": "two", "workers": 2, "tokens_per_s": 2 * plain["tokens_per_s"]},
    ]
    asked: list[int] = []
    add_efficiency(results, flops, evaluation, peak=lambda t: asked.append(t) or t * peak)
    assert asked == [1, 2]  # measured once per thread count, on the threads each run used
    for r, threads in zip(results, (1, 2), strict=True):
        model_flops = flops * r["tokens_per_s"]
        assert r["mfu_vs_measured_peak"] == round(100 * model_flops / (threads * peak), 1)
        assert r["eval_vs_train"] == round(evaluation["tokens_per_s"] / r["tokens_per_s"], 2)
    assert results[1]["vs_plain"] == 2.0
    table = markdown(
        {"model": "lstm", "preset": "tiny", "evaluation": evaluation, "results": results}
    )
    assert "MFU vs measured peak" in table and f"{results[0]['mfu_vs_measured_peak']} %" in table


def test_quality_reference_recipe_scores_nlms_tokens(tmp_path, data_mirror):
    """`nlm bench quality`'s reference (word_language_model's loop) on a tiny budget: trained on
    the shards' own train stream, scored on exactly the predictions nlm.evaluation scores, with
    the same open-vocabulary bits/byte; the table puts an nlm row against its reference."""
    from nlm.bench.quality import add_ratios, markdown
    from nlm.bench.reference import reference_run, split_stream
    from nlm.evaluation import evaluate_documents, read_documents, token_stream
    from nlm.tokenizers import load_tokenizer, train_tokenizer

    lines = corpus_lines(data_mirror, 200)
    tokenizer = train_tokenizer("word", lines, min_count=2)
    shards = write_shards(tmp_path / "s", lines, seq_len=35, tokenizer=tokenizer)
    rows = load_tokenizer(shards / "tokenizer").encode_batch(lines)
    train = split_stream(shards, "train")
    first = [*rows[1], 3, *rows[2], 3]  # line 0 is val (every 10th), each line then </s>
    assert train[: len(first)].tolist() == first

    documents = read_documents(data_mirror / "wikitext-2" / "test.txt")[:3]
    ref = reference_run("lstm", shards, documents, epochs=1, max_batches=2)
    assert ref["steps"] == 2 and ref["tokens"] == len(token_stream(tokenizer, documents)) - 1
    # same tokens, same accounting as nlm's own evaluation of any model
    nlm_like = evaluate_documents(
        build_model("lstm", "tiny", vocab_size=tokenizer.vocab_size), tokenizer, documents
    )
    assert nlm_like["tokens"] == ref["tokens"] and nlm_like["unk_bytes"] == ref["unk_bytes"] > 0
    assert ref["bits_per_byte"] > ref["bits_per_byte_closed_vocab"] > 0
    transformer = reference_run("transformer", shards, documents, epochs=1, max_batches=1)
    assert transformer["tokens"] == ref["tokens"] and math.isfinite(transformer["ppl"])

    ours = {**ref, "model": "nlm lstm", "kind": "lstm", "ppl": ref["ppl"] / 2}
    table = [ref, transformer, ours]
    add_ratios(table)
    assert ours["ppl_vs_reference"] == 0.5 and ref["ppl_vs_reference"] is None
    assert "| nlm lstm |" in markdown(table)


def test_kneser_ney_bar_scores_every_prediction_of_the_stream(tmp_path, data_mirror):
    """The n-gram bar (KenLM's lmplz + the kenlm module, both built by `make test`): estimated on
    a token stream, it scores each document's tokens and the `</s>` after it, every prediction
    of `</s> doc1 </s> doc2 ...` once; real text scores far better than the same tokens shuffled."""
    import torch

    from nlm.bench.ngram import documents_of, ngram_run
    from nlm.evaluation import token_stream
    from nlm.tokenizers import train_tokenizer

    lines = corpus_lines(data_mirror, 300)
    tokenizer = train_tokenizer("word", lines[:250], min_count=2)
    train, test = token_stream(tokenizer, lines[:250]), token_stream(tokenizer, lines[250:])
    assert [len(d) for d in documents_of(test)] == [
        len(d) for d in tokenizer.encode_batch(lines[250:])
    ]

    real = ngram_run(train, test, 3, tmp_path / "kn")
    assert real["count"] == len(test) - 1
    shuffled = []  # each document's tokens in a random order: the same tokens, no more n-grams
    for d in documents_of(test):
        order = torch.randperm(len(d), generator=torch.Generator().manual_seed(0)).tolist()
        shuffled += [3, *(d[i] for i in order)]
    shuffled = torch.tensor([*shuffled, 3])
    worse = ngram_run(train, shuffled, 3, tmp_path / "kn-shuffled")
    assert worse["count"] == real["count"]
    assert math.exp(worse["total"] / worse["count"]) > 1.5 * math.exp(real["total"] / real["count"])


def test_quality_recipes_file(tmp_path):
    """The recipes file: a config per row, or a mapping with the shards' seq_len, the bar the row
    is measured against and `nlm train` flags; anything else is a one-line error naming it."""
    from nlm.bench.quality import _recipes
    from nlm.errors import NLMError

    (tmp_path / "lstm.yaml").write_text("model: lstm\n")
    good = tmp_path / "recipes.yaml"
    good.write_text(
        "lstm: lstm.yaml\n"
        "lstm-3-epochs: {config: lstm.yaml, bar: lstm, flags: {max_steps: 1760}}\n"
        "gpt: {config: lstm.yaml, seq_len: 64}\n"
    )
    recipes = _recipes(good)
    assert recipes["lstm"] == {
        "config": str(tmp_path / "lstm.yaml"),
        "seq_len": 35,
        "bar": "lstm",
        "flags": [],
    }
    assert recipes["lstm-3-epochs"]["flags"] == ["--max-steps", "1760"]
    assert recipes["gpt"]["seq_len"] == 64 and recipes["gpt"]["bar"] == "gpt"
    for body, words in [
        ("lstm: {config: lstm.yaml, epochs: 3}\n", "lstm: unknown key epochs"),
        (
            "lstm: {config: lstm.yaml, flags: {max_stepz: 5}}\n",
            "--max-stepz is not an nlm train config",
        ),
        ("lstm: {config: lstm.yaml, flags: {lr: abc}}\n", "argument --lr: invalid float"),
        # values are checked as nlm train checks them, and blamed on the row, not the config
        (
            "lstm: {config: lstm.yaml, flags: {max_steps: 0}}\n",
            r"lstm \(lstm.yaml with the row's flags\) \(field 'max_steps'\): must be at least 1",
        ),
        ("lstm: {config: lstm.yaml, flags: {model: nosuch}}\n", "'nosuch' is not one of"),
        ("lstm: {config: lstm.yaml, flags: {model: bert}}\n", "bert is not a causal LM"),
        ("lstm: {config: lstm.yaml, seq_len: -3}\n", "seq_len -3: an integer >= 2"),
        ("lstm: {config: lstm.yaml, bar: transformer}\n", "no bar for 'transformer'"),
        ("t5: lstm.yaml\n", "no bar for 't5'"),
        ("lstm: missing.yaml\n", "no such config file"),
        ("lstm: [1\n", "cannot read the recipes"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(body)
        with pytest.raises(NLMError, match=words) as caught:
            _recipes(bad)
        assert str(bad) in str(caught.value) and "\n" not in str(caught.value)
