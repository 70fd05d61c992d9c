"""Textbook conformance: the course notes' worked examples, computed by OUR modules.

/work/shared/seed/chapter5-neural-language-models.md works small examples by hand. Each test
builds a tiny model, copies the notes' numbers into its parameters and checks what the model
computes. Where the notes round or slip, the test asserts the correct value and says so.
"""

from __future__ import annotations

import math

import pytest
import torch

from nlm.models import build_model
from nlm.models.gpt import CausalSelfAttention, GPTConfig


def set_(param: torch.nn.Parameter, values) -> None:
    with torch.no_grad():
        param.copy_(torch.as_tensor(values, dtype=param.dtype))


# --- Section 3 (FNN, "举例说明"): p(乏味 | 这, 本, 书, 很) ---------------------------------------
# Vocabulary of the five words the example shows, in the order of its L_T^T rows.
ZHE, BEN, SHU, HEN, FAWEI = range(5)  # 这 本 书 很 乏味
L_T_COLUMNS = [(0.2, 0.1), (0.1, 0.3), (0.4, 0.2), (0.5, 0.4), (0.3, 0.2)]
W1 = [[0.1, 0, 0.2, 0.4, 0.2, 0.1, 0, 0.3], [0.5, 0.4, 0.2, 0, 0.2, 0.6, 0, 0.2]]


@pytest.fixture
def notes_fnn():
    # n = 5 (four context words), 2-dim vectors, hidden layer of 2, no biases ("暂不考虑偏置 b"),
    # scores L_T^T x H': the softmax is tied to the embedding table.
    model = build_model(
        "fnn", "notes", vocab_size=5, n=5, embed_dim=2, hidden_size=2, tie_weights=True, bias=False
    )
    set_(model.embedding.weight, L_T_COLUMNS)
    set_(model.hidden.weight, W1)
    return model.eval()


def test_fnn_example(notes_fnn):
    context = torch.tensor([[ZHE, BEN, SHU, HEN]])
    # (2) concatenation of the four context vectors. The notes print it correctly as
    # (0.2, 0.1, 0.1, 0.3, 0.4, 0.2, 0.5, 0.4) but the x on the W^1 slide has nine entries
    # (a stray 0.2 before 0.5); the 8-vector is the right one and gives W^1 x = (0.38, 0.44).
    x = notes_fnn.embedding(notes_fnn.windows(context)[0, -1]).flatten()
    torch.testing.assert_close(x, torch.tensor([0.2, 0.1, 0.1, 0.3, 0.4, 0.2, 0.5, 0.4]))
    torch.testing.assert_close(notes_fnn.hidden(x), torch.tensor([0.38, 0.44]))

    out = notes_fnn(context)
    # (3) tanh: the notes round to (0.36, 0.41); tanh(0.38) = 0.3627, tanh(0.44) = 0.4136.
    h = out.hidden[0, -1]
    torch.testing.assert_close(h, torch.tensor([0.3627075, 0.4136444]))
    assert [round(v, 2) for v in h.tolist()] == [0.36, 0.41]

    # Scores L_T^T x H'. The notes' (0.113, 0.159, 0.226, 0.344, 0.190) are exact for the
    # rounded H' = (0.36, 0.41); with the true tanh values they are slightly higher.
    scores = out.logits[0, -1]
    torch.testing.assert_close(
        scores, torch.tensor([0.1139, 0.1604, 0.2278, 0.3468, 0.1915]), atol=1e-4, rtol=0
    )
    rounded_h = torch.tensor([0.36, 0.41])
    notes_scores = notes_fnn.embedding.weight @ rounded_h
    torch.testing.assert_close(
        notes_scores, torch.tensor([0.113, 0.159, 0.226, 0.344, 0.190]), atol=1e-6, rtol=0
    )

    # Softmax over the five words. The notes give (0.182, 0.190, 0.203, 0.229, 0.196), from their
    # rounded scores; from the exact scores the first is 0.1814, i.e. 0.181, not 0.182.
    probs = scores.softmax(-1)
    torch.testing.assert_close(
        probs, torch.tensor([0.1814, 0.1901, 0.2033, 0.2290, 0.1961]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        notes_scores.softmax(-1),
        torch.tensor([0.182, 0.190, 0.203, 0.229, 0.196]),
        atol=6e-4,
        rtol=0,
    )
    # p(乏味 | 这 本 书 很) is the boxed entry.
    assert probs[FAWEI].item() == pytest.approx(0.196, abs=5e-4)


# --- Section 4 (RNN): h_1 = tanh(U x_1 + W h_0) for "这 本 书 很 好 看" -----------------------------
RNN_X = [[0.2, 0.2], [0.3, 0.1], [0.2, 0.1], [0.1, 0.3], [0.1, 0.2], [0.1, 0.1]]  # x_1..x_6
U_NOTES = [[0.0, 0.1], [0.1, 0.0]]  # multiplies x_t in the example
W_NOTES = [[0.1, 0.0], [0.0, 0.1]]  # multiplies h_{t-1} in the example


def tanh2(v):
    return [math.tanh(a) for a in v]


def matvec(m, v):
    return [sum(a * b for a, b in zip(row, v, strict=True)) for row in m]


def test_rnn_example():
    # Note: the example writes h_t = tanh(U x_t + W h_{t-1}), swapping the roles of U and W
    # against the section's own formula h_t = f(U h_{t-1} + W x_t + b). The numbers follow the
    # example: the input matrix is [[0, .1], [.1, 0]], the recurrent one 0.1 I. No bias.
    model = build_model(
        "rnn", "notes", vocab_size=6, embed_dim=2, hidden_size=2, n_layer=1, tie_weights=False
    ).eval()
    set_(model.embedding.weight, RNN_X)
    set_(model.core.weight_ih_l0, U_NOTES)
    set_(model.core.weight_hh_l0, W_NOTES)
    set_(model.core.bias_ih_l0, [0.0, 0.0])
    set_(model.core.bias_hh_l0, [0.0, 0.0])
    hidden = model(torch.arange(6)[None]).hidden[0]

    # h_1 = tanh((0.02, 0.02) + 0) = (0.019997, 0.019997), i.e. 0.02 to 3 places.
    torch.testing.assert_close(hidden[0], torch.tensor([0.0199973, 0.0199973]))
    # And the recursion the slides set up (h_2 = tanh(U 本 + W h_1), h_3 = ...) for all six.
    h = [0.0, 0.0]
    for t, x in enumerate(RNN_X):
        h = tanh2([a + b for a, b in zip(matvec(U_NOTES, x), matvec(W_NOTES, h), strict=True)])
        torch.testing.assert_close(hidden[t], torch.tensor(h))


# --- Section 5 (LSTM): c~_1, c_1 and h_1 ----------------------------------------------------------
def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("peephole", [False, True])
def test_lstm_example(peephole):
    model = build_model(
        "lstm", "notes", vocab_size=3, embed_dim=2, hidden_size=2, n_layer=1, peephole=peephole
    ).eval()
    set_(model.embedding.weight, [[0.2, 0.2], [0.3, 0.1], [0.2, 0.1]])  # 这 本 书
    # The example's gate values are f_1 = i_1 = o_1 = (0.1, 0.0). A sigmoid never reaches 0,
    # so the second unit gets a pre-activation of -40 (sigma = 4e-18): "0.0" to any precision.
    # With h_0 = 0 the gates see only W x_1 = W (0.2, 0.2); pick W so W x_1 = logit(gate).
    gate_rows = [[logit(0.1) / 0.4] * 2, [-40 / 0.4] * 2]
    w_c = [[0.0, 0.1], [0.1, 0.0]]  # the notes' W_c
    u_c = [[0.1, 0.0], [0.0, 0.1]]  # the notes' U_c (h_0 = 0, so it does not matter here)
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    w_ih = gate_rows + gate_rows + w_c + gate_rows  # torch's gate order: i, f, c~, o
    w_hh = zeros + zeros + u_c + zeros
    if peephole:
        layer = model.core.layers[0]
        set_(layer.ih.weight, w_ih)
        set_(layer.ih.bias, [0.0] * 8)
        set_(layer.hh.weight, w_hh)
        set_(layer.peep, [[0.0, 0.0]] * 3)  # the notes' LSTM has no peepholes
    else:
        set_(model.core.weight_ih_l0, w_ih)
        set_(model.core.weight_hh_l0, w_hh)
        set_(model.core.bias_ih_l0, [0.0] * 8)
        set_(model.core.bias_hh_l0, [0.0] * 8)
    h0 = torch.zeros(1, 1, 2)
    c0 = torch.tensor([[[0.1, 0.1]]])  # the example's c_0
    with torch.no_grad():
        out = model(torch.tensor([[0]]), state=(h0, c0))
    h1, c1 = out.state[0][0, 0], out.state[1][0, 0]

    # c~_1 = tanh(W_c x_1 + U_c h_0) = tanh(0.02, 0.02) = 0.019997: the notes' (0.02, 0.02).
    c_tilde = math.tanh(0.02)
    # c_1 = f_1 * c_0 + i_1 * c~_1 = (0.1*0.1 + 0.1*0.02, 0) = (0.012, 0) in the notes;
    # exactly 0.0119997.
    torch.testing.assert_close(c1, torch.tensor([0.01 + 0.1 * c_tilde, 0.0]))
    assert c1[0].item() == pytest.approx(0.012, abs=1e-6)
    # h_1 = o_1 * tanh(c_1) = (0.1 * tanh(0.012), 0) = (0.0012, 0) (the notes stop before this).
    torch.testing.assert_close(h1, torch.tensor([0.1 * math.tanh(0.01 + 0.1 * c_tilde), 0.0]))


# --- Section 6 (self-attention): sinusoidal positions and multi-head attention -----------------
def test_sinusoidal_positions_rotate_by_offset():
    # The notes' example uses d = 500 and pos = 1..6 ("桌子 上 有 一 本 书"); PE(pos + k) is
    # R(k) PE(pos) with 2x2 blocks [[cos a, sin a], [-sin a, cos a]], a = k / 10000^(2i/d).
    d = 500
    model = build_model("gpt", "tiny", positions="sinusoidal", n_embd=d, n_head=2, block_size=16)
    pe = model.pe.double()
    i = torch.arange(d // 2, dtype=torch.float64)
    for pos in range(1, 7):
        for k in (1, 3, 9):
            alpha = k / 10000 ** (2 * i / d)
            even, odd = pe[pos, 0::2], pe[pos, 1::2]
            rotated_even = torch.cos(alpha) * even + torch.sin(alpha) * odd
            rotated_odd = torch.cos(alpha) * odd - torch.sin(alpha) * even
            torch.testing.assert_close(pe[pos + k, 0::2], rotated_even, atol=1e-6, rtol=0)
            torch.testing.assert_close(pe[pos + k, 1::2], rotated_odd, atol=1e-6, rtol=0)
    # And the definition itself, at one entry: y_{pos,2i} = sin(pos / 10000^(2i/d)).
    assert pe[3, 2 * 7].item() == pytest.approx(math.sin(3 / 10000 ** (14 / d)), abs=1e-7)
    assert pe[3, 2 * 7 + 1].item() == pytest.approx(math.cos(3 / 10000 ** (14 / d)), abs=1e-7)


def test_multi_head_attention_steps():
    # Steps 3-6: split q (0.1, 0.2, 0.2, 0.5) into heads (0.1, 0.2) and (0.2, 0.5); each head's
    # weights are softmax(q.k / sqrt(2)) over the positions so far; c = sum a_i v_i per head.
    attn = CausalSelfAttention(GPTConfig(n_embd=4, n_head=2, bias=False)).eval()
    eye = torch.eye(4)
    set_(attn.c_attn.weight, torch.cat([eye, eye, eye]))  # q = k = v = x
    set_(attn.c_proj.weight, eye)
    x = torch.tensor([[[0.3, 0.1, 0.4, 0.2], [0.2, 0.6, 0.1, 0.3], [0.1, 0.2, 0.2, 0.5]]])
    with torch.no_grad():
        out = attn(x, attn_mask=None)[0]
    q = x[0, -1]
    assert q[:2].tolist() == pytest.approx([0.1, 0.2]) and q[2:].tolist() == pytest.approx(
        [0.2, 0.5]
    )
    for head in (slice(0, 2), slice(2, 4)):
        b = torch.stack([q[head] @ x[0, i, head] for i in range(3)]) / math.sqrt(2)
        a = b.softmax(-1)
        c = sum(a[i] * x[0, i, head] for i in range(3))
        torch.testing.assert_close(out[-1, head], c)
    # Causal: the first position only attends to itself.
    torch.testing.assert_close(out[0], x[0, 0])
