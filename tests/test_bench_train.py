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
    from nlm.bench.quality import add_ratios, markdown, reference_run, split_stream
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
