"""`nlm bench train`'s efficiency columns without Ray: the matmul peak it measures, MFU against
it from the model's own FLOPs per token, and evaluation tokens/s next to training tokens/s.
(The nlm train runs themselves are the benchmark's, not a test's: they start Ray.)"""

from __future__ import annotations

import argparse

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
