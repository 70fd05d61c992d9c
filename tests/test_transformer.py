"""The encoder-decoder Transformer against the textbook (Vaswani et al. 2017; the course notes'
section 7): encoder-decoder attention worked by hand, masked self-attention, teacher forcing
equal to cached step-by-step decoding, and the residual + LayerNorm sub-layer's formula."""

from __future__ import annotations

import math
import re

import pytest
import torch

from nlm.errors import NLMError
from nlm.models import build_model
from nlm.models.transformer import SubLayer, TransformerConfig, shift_right

V = 97


def tiny(**overrides):
    torch.manual_seed(0)
    return build_model("transformer", "tiny", vocab_size=V, **overrides).eval()


def test_encoder_decoder_attention_worked_by_hand():
    # One head of width 2. The query comes from the decoder state y = (1, 0) through W_q = 2I;
    # keys and values from the two encoder states m1 = (1, 0), m2 = (0, 1) through W_k = W_v = I.
    #   q = (2, 0);  scores = q.k / sqrt(2) = (2/sqrt(2), 0) = (1.41421, 0)
    #   softmax = (e^1.41421, 1) / (e^1.41421 + 1) = (4.11325, 1) / 5.11325 = (0.80443, 0.19557)
    #   output = 0.80443 v1 + 0.19557 v2 = (0.80443, 0.19557)     (W_o = I, no biases)
    model = build_model("transformer", "tiny", vocab_size=V, n_embd=2, n_head=1, ffn_size=4)
    attn = model.decoder[0].cross_attn
    with torch.no_grad():
        for linear, scale in ((attn.q, 2.0), (attn.k, 1.0), (attn.v, 1.0), (attn.out, 1.0)):
            linear.weight.copy_(scale * torch.eye(2))
            linear.bias.zero_()
    decoder_state = torch.tensor([[[1.0, 0.0]]])  # (B=1, T=1, C=2)
    encoder_states = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, S=2, C=2)
    out = attn(decoder_state, *attn.keys_values(encoder_states))
    torch.testing.assert_close(out, torch.tensor([[[0.80443, 0.19557]]]), atol=1e-5, rtol=0)
    # The roles matter: the same states with the decoder's as keys give a different answer.
    swapped = attn(encoder_states[:, :1], *attn.keys_values(decoder_state))
    assert not torch.allclose(swapped, out)


def test_the_decoder_reads_the_source_only_through_cross_attention_of_the_encoder_output():
    model = tiny()
    src = torch.randint(7, V, (2, 7))
    tgt = torch.randint(7, V, (2, 5))
    with torch.no_grad():
        out = model(src, targets=tgt)
        memory, _ = model.encode(src)
        again = model.lm_head(model.decode(shift_right(tgt), memory))
        changed = model(src.flip(1), targets=tgt)
    torch.testing.assert_close(out.hidden, memory)
    torch.testing.assert_close(out.logits, again)
    assert not torch.allclose(changed.logits, out.logits)  # the source does matter


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_masked_decoder_self_attention_never_looks_ahead(norm):
    model = tiny(norm=norm)
    src = torch.randint(7, V, (2, 6))
    dec_in = torch.randint(7, V, (2, 8))
    with torch.no_grad():
        base = model(src, decoder_input_ids=dec_in).logits
        for t in range(1, 8):
            changed = dec_in.clone()
            changed[:, t] = (changed[:, t] - 7 + 1) % (V - 7) + 7
            logits = model(src, decoder_input_ids=changed).logits
            torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=0)
            assert not torch.allclose(logits[:, t:], base[:, t:])


@pytest.mark.parametrize(
    "overrides", [{}, {"norm": "pre"}, {"share_embeddings": False, "tie_weights": False}]
)
def test_teacher_forced_logits_equal_step_by_step_decoding_with_the_cache(overrides):
    model = tiny(**overrides)
    src = torch.randint(7, V, (3, 9))
    tgt = torch.randint(7, V, (3, 6))
    with torch.no_grad():
        teacher_forced = model(src, targets=tgt).logits
        logits, cache = model.prefill(src, None, max_new_tokens=6)
        steps = [logits]
        for t in range(5):
            logits, cache = model.decode_step(tgt[:, t], cache)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, dim=1), teacher_forced, atol=1e-5, rtol=1e-5)
    # The cross-attention keys/values were computed once, from the encoder output.
    memory, _ = model.encode(src)
    k, v = model.decoder[1].cross_attn.keys_values(memory)
    torch.testing.assert_close(cache.memory_keys[1], k)
    torch.testing.assert_close(cache.memory_values[1], v)
    assert cache.self_attn.length == 6


def test_padded_and_joined_sources_decode_as_they_would_alone():
    model = tiny()
    long_src, short_src = torch.randint(7, V, (1, 9)), torch.randint(7, V, (1, 4))
    tgt = torch.randint(7, V, (2, 3))
    with torch.no_grad():
        alone = [model.prefill(s, None, 4) for s in (long_src, short_src)]
        padded = torch.cat([long_src, torch.cat([torch.zeros(1, 5).long(), short_src], 1)])
        mask = (padded != 0).long()
        mask[0] = 1
        together, cache = model.prefill(padded, mask, 4)
        torch.testing.assert_close(together, torch.cat([a[0] for a in alone]), atol=1e-5, rtol=0)
        # Continuous batching: caches of different sources joined, then one row selected.
        joined = model.join_caches([alone[0][1], alone[1][1]])
        step, joined = model.decode_step(tgt[:, 0], joined)
        one, _ = model.decode_step(tgt[1:, 0], alone[1][1])
        torch.testing.assert_close(step[1:], one, atol=1e-5, rtol=0)
        sel, _ = model.decode_step(tgt[1:, 1], model.select_cache(joined, torch.tensor([1])))
        ref, _ = model.decode_step(tgt[1:, 1], alone[1][1])
        torch.testing.assert_close(sel, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_residual_and_layer_norm_sub_layer_is_the_notes_formula(norm):
    torch.manual_seed(1)
    config = TransformerConfig(n_embd=6, n_head=2, norm=norm, dropout=0.0)
    sub = SubLayer(config)
    with torch.no_grad():
        sub.norm.weight.copy_(torch.rand(6) + 0.5)
        sub.norm.bias.copy_(torch.randn(6))
    w = torch.randn(6, 6)

    def f(h):  # any sub-layer
        return torch.tanh(h @ w)

    def layer_norm(h):  # Ba et al. 2016: (h - mean) / sqrt(var + eps) * gain + bias
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(
            var + config.layer_norm_eps
        ) * sub.norm.weight + sub.norm.bias

    x = torch.randn(2, 3, 6)
    expected = layer_norm(x + f(x)) if norm == "post" else x + f(layer_norm(x))
    torch.testing.assert_close(sub(x, f), expected, atol=1e-5, rtol=1e-5)


def test_inputs_are_scaled_embeddings_plus_sinusoids():
    model = tiny()
    ids = torch.tensor([[9, 10, 11]])
    table = model.source_tokens.weight
    x = model._embed(model.source_tokens, ids, torch.arange(3))
    pos, i = 2, 3  # PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
    d = model.config.n_embd
    expected = table[11, 2 * i + 1] * math.sqrt(d) + math.cos(pos / 10000 ** (2 * i / d))
    assert abs(float(x[0, 2, 2 * i + 1].detach()) - float(expected.detach())) < 1e-5


def test_shared_or_separate_embeddings_and_lengths_are_checked():
    shared, separate = tiny(), tiny(share_embeddings=False)
    assert shared.target_tokens is shared.source_tokens
    assert separate.target_tokens is not separate.source_tokens
    assert separate.num_parameters() - shared.num_parameters() == V * 32
    limit = shared.max_positions
    with pytest.raises(NLMError, match="source of 65 tokens is longer than the model's max_pos"):
        shared.prefill(torch.randint(7, V, (1, limit + 1)), None, 4)
    with pytest.raises(NLMError, match="target of 65 tokens"):
        shared(torch.randint(7, V, (1, 3)), targets=torch.randint(7, V, (1, limit + 1)))
    with pytest.raises(NLMError, match="field 'norm'"):
        tiny(norm="sandwich")


def test_greedy_generation_is_the_argmax_of_teacher_forcing_on_its_own_output():
    model = tiny()
    src = torch.randint(7, V, (2, 6))
    ids, logprobs = model.generate(src, 4, temperature=0.0)
    with torch.no_grad():
        logits = model(src, targets=ids).logits
    assert torch.equal(logits.argmax(-1), ids)
    chosen = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(logprobs, chosen, atol=1e-5, rtol=0)


def test_span_corruption_splits_a_row_into_input_and_targets_that_rebuild_it():
    import random

    from nlm.objectives import max_spans, span_corrupt

    ids = list(range(10, 50))  # 40 tokens: 6 noise tokens in 2 spans
    inputs, targets = span_corrupt(ids, 1000, random.Random(3), 0.15, 3.0)
    assert inputs[-1] == targets[-1] == 3  # both end with </s>
    sentinels = [t for t in targets if t >= 1000]
    assert sentinels == [1000, 1001] == [t for t in inputs if t >= 1000]
    assert len(targets) - 1 - len(sentinels) == 6 == max_spans(40, 0.15, 3.0) * 3
    # Put each span back in place of its sentinel: the row comes back.
    spans, current = {}, None
    for t in targets[:-1]:
        current = t if t >= 1000 else current
        spans.setdefault(current, []).extend([] if t >= 1000 else [t])
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t >= 1000 else [t])]
    assert rebuilt == ids
    assert span_corrupt(ids, 1000, random.Random(3), 0.15, 3.0) == (inputs, targets)


def test_the_engine_generates_from_a_source_and_scores_a_target_given_it(tmp_path):
    from nlm.checkpoint import load_checkpoint, save_checkpoint
    from nlm.inference import Engine, RequestError, generate_batch, seq2seq_token_logprobs
    from nlm.tokenizers import train_tokenizer

    docs = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"]
    tokenizer = train_tokenizer("word", docs)
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", vocab_size=tokenizer.vocab_size + 3)
    engine = Engine(load_checkpoint(save_checkpoint(tmp_path / "m", model, tokenizer)))
    assert engine.endpoints == ("generate", "score", "embed", "neighbors")

    # /v1/generate: the prompt is the source (closed by </s>); continuous batching of two
    # sources of different lengths gives what each would alone.
    jobs = [
        engine.generation_job(p, 5, temperature=0.0, stop_at_eos=False)
        for p in ("the cat sat on the mat", "a dog")
    ]
    assert jobs[1].ids == [*tokenizer.encode("a dog"), 3]
    together = engine.generate(jobs)
    alone = [engine.generate([job])[0] for job in jobs]
    assert [a["token_ids"] for a in together] == [a["token_ids"] for a in alone]
    with torch.no_grad():
        expected, _ = engine.model.generate(torch.tensor([jobs[0].ids]), 5, temperature=0.0)
    assert together[0]["token_ids"] == expected[0].tolist()
    assert generate_batch(engine.model, jobs[:1])[0][0] == expected[0].tolist()

    # /v1/score: log p(target | source), the target closed by </s>
    (scored,) = engine.score([engine.score_job("the cat", source="a cat")])
    (logp,) = seq2seq_token_logprobs(
        engine.model, [[*tokenizer.encode("a cat"), 3]], [[*tokenizer.encode("the cat"), 3]]
    )
    assert scored["measure"] == "conditional log-likelihood" and scored["num_tokens"] == 3
    assert abs(scored["logprob"] - float(logp.sum())) < 1e-5
    with torch.no_grad():  # the same number the teacher-forced training loss gives
        src = torch.tensor([[*tokenizer.encode("a cat"), 3]])
        tgt = torch.tensor([[*tokenizer.encode("the cat"), 3]])
        loss = engine.model(src, targets=tgt).loss
    assert abs(scored["logprob"] + 3 * float(loss)) < 1e-4

    # /v1/embed: the mean of the encoder's states over the text (batched as alone)
    (vector,) = engine.embed([engine.embed_job("a cat")])
    with torch.no_grad():
        memory, _ = engine.model.encode(torch.tensor([[*tokenizer.encode("a cat"), 3]]))
    torch.testing.assert_close(torch.tensor(vector), memory[0, :2].mean(0), atol=1e-5, rtol=0)
    both = engine.embed([engine.embed_job("a cat"), engine.embed_job("the cat sat on the mat")])
    torch.testing.assert_close(torch.tensor(both[0]), torch.tensor(vector), atol=1e-5, rtol=0)

    # bad input: a 4xx naming the field
    with pytest.raises(RequestError, match="field 'source': required") as missing:
        engine.score_job("the cat")
    assert missing.value.status == 422
    long_source = " ".join(["cat"] * (model.max_positions + 1))
    with pytest.raises(RequestError, match="field 'prompt': input too long") as too_long:
        engine.generation_job(long_source, 4)
    assert too_long.value.status == 400


def _jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_seq2seq_jsonl_rows_without_source_or_target_are_named(tmp_path):
    from nlm.finetune.data import read_examples

    good = {"source": "a b", "target": "b a"}
    path = _jsonl(tmp_path / "bad.jsonl", [good, {"source": "a b"}])
    with pytest.raises(NLMError, match=r"bad\.jsonl:2 \(field 'target'\): missing"):
        read_examples(path, "seq2seq")
    path = _jsonl(tmp_path / "bad2.jsonl", [{"target": "x"}])
    with pytest.raises(NLMError, match=r"bad2\.jsonl:1 \(field 'source'\): missing"):
        read_examples(path, "seq2seq")
    path = _jsonl(tmp_path / "bad3.jsonl", [good, good, {"source": 3, "target": "x"}])
    with pytest.raises(NLMError, match=r"bad3\.jsonl:3 \(field 'source'\): expected a string"):
        read_examples(path, "seq2seq")


def test_seq2seq_finetuning_trains_exports_and_serves(process_group, tmp_path):
    import json

    """`nlm finetune --task seq2seq`'s worker without Ray (one rank, ZeRO-2): reversing two
    words, then the exported checkpoint generates through the serving engine."""
    from nlm.checkpoint import load_checkpoint, save_checkpoint
    from nlm.cluster.finetune.loop import Seq2SeqWorker
    from nlm.finetune.config import FinetuneConfig
    from nlm.finetune.plan import plan_finetune
    from nlm.inference import Engine
    from nlm.tokenizers import train_tokenizer

    words = "red green blue black white pink gray gold".split()
    pairs = [(a, b) for a in words for b in words if a != b]
    tokenizer = train_tokenizer("word", [" ".join(words)])
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", vocab_size=tokenizer.vocab_size + 2)
    base = save_checkpoint(tmp_path / "base", model, tokenizer)
    rows = [{"source": f"{a} {b}", "target": f"{b} {a}"} for a, b in pairs]
    train, evaluation = (
        _jsonl(tmp_path / "train.jsonl", rows),
        _jsonl(tmp_path / "eval.jsonl", rows[:8]),
    )
    config = FinetuneConfig.from_dict(
        dict(checkpoint=str(base), task="seq2seq", train=str(train), eval=str(evaluation),
             out=str(tmp_path / "run"), micro_batch=14, max_steps=60, lr=3e-3, zero_stage=2,
             log_every=20, eval_every=30)
    )  # fmt: skip
    plan, payload = plan_finetune(config)
    assert plan.task == "seq2seq" and payload["train"][0]["target_ids"][-1] == 3
    worker = Seq2SeqWorker(plan, payload, 0, 1, 1, torch.device("cpu"))
    worker.run()
    exported = load_checkpoint(tmp_path / "run")
    assert exported.family == "transformer" and exported.metrics["eval_ppl"] < 3.0
    assert exported.metrics["export_max_abs_logit_diff"] <= 1e-5
    evals = [r["eval_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
             if "eval_loss" in r]  # fmt: skip
    assert len(evals) >= 2 and evals[-1] < evals[0]
    engine = Engine(exported)
    (answer,) = engine.generate([engine.generation_job("red blue", 3, temperature=0.0)])
    with torch.no_grad():
        greedy, _ = exported.model.generate(torch.tensor([[*tokenizer.encode("red blue"), 3]]), 3,
                                            temperature=0.0)  # fmt: skip
    assert answer["token_ids"] == greedy[0].tolist()[: len(answer["token_ids"])]
    assert sorted(answer["text"].split()) == ["blue", "red"]  # it learned to answer in its words
    with pytest.raises(NLMError, match="needs an encoder-decoder"):  # a causal checkpoint
        gpt = build_model("gpt", "tiny", vocab_size=tokenizer.vocab_size)
        plan_finetune(
            config.replace(
                checkpoint=str(save_checkpoint(tmp_path / "g", gpt, tokenizer)),
                out=str(tmp_path / "r2"),
            )
        )


def test_nlm_finetune_seq2seq_refuses_bad_jsonl_in_one_line(tmp_path, capsys):
    """`nlm finetune train --task seq2seq`: a row without `source` or `target`, and a source
    longer than the encoder's positions, each exit 2 with one line naming file:line and field,
    before anything is written (plan_seq2seq runs before Ray starts)."""
    from nlm.checkpoint import save_checkpoint
    from nlm.cli import main
    from nlm.tokenizers import train_tokenizer

    tokenizer = train_tokenizer("word", ["a b c d"])
    torch.manual_seed(0)
    model = build_model("transformer", "tiny", vocab_size=tokenizer.vocab_size)
    base = save_checkpoint(tmp_path / "base", model, tokenizer)
    good = {"source": "a b", "target": "b a"}
    too_long = " ".join(["a"] * model.max_positions)  # + </s>: one past the positions
    cases = (
        ([good, {"target": "a"}], r"bad\.jsonl:2 \(field 'source'\): missing"),
        ([good, good, {"source": "a"}], r"bad\.jsonl:3 \(field 'target'\): missing"),
        ([good, {"source": too_long, "target": "a"}],
         rf"bad\.jsonl:2 \(field 'source'\): {model.max_positions + 1} tokens with </s>, longer "
         rf"than the model's {model.max_positions} positions"),
    )  # fmt: skip
    evaluation = _jsonl(tmp_path / "eval.jsonl", [good])
    for rows, message in cases:
        bad = _jsonl(tmp_path / "bad.jsonl", rows)
        out = tmp_path / "run"
        with pytest.raises(SystemExit) as exit_:
            main(["finetune", "train", "--checkpoint", str(base), "--task", "seq2seq",
                  "--train", str(bad), "--eval", str(evaluation), "--out", str(out)])  # fmt: skip
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("nlm: error: "), err
        assert re.search(message, err), err
        assert not out.exists()
