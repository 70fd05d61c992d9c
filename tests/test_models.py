"""The model families: one interface, training works, causality, generation, persistence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlm.errors import NLMError
from nlm.models import FAMILIES, build_model, model_class
from nlm.models.base import CausalLanguageModel
from nlm.models.gpt import sinusoidal_positions
from nlm.models.presets import preset_config
from nlm.objectives import mask_tokens

V = 97  # small vocabulary; ids 0..6 are the specials
CAUSAL = ["fnn", "rnn", "lstm", "gpt"]
# Every causal variant the generation tests must hold for.
CAUSAL_VARIANTS = [
    ("fnn", {}),
    ("fnn", {"direct": True, "hidden_size": 24}),
    ("fnn", {"combine": "mean", "activation": "relu"}),
    ("rnn", {"n_layer": 2}),
    ("lstm", {"n_layer": 2}),
    ("lstm", {"peephole": True, "n_layer": 2}),
    ("gpt", {}),
    ("gpt", {"positions": "sinusoidal"}),
]
VARIANT_IDS = [f + "".join(f"-{k}={v}" for k, v in o.items()) for f, o in CAUSAL_VARIANTS]


def make(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(family, "tiny", vocab_size=V, **overrides)


def batch(b: int = 4, t: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(7, V, (b, t + 1), generator=g)


def train_steps(model, steps: int = 15) -> list[float]:
    """Losses of a few Adam steps on one fixed batch."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    rows = batch()
    g = torch.Generator().manual_seed(2)
    # causal, elmo's two directions, seq2seq (teacher forced)
    if model.objective in ("clm", "span"):
        inputs = dict(input_ids=rows[:, :-1], targets=rows[:, 1:])
    else:
        masked, labels = mask_tokens(rows, V, generator=g, mask_prob=0.3)
        inputs = dict(input_ids=masked, mlm_labels=labels, nsp_labels=torch.tensor([0, 1, 0, 1]))
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**inputs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_lowers_the_loss(family):
    losses = train_steps(make(family))
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_interface_shapes(family):
    model = make(family).eval()
    x = batch(2, 9)[:, :-1]
    # the encoder-decoder: the decoder reads x too (without, it takes one step from <s>)
    out = model(x, decoder_input_ids=x) if family == "transformer" else model(x)
    assert out.logits.shape == (2, 9, V)
    assert out.hidden.shape[:2] == (2, 9)
    assert out.loss is None
    assert model.input_embeddings().weight.shape[0] == V
    assert model.output_embeddings().shape[0] == V
    assert model.family == family and isinstance(model.config, model.config_class)
    if family == "bert":
        assert out.nsp_logits.shape == (2, 2)
        assert not model.causal
    elif family == "elmo":  # bidirectional: no generation; its backward LM's logits beside
        assert not model.causal and out.backward_logits.shape == (2, 9, V)
    elif family == "transformer":
        assert not model.causal and out.hidden.shape == (2, 9, model.hidden_size)
    else:
        assert model.causal and isinstance(model, CausalLanguageModel)


@pytest.mark.parametrize("family,overrides", CAUSAL_VARIANTS, ids=VARIANT_IDS)
def test_causal_models_never_look_ahead(family, overrides):
    model = make(family, **overrides).eval()
    x = batch(2, 10)[:, :-1]
    t = 4
    changed = x.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 5 - 7) % (V - 7) + 7  # another ordinary token
    with torch.no_grad():
        a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1])  # the change is seen from t+1 on


@pytest.mark.parametrize("family,overrides", CAUSAL_VARIANTS, ids=VARIANT_IDS)
def test_incremental_generation_equals_full_recomputation(family, overrides):
    model = make(family, **overrides).eval()
    prompt = batch(2, 5)[:, :-1]
    new, logprobs = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert new.shape == (2, 6) and new.dtype == torch.long and logprobs.shape == (2, 6)
    seq = prompt
    with torch.no_grad():
        for i in range(6):
            last = F.log_softmax(model(seq).logits[:, -1], dim=-1)
            assert torch.equal(last.argmax(-1), new[:, i])
            torch.testing.assert_close(
                last.gather(1, new[:, i, None])[:, 0], logprobs[:, i], atol=1e-5, rtol=0
            )
            seq = torch.cat([seq, new[:, i, None]], dim=1)


@pytest.mark.parametrize("family,overrides", CAUSAL_VARIANTS, ids=VARIANT_IDS)
def test_left_padded_batch_generates_what_each_prompt_would_alone(family, overrides):
    model = make(family, **overrides).eval()
    rows = batch(3, 8)
    prompts = [rows[0, :3], rows[1, :8], rows[2, :5]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = p
        mask[r, width - len(p) :] = 1
    ids[0, 0] = 42  # garbage under the mask must not matter
    new, logprobs = model.generate(ids, 7, temperature=0, attention_mask=mask)
    for r, p in enumerate(prompts):
        alone, alone_lp = model.generate(p[None], 7, temperature=0)
        assert torch.equal(new[r], alone[0]), f"row {r}"
        torch.testing.assert_close(logprobs[r], alone_lp[0], atol=1e-5, rtol=0)
    # Scoring a left-padded batch gives each prompt's own logits at its real positions.
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for r, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            torch.testing.assert_close(padded[r, width - len(p) :], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", CAUSAL)
def test_sampling_is_seeded_and_respects_top_k(family):
    model = make(family).eval()
    prompt = batch(2, 4)[:, :-1]

    def sample(seed, **kw):
        return model.generate(prompt, 8, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = sample(3, temperature=1.5), sample(3, temperature=1.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # top_k=1 is greedy whatever the temperature; logprobs stay the model's own (temperature 1).
    greedy = model.generate(prompt, 8, temperature=0)
    top1 = sample(4, temperature=2.0, top_k=1)
    assert torch.equal(top1[0], greedy[0])
    torch.testing.assert_close(top1[1], greedy[1])
    tiny_p = sample(5, temperature=1.0, top_p=1e-6)
    assert torch.equal(tiny_p[0], greedy[0])


def test_generate_rejects_bad_arguments():
    model = make("gpt")
    prompt = batch(1, 4)[:, :-1]
    for kwargs in ({"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(NLMError):
            model.generate(prompt, 3, **kwargs)
    with pytest.raises(NLMError, match="left-padded"):
        model.generate(prompt, 3, attention_mask=torch.tensor([[1, 1, 0, 1]]))
    with pytest.raises(NLMError, match="max_positions"):
        model.generate(prompt, 64)  # tiny gpt: block 64, prompt 4
    assert model.generate(prompt, 0)[0].shape == (1, 0)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_input_longer_than_max_positions_is_an_nlm_error(family):
    model = make(family)
    assert model.max_positions == 64
    with pytest.raises(NLMError, match="max_positions 64"):
        model(torch.full((1, 65), 9))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_config_json_round_trip(family):
    model = make(family)
    cls = model_class(family).config_class
    again = cls.from_json(model.config.to_json())
    assert again == model.config
    with pytest.raises(NLMError, match="unknown field 'nope'"):
        cls.from_dict({**model.config.to_dict(), "nope": 1})


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(NLMError, match="known: tiny, small, base, notes"):
        preset_config("lstm", "huge")
    with pytest.raises(NLMError, match="known: tiny, small, base"):
        build_model("gpt", "notes")
    assert preset_config("gpt", "base")["n_layer"] == 12


def test_base_presets_have_the_published_sizes():
    with torch.device("meta"):  # no memory, no init cost
        gpt = build_model("gpt", "base")
        bert = build_model("bert", "base")
    assert 124_000_000 < gpt.num_parameters() < 125_000_000  # GPT-2 small (vocab 50304): 124M
    assert 109_000_000 < bert.num_parameters() < 111_000_000  # BERT-base: 110M


# (family, overrides, projected): tied weights with and without a hidden -> embedding projection
TIED = [
    ("fnn", {}, True),  # tiny fnn: hidden 32, embed 16
    ("fnn", {"hidden_size": 16}, False),
    ("rnn", {}, False),
    ("rnn", {"hidden_size": 48}, True),
    ("lstm", {"hidden_size": 48}, True),
    ("lstm", {"peephole": True}, False),
    ("gpt", {}, False),
    ("bert", {}, False),
]


@pytest.mark.parametrize("family,overrides,projected", TIED, ids=[f"{f}-{p}" for f, _, p in TIED])
def test_tied_weights_are_one_tensor_counted_once(family, overrides, projected):
    tied = make(family, tie_weights=True, **overrides)
    untied = make(family, tie_weights=False, **overrides)
    emb = tied.input_embeddings().weight
    assert tied.output_embeddings() is emb
    assert untied.output_embeddings() is not untied.input_embeddings().weight
    assert (getattr(tied, "proj", None) is not None) == projected
    # A training step moves both "ends" together: they are the same storage.
    train_steps(tied, steps=1)
    assert tied.output_embeddings().data_ptr() == tied.input_embeddings().weight.data_ptr()
    v, e = emb.shape
    out_cols = untied.output_embeddings().shape[1]
    proj = e * out_cols if projected else 0  # the projection only exists when tied
    assert untied.num_parameters() - tied.num_parameters() == v * out_cols - proj
    unique = {id(p): p.numel() for p in tied.parameters()}
    assert tied.num_parameters() == sum(unique.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_checkpoint_round_trip_gives_identical_logits(family, tmp_path):
    from nlm.checkpoint import load_checkpoint, save_checkpoint
    from nlm.tokenizers import train_tokenizer

    tokenizer = train_tokenizer("char", ["the cat sat on the mat", "a dog"])
    model = make(family, peephole=True) if family == "lstm" else make(family)
    train_steps(model, steps=1)  # weights no longer at their init
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded = load_checkpoint(tmp_path / "ckpt").model
    assert type(loaded) is type(model) and loaded.config == model.config
    x = batch(2, 10)[:, :-1]
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert loaded.output_embeddings() is loaded.input_embeddings().weight  # still tied


@pytest.mark.parametrize("family", ["rnn", "lstm", "lstm-peephole"])
def test_recurrent_state_carries_across_windows(family):
    model = (
        make("lstm", peephole=True, n_layer=2)
        if family == "lstm-peephole"
        else make(family, n_layer=2)
    )
    model.eval()
    x = batch(2, 12)[:, :-1]
    with torch.no_grad():
        whole = model(x)
        first = model(x[:, :5])
        second = model(x[:, 5:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits)
    state = second.state if family == "rnn" else second.state[0]
    assert state.shape == (2, 2, 32)  # (n_layer, B, H)


def test_rnn_is_the_elman_formula():
    model = make("rnn").eval()
    x = batch(1, 6)[:, :-1]
    core = model.core
    emb = model.embedding(x)[0]
    h = torch.zeros(32)
    expected = []
    for t in range(x.size(1)):
        h = torch.tanh(
            core.weight_hh_l0 @ h + core.weight_ih_l0 @ emb[t] + core.bias_ih_l0 + core.bias_hh_l0
        )
        expected.append(h)
    with torch.no_grad():
        torch.testing.assert_close(model(x).hidden[0], torch.stack(expected))


def test_peephole_lstm_differs_from_plain_and_gates_see_the_cell():
    plain = make("lstm").eval()
    peep = make("lstm", peephole=True).eval()
    layer = peep.core.layers[0]
    with torch.no_grad():  # copy every shared weight: the only difference left is the peepholes
        peep.embedding.weight.copy_(plain.embedding.weight)
        peep.decoder.bias.copy_(plain.decoder.bias)
        layer.ih.weight.copy_(plain.core.weight_ih_l0)
        layer.ih.bias.copy_(plain.core.bias_ih_l0 + plain.core.bias_hh_l0)
        layer.hh.weight.copy_(plain.core.weight_hh_l0)
        layer.peep.zero_()
    x = batch(2, 8)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(peep(x).logits, plain(x).logits)  # zero peepholes = plain
        layer.peep.copy_(torch.tensor([0.5, -0.7, 0.9])[:, None].expand(3, 32))
        assert not torch.allclose(peep(x).logits, plain(x).logits, atol=1e-4)

        # One step by hand: i, f see c_{t-1}; o sees c_t.
        h0, c0 = torch.randn(1, 1, 32) * 0.5, torch.randn(1, 1, 32)
        out = peep(x[:1, :1], state=(h0, c0))
        xe = peep.embedding(x[:1, 0])[0]
        gi, gf, gc, go = (layer.ih(xe) + layer.hh(h0[0, 0])).chunk(4)
        p_i, p_f, p_o = layer.peep
        i = torch.sigmoid(gi + p_i * c0[0, 0])
        f = torch.sigmoid(gf + p_f * c0[0, 0])
        c1 = f * c0[0, 0] + i * torch.tanh(gc)
        h1 = torch.sigmoid(go + p_o * c1) * torch.tanh(c1)
        torch.testing.assert_close(out.state[1][0, 0], c1)
        torch.testing.assert_close(out.state[0][0, 0], h1)
        # The plain LSTM's gates ignore c_{t-1}: its h1 differs given the same c0.
        plain_h1 = plain(x[:1, :1], state=(h0, c0)).state[0][0, 0]
        assert not torch.allclose(plain_h1, h1, atol=1e-4)


def test_sinusoidal_and_learned_positions():
    learned, sinus = make("gpt"), make("gpt", positions="sinusoidal")
    assert learned.wpe is not None and sinus.wpe is None
    assert learned.num_parameters() - sinus.num_parameters() == 64 * 32  # block x n_embd
    assert "pe" not in sinus.state_dict()  # a fixed table, rebuilt, not stored
    table = sinus.pe
    pos, i, d = 7, 3, 32
    assert table[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / d)))
    assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / d)))
    assert torch.equal(sinusoidal_positions(64, 32), table)
    losses = train_steps(sinus)
    assert losses[-1] < 0.8 * losses[0]
    with pytest.raises(NLMError, match="positions"):
        make("gpt", positions="rotary")


def test_gpt_init_is_gpt2():
    torch.manual_seed(0)
    model = build_model("gpt", "tiny", vocab_size=2000, n_embd=64, n_layer=4, n_head=2)
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    proj = model.blocks[0].attn.c_proj.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    # Tied head at this init: the loss starts near ln V (the field notes' warning).
    x = torch.randint(7, 2000, (4, 33))
    loss = model(x[:, :-1], targets=x[:, 1:]).loss.item()
    assert abs(loss - math.log(2000)) < 0.5


def test_bert_mlm_logits_only_where_labelled_and_nsp():
    model = make("bert").eval()
    x = batch(2, 10)[:, :-1]
    labels = torch.full_like(x, -100)
    labels[0, 2], labels[1, 5], labels[1, 7] = x[0, 2], x[1, 5], x[1, 7]
    nsp = torch.tensor([0, 1])
    with torch.no_grad():
        full = model(x)
        part = model(x, mlm_labels=labels, nsp_labels=nsp)
    assert full.logits.shape == (2, 10, V) and part.logits.shape == (3, V)
    torch.testing.assert_close(part.logits, full.logits[labels != -100])
    expected = F.cross_entropy(full.logits[labels != -100], labels[labels != -100])
    expected = expected + F.cross_entropy(full.nsp_logits, nsp)
    torch.testing.assert_close(part.loss, expected)
    # Padding: keys marked 0 are invisible to the real tokens.
    mask = torch.ones_like(x)
    mask[:, 6:] = 0
    other = x.clone()
    other[:, 6:] = 9
    with torch.no_grad():
        a = model(x, attention_mask=mask).logits[:, :6]
        b = model(other, attention_mask=mask).logits[:, :6]
    torch.testing.assert_close(a, b)
    # Segment embeddings matter.
    with torch.no_grad():
        seg = model(x, token_type_ids=torch.ones_like(x)).logits
    assert not torch.allclose(seg, full.logits)
