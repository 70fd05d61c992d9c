"""elmo (Peters et al. 2018): the two directions, their isolation, the shared embedding and
softmax, the residual layers, the layer mix, its two perplexities and its serving engine. Tiny
models, plain PyTorch, no Ray (its training under DeepSpeed is in tests/test_train.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlm.checkpoint import load_checkpoint, save_checkpoint
from nlm.errors import NLMError
from nlm.evaluation import evaluate_documents, token_stream
from nlm.inference import Engine, RequestError
from nlm.models import build_model
from nlm.tokenizers import train_tokenizer

V = 61


def tiny(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("elmo", "tiny", vocab_size=V, **changes).eval()


def test_both_directions_share_one_embedding_and_one_softmax():
    model = tiny()
    assert model.decoder.weight is model.embedding.weight  # tied: the softmax is the table
    untied = tiny(tie_weights=False)
    assert untied.decoder.weight is not untied.embedding.weight
    # one softmax (decoder) and one embedding for both stacks: no other vocabulary-sized matrix
    big = [n for n, p in untied.named_parameters() if p.shape[0] == V]
    assert sorted(big) == ["decoder.bias", "decoder.weight", "embedding.weight"]
    ids = torch.randint(7, V, (2, 7))
    with torch.no_grad():
        fwd = model.forward_layers[0](model.embedding(ids))[0]
        fwd = model.forward_layers[1](fwd)[0] + fwd  # residual
        bwd = model.backward_layers[0](model.embedding(ids).flip(1))[0]
        bwd = (model.backward_layers[1](bwd)[0] + bwd).flip(1)
        out = model(ids)
    torch.testing.assert_close(out.logits, model.decoder(fwd))
    # backward_logits[:, t] reads t+1.. (the state one position right); the last sees nothing
    torch.testing.assert_close(out.backward_logits[:, :-1], model.decoder(bwd[:, 1:]))
    torch.testing.assert_close(out.backward_logits[:, -1], model.decoder.bias.expand(2, V))


def test_each_direction_sees_only_its_own_side():
    model = tiny()
    ids = torch.randint(7, V, (2, 9))
    changed = ids.clone()
    k = 4
    changed[:, k] = (changed[:, k] - 7 + 1) % (V - 7) + 7
    with torch.no_grad():
        a, b = model(ids), model(changed)
        la, lb = model.layer_states(ids), model.layer_states(changed)
    e = model.config.embed_dim
    # forward: positions before k never see it; backward: positions after k never see it
    torch.testing.assert_close(a.logits[:, :k], b.logits[:, :k], rtol=0, atol=0)
    assert not torch.allclose(a.logits[:, k:], b.logits[:, k:])
    torch.testing.assert_close(a.backward_logits[:, k:], b.backward_logits[:, k:], rtol=0, atol=0)
    assert not torch.allclose(a.backward_logits[:, :k], b.backward_logits[:, :k])
    torch.testing.assert_close(la[1:, :, :k, :e], lb[1:, :, :k, :e], rtol=0, atol=0)
    torch.testing.assert_close(la[1:, :, k + 1 :, e:], lb[1:, :, k + 1 :, e:], rtol=0, atol=0)
    assert not torch.allclose(la[1:, :, k:, :e], lb[1:, :, k:, :e])
    assert not torch.allclose(la[1:, :, : k + 1, e:], lb[1:, :, : k + 1, e:])


def test_residual_connections_between_layers():
    ids = torch.randint(7, V, (1, 6))
    with_res, without = tiny(), tiny(residual=False)
    with torch.no_grad():
        x = with_res.embedding(ids)
        h1 = with_res.forward_layers[0](x)[0]
        h2 = with_res.forward_layers[1](h1)[0]
        states = with_res.layer_states(ids)
        plain = without.layer_states(ids)
    e = with_res.config.embed_dim
    torch.testing.assert_close(states[1, ..., :e], h1)  # the first layer has no residual
    torch.testing.assert_close(states[2, ..., :e], h2 + h1)
    torch.testing.assert_close(plain[2, ..., :e], h2)  # same weights (same seed), no residual


def test_the_layer_mix_is_gamma_times_softmax_weighted_sum():
    model = tiny()
    ids = torch.randint(7, V, (2, 5))
    with torch.no_grad():
        layers = model.layer_states(ids)
        assert layers.shape == (3, 2, 5, 2 * model.config.embed_dim)
        emb = model.embedding(ids)
        torch.testing.assert_close(layers[0], torch.cat([emb, emb], -1))  # h_0 = [x; x]
        uniform = model(ids).hidden  # s = 0, γ = 1 by default: the plain mean of the layers
        torch.testing.assert_close(uniform, layers.mean(0))
        model.mix_weights.copy_(torch.tensor([0.3, -1.0, 2.0]))
        model.mix_scale.fill_(2.5)
        s = torch.softmax(torch.tensor([0.3, -1.0, 2.0]), 0)
        expected = 2.5 * (s[0] * layers[0] + s[1] * layers[1] + s[2] * layers[2])
        torch.testing.assert_close(model(ids).hidden, expected)


def test_loss_is_the_mean_of_both_directions_nll():
    model = tiny()
    row = torch.randint(7, V, (3, 10))
    x, y = row[:, :-1], row[:, 1:]
    out = model(x, targets=y)
    forward = F.cross_entropy(out.logits.reshape(-1, V), y.reshape(-1))
    backward = F.cross_entropy(out.backward_logits.reshape(-1, V), x.reshape(-1))
    torch.testing.assert_close(out.direction_losses["forward"], forward)
    torch.testing.assert_close(out.direction_losses["backward"], backward)
    torch.testing.assert_close(out.loss, (forward + backward) / 2)
    # the backward LM of the whole row is the forward LM's mirror: it reads y to predict x
    with torch.no_grad():
        alone = model(row).backward_logits[:, :-1]
    torch.testing.assert_close(out.backward_logits, alone)
    out.loss.backward()
    assert all(p.grad is not None for p in model.backward_layers.parameters())


def test_padding_either_side_changes_nothing():
    model = tiny()
    ids = torch.randint(7, V, (1, 5))
    with torch.no_grad():
        alone = model(ids)
        right = model(torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                      attention_mask=torch.tensor([[1] * 5 + [0] * 3]))  # fmt: skip
        left = model(torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1),
                     attention_mask=torch.tensor([[0, 0] + [1] * 5]))  # fmt: skip
    torch.testing.assert_close(right.hidden[:, :5], alone.hidden)
    torch.testing.assert_close(left.hidden[:, 2:], alone.hidden)
    torch.testing.assert_close(right.backward_logits[:, :4], alone.backward_logits[:, :4])


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    docs = ["the bank of the river", "the bank lends money", "a river and a bank"] * 3
    tokenizer = train_tokenizer("word", docs)
    root = tmp_path_factory.mktemp("elmo")
    engines = {}
    for family in ("elmo", "bert", "gpt"):
        torch.manual_seed(0)
        model = build_model(family, "tiny", vocab_size=tokenizer.vocab_size)
        engines[family] = Engine(load_checkpoint(save_checkpoint(root / family, model, tokenizer)))
    return docs, engines


def test_eval_reports_forward_and_backward_perplexity(trio):
    docs, engines = trio
    model, tokenizer = engines["elmo"].model, engines["elmo"].tokenizer
    stream = token_stream(tokenizer, docs)
    whole = evaluate_documents(model, tokenizer, docs, seq_len=len(stream) - 1)
    with torch.no_grad():
        out = model(stream[None, :-1], targets=stream[None, 1:])
    # one window: exactly the model's two losses over the stream
    assert whole["nll"] == pytest.approx(out.direction_losses["forward"].item(), abs=1e-5)
    assert whole["backward_nll"] == pytest.approx(out.direction_losses["backward"].item(), abs=1e-5)
    windows = evaluate_documents(model, tokenizer, docs, seq_len=8, stride=3)
    assert windows["tokens"] == len(stream) - 1 and windows["backward_ppl"] > 1
    assert windows["bits_per_byte"] > 0 and windows["ppl_kind"] == "causal"


def test_engine_embeds_per_token_and_pooled_and_never_generates(trio):
    _, engines = trio
    elmo = engines["elmo"]
    assert elmo.endpoints == ("score", "embed", "neighbors")
    with pytest.raises(RequestError, match="does not apply"):
        elmo.generation_job("the bank", 3)
    texts = ["the bank of the river", "the bank lends money"]
    for family, engine in engines.items():
        jobs = [engine.embed_job(t, "token") for t in texts]
        tokens = engine.embed(jobs)
        pooled = engine.embed([engine.embed_job(t) for t in texts])
        alone = engine.embed(jobs[1:])[0]
        assert tokens[0]["tokens"] == ["the", "bank", "of", "the", "river"], family
        assert len(tokens[1]["embeddings"]) == 4
        assert len(tokens[0]["embeddings"][0]) == engine.model.hidden_size
        mean = torch.tensor(tokens[0]["embeddings"]).mean(0)
        torch.testing.assert_close(mean, torch.tensor(pooled[0]))
        torch.testing.assert_close(
            torch.tensor(alone["embeddings"]),
            torch.tensor(tokens[1]["embeddings"]),
            atol=1e-5,
            rtol=0,
        )
    # elmo: "bank" differs by context (the backward direction reads what follows)
    first, second = (torch.tensor(t["embeddings"][1]) for t in engines["elmo"].embed(
        [elmo.embed_job(t, "token") for t in texts]))  # fmt: skip
    assert not torch.allclose(first, second)
    with pytest.raises(RequestError, match="field 'granularity'") as caught:
        elmo.embed_job("the bank", "word")
    assert caught.value.status == 422


def test_engine_scores_elmo_by_its_forward_direction(trio):
    _, engines = trio
    elmo = engines["elmo"]
    job = elmo.score_job("the bank lends money")
    with torch.no_grad():
        logits = elmo.model(torch.tensor([job.ids])).logits[0]
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(job.ids[1:])[:, None])
    (answer,) = elmo.score([job])
    assert answer["measure"] == "log-likelihood" and answer["num_tokens"] == 4
    assert answer["logprob"] == pytest.approx(float(logp.sum()), abs=1e-4)
    assert math.isfinite(answer["bits_per_byte"])
    assert len(elmo.neighbors("bank", 2)) == 2


def test_kmeans_finds_two_senses_and_separation_measures_them():
    from nlm.study.contextual import kmeans, separation

    generator = torch.Generator().manual_seed(0)
    a = torch.tensor([5.0, 0, 0]) + 0.1 * torch.randn(10, 3, generator=generator)
    b = torch.tensor([0, 5.0, 0]) + 0.1 * torch.randn(6, 3, generator=generator)
    labels = kmeans(torch.cat([a, b]), 2, seed=1)
    assert len(set(labels[:10].tolist())) == len(set(labels[10:].tolist())) == 1
    assert labels[0] != labels[10]
    assert separation(torch.cat([a, b]), labels) > 0.95
    assert separation(torch.cat([a, b]), torch.zeros(16, dtype=torch.long)) == pytest.approx(0)


def test_contextual_study_writes_its_report(trio, tmp_path):
    from nlm.study.contextual import run_contextual

    docs, engines = trio
    ckpts = {name: e.checkpoint.path for name, e in engines.items() if name != "gpt"}
    static = {"gpt": engines["gpt"].checkpoint.path}
    report = run_contextual(docs, ckpts, static, tmp_path, n_words=1, candidates=3,
                            occurrences_per_word=6, k=3)  # fmt: skip
    (entry,) = report["words"]
    assert entry["word"] in {"the", "bank", "river"} and len(entry["static"]["gpt"]) == 3
    for name in ("elmo", "bert"):
        clusters = entry["models"][name]["clusters"]
        assert sum(c["size"] for c in clusters) == entry["occurrences"] == 6
        assert all(len(c["neighbours"]) == 3 and entry["word"] not in c["neighbours"]
                   for c in clusters)  # fmt: skip
    assert (tmp_path / "contextual.png").stat().st_size > 0
    assert "## " + entry["word"] in (tmp_path / "contextual.md").read_text()
    with pytest.raises(NLMError, match="--words: 'qqq'"):
        run_contextual(docs, ckpts, static, tmp_path, words=["qqq"])
