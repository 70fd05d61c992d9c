"""Textbook conformance: the course notes' worked examples, computed by OUR modules.

/work/shared/seed/chapter5-neural-language-models.md works small examples by hand. Each test
builds a tiny model, copies the notes' numbers into its parameters and checks what the model
computes. Where the notes round or slip, the test asserts the correct value and says so.
"""

from __future__ import annotations

import math

import pytest
import torch

from nlm.errors import NLMError
from nlm.models import IGNORE_INDEX, build_model
from nlm.models.gpt import CausalSelfAttention, GPTConfig
from nlm.optim import OptimConfig, make_optimizer


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


def test_lstm_peephole_equations_with_diagonal_v():
    """Section 5's improved gates, f_t = sigma(W_f x_t + U_f h_{t-1} + V_f c_{t-1} + b_f), the
    same for i_t, and o_t = sigma(W_o x_t + U_o h_{t-1} + V_o c_t + b_o), with nlm's diagonal
    V = diag(p) (nlm/models/lstm.py): two steps by hand against the peephole layer."""
    torch.manual_seed(0)
    model = build_model("lstm", "notes", vocab_size=3, embed_dim=2, hidden_size=2, n_layer=1,
                        peephole=True).eval()  # fmt: skip
    layer = model.core.layers[0]
    set_(layer.peep, [[0.5, -0.3], [0.8, 0.2], [-0.6, 0.4]])  # p_i, p_f, p_o
    w = layer.ih.weight.detach().view(4, 2, 2)  # torch's gate order: i, f, c~, o
    u = layer.hh.weight.detach().view(4, 2, 2)
    b = layer.ih.bias.detach().view(4, 2)
    v_i, v_f, v_o = (torch.diag(p) for p in layer.peep.detach())
    ids = torch.tensor([[0, 2]])
    h, c = torch.zeros(2), torch.tensor([0.1, 0.1])  # the section's c_0
    for x in model.embedding.weight.detach()[ids[0]]:
        f = torch.sigmoid(w[1] @ x + u[1] @ h + v_f @ c + b[1])
        i = torch.sigmoid(w[0] @ x + u[0] @ h + v_i @ c + b[0])
        c = f * c + i * torch.tanh(w[2] @ x + u[2] @ h + b[2])
        o = torch.sigmoid(w[3] @ x + u[3] @ h + v_o @ c + b[3])
        h = o * torch.tanh(c)
    with torch.no_grad():
        out = model(ids, state=(torch.zeros(1, 1, 2), torch.tensor([[[0.1, 0.1]]])))
    torch.testing.assert_close(out.state[1][0, 0], c)
    torch.testing.assert_close(out.state[0][0, 0], h)


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


# --- Appendix (8. 附录): back-propagation through the section-3 FNN, eqs. 6-8 to 6-17 ------------
# The network of the worked example above, as the appendix's layers: alpha^(0) = x (the
# concatenated context), z^(1) = W^(1) alpha^(0) + b^(1), alpha^(1) = tanh(z^(1)),
# z^(2) = W^(2) alpha^(1) + b^(2) with W^(2) = L_T^T, y^ = softmax(z^(2)), L = -y^T log y^ for
# y = one-hot(乏味). The notes set b aside ("暂不考虑偏置 b"); here b^(1) = b^(2) = 0 so that the
# forward pass is theirs and dL/db (6-17) still has a value to check.
@pytest.mark.parametrize("tie_weights", [True, False])
def test_fnn_backprop_recursion_equals_autograd(tie_weights):
    model = build_model("fnn", "notes", vocab_size=5, n=5, embed_dim=2, hidden_size=2,
                        tie_weights=tie_weights, bias=True)  # fmt: skip
    set_(model.embedding.weight, L_T_COLUMNS)
    if not tie_weights:  # the same numbers in a separate output matrix
        set_(model.decoder.weight, L_T_COLUMNS)
    set_(model.hidden.weight, W1)
    set_(model.hidden.bias, [0.0, 0.0])
    set_(model.decoder.bias, [0.0] * 5)
    model.eval()
    context = torch.tensor([[ZHE, BEN, SHU, HEN]])
    targets = torch.tensor([[IGNORE_INDEX] * 3 + [FAWEI]])  # only the last position's loss

    # Autograd on the model, with the net activations z^(l) kept.
    z = {}
    model.hidden.register_forward_hook(lambda m, i, out: z.setdefault(1, out))
    model.decoder.register_forward_hook(lambda m, i, out: z.setdefault(2, out))
    loss = model(context, targets=targets).loss
    for out in z.values():
        out.retain_grad()
    loss.backward()

    # (a) the forward pass by hand, (b) the error terms by the recursion, (c) the gradients.
    w1 = torch.tensor(W1)
    w2 = torch.tensor(L_T_COLUMNS)  # W^(2) = L_T^T: one row per vocabulary word
    alpha0 = torch.tensor([0.2, 0.1, 0.1, 0.3, 0.4, 0.2, 0.5, 0.4])
    z1 = w1 @ alpha0
    alpha1 = torch.tanh(z1)
    z2 = w2 @ alpha1
    y_hat = torch.exp(z2) / torch.exp(z2).sum()
    y = torch.zeros(5)
    y[FAWEI] = 1.0
    assert loss.item() == pytest.approx(-math.log(y_hat[FAWEI].item()), abs=1e-6)

    # Output layer: softmax with cross-entropy gives delta^(2) = dL/dz^(2) = y^ - y; with the
    # example's numbers (0.181, 0.190, 0.203, 0.229, 0.196 - 1).
    delta2 = y_hat - y
    assert [round(v, 3) for v in delta2.tolist()] == [0.181, 0.190, 0.203, 0.229, -0.804]
    # (6-13) delta^(l) = f_l'(z^(l)) (.) ((W^(l+1))^T delta^(l+1)), f = tanh, f' = 1 - tanh^2.
    delta1 = (1 - torch.tanh(z1) ** 2) * (w2.T @ delta2)
    # (6-10) delta^(l) is dL/dz^(l): autograd's gradient at the layers' outputs.
    torch.testing.assert_close(z[2].grad[0, -1], delta2)
    torch.testing.assert_close(z[1].grad[0, -1], delta1)
    assert z[1].grad[0, :-1].abs().max() == 0  # the ignored positions get no error

    # (6-16) dL/dW^(l) = delta^(l) (alpha^(l-1))^T and (6-17) dL/db^(l) = delta^(l).
    torch.testing.assert_close(model.hidden.weight.grad, torch.outer(delta1, alpha0))
    torch.testing.assert_close(model.hidden.bias.grad, delta1)
    torch.testing.assert_close(model.decoder.bias.grad, delta2)
    # One step further, to the word vectors (section 3, step 6 trains them by back-propagation
    # too): dL/dalpha^(0) = (W^(1))^T delta^(1) (6-11), split back onto the four context words;
    # tied, L_T also receives W^(2)'s gradient delta^(2) (alpha^(1))^T.
    dw2 = torch.outer(delta2, alpha1)
    d_vectors = torch.zeros(5, 2)
    d_vectors[[ZHE, BEN, SHU, HEN]] = (w1.T @ delta1).view(4, 2)
    if tie_weights:
        torch.testing.assert_close(model.embedding.weight.grad, d_vectors + dw2)
    else:
        torch.testing.assert_close(model.decoder.weight.grad, dw2)
        torch.testing.assert_close(model.embedding.weight.grad, d_vectors)


def test_fnn_layer_partial_derivatives():
    """(6-8) dz/dw_ij = Delta_i(alpha_j): zero but for alpha_j in row i; (6-9) dz/db = I;
    (6-11) dz/dalpha = W (here as torch's (M_l, M_{l-1}) Jacobian, the notes' (W)^T laid out
    the other way); (6-12) dalpha/dz = diag(f'(z)) for the hidden layer's tanh."""
    model = build_model("fnn", "notes", vocab_size=5, n=5, embed_dim=2, hidden_size=2, bias=True)
    layer = model.hidden
    set_(layer.weight, W1)
    set_(layer.bias, [0.1, -0.2])
    alpha = torch.tensor([0.2, 0.1, 0.1, 0.3, 0.4, 0.2, 0.5, 0.4])

    def z(weight, bias, a):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (a,))

    weight, bias = layer.weight.detach(), layer.bias.detach()
    dz_dw, dz_db, dz_da = torch.autograd.functional.jacobian(z, (weight, bias, alpha))
    assert dz_dw.shape == (2, 2, 8)  # [k, i, j] = dz_k / dw_ij
    for i in range(2):
        for j in range(8):
            expected = torch.zeros(2)
            expected[i] = alpha[j]
            torch.testing.assert_close(dz_dw[:, i, j], expected)
    torch.testing.assert_close(dz_db, torch.eye(2))
    torch.testing.assert_close(dz_da, torch.tensor(W1))
    z1 = z(weight, bias, alpha)
    dalpha_dz = torch.autograd.functional.jacobian(model.activation, z1)
    torch.testing.assert_close(dalpha_dz, torch.diag(1 - torch.tanh(z1) ** 2))


# --- Section 3, eqs. 6-2 to 6-5: the regularised risk and its SGD step (OptimConfig.l2) ---------
def test_sgd_l2_step_by_hand():
    # z = W x + b with W = (0.5, -1.0), b = 0.2, x = (1, 2) and L = z: dL/dW = (1, 2), dL/db = 1.
    # lr = 0.1, eps = 0.5:  W <- W - 0.1 ((1, 2) + 0.5 (0.5, -1.0)) = (0.375, -1.15)   (6-4)
    #                       b <- b - 0.1 * 1 = 0.1 (no penalty on b)                     (6-5)
    layer = torch.nn.Linear(2, 1)
    set_(layer.weight, [[0.5, -1.0]])
    set_(layer.bias, [0.2])
    optimizer = make_optimizer(layer, OptimConfig(optimizer="sgd", lr=0.1, l2=0.5).check())
    layer(torch.tensor([1.0, 2.0])).sum().backward()
    optimizer.step()
    torch.testing.assert_close(layer.weight.detach(), torch.tensor([[0.375, -1.15]]))
    torch.testing.assert_close(layer.bias.detach(), torch.tensor([0.1]))


def test_sgd_l2_minimises_the_regularised_risk():
    """One step of SGD with l2 = eps on L equals one plain SGD step on (6-2)'s
    R = L + eps/2 ||W||_F^2, the sum (6-3) over every weight matrix and no bias."""
    eps, lr = 0.3, 0.5
    context = torch.tensor([[ZHE, BEN, SHU, HEN, FAWEI]])
    targets = torch.tensor([[BEN, SHU, HEN, FAWEI, ZHE]])
    models = []
    for l2 in (eps, 0.0):
        torch.manual_seed(0)
        model = build_model("fnn", "notes", vocab_size=5, n=3, embed_dim=2, hidden_size=3,
                            tie_weights=False, direct=True)  # fmt: skip
        with torch.no_grad():
            model.direct.weight.uniform_(-0.1, 0.1)  # not zero, so its penalty shows
        optimizer = make_optimizer(model, OptimConfig(optimizer="sgd", lr=lr, l2=l2).check())
        risk = model(context, targets=targets).loss
        if not l2:
            matrices = [p for p in model.parameters() if p.dim() == 2]
            assert len(matrices) == 4  # L_T, W^(1), the output matrix and the direct W
            risk = risk + eps / 2 * sum((p**2).sum() for p in matrices)
        risk.backward()
        optimizer.step()
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_l2_is_sgds_only():
    with pytest.raises(NLMError, match=r"field 'l2'.*sgd") as error:
        OptimConfig(optimizer="adamw", l2=0.01).check("train.yaml")
    assert "\n" not in str(error.value)
    with pytest.raises(NLMError, match="field 'l2'"):
        OptimConfig(optimizer="sgd", l2=-0.1).check()


# --- Section 3, step 2: "拼接所有的条件词的向量 ... 或者加和, 取平均"; step 3's activation ---------------
@pytest.mark.parametrize(
    ("combine", "x"),
    [
        ("concat", [0.2, 0.1, 0.1, 0.3, 0.4, 0.2, 0.5, 0.4]),  # the notes' x
        ("sum", [1.2, 1.0]),  # 这 + 本 + 书 + 很
        ("mean", [0.3, 0.25]),  # the sum / 4
    ],
)
def test_fnn_context_combination(combine, x):
    width = 8 if combine == "concat" else 2
    model = build_model("fnn", "notes", vocab_size=5, n=5, embed_dim=2, hidden_size=2,
                        bias=False, combine=combine)  # fmt: skip
    assert model.hidden.weight.shape == (2, width)
    set_(model.embedding.weight, L_T_COLUMNS)
    w1 = W1 if combine == "concat" else [[0.1, 0.4], [-0.5, 0.2]]
    set_(model.hidden.weight, w1)
    window = torch.tensor([ZHE, BEN, SHU, HEN])
    torch.testing.assert_close(model.combined(window), torch.tensor(x))
    # h = tanh(W^1 x), scores L_T^T h (tied), at the last position of the sentence.
    h = torch.tanh(torch.tensor(w1) @ torch.tensor(x))
    with torch.no_grad():
        out = model(window[None])
    torch.testing.assert_close(out.hidden[0, -1], h)
    torch.testing.assert_close(out.logits[0, -1], torch.tensor(L_T_COLUMNS) @ h)
    if combine != "concat":  # a bag of words: the order of the context does not matter
        with torch.no_grad():
            shuffled = model(torch.tensor([[HEN, SHU, ZHE, BEN]]))
        torch.testing.assert_close(shuffled.logits[0, -1], out.logits[0, -1])


@pytest.mark.parametrize(
    ("activation", "f"),
    [
        ("tanh", math.tanh),
        ("relu", lambda v: max(v, 0.0)),
        ("sigmoid", lambda v: 1 / (1 + math.exp(-v))),
        ("gelu", lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))),
    ],
)
def test_fnn_activation(activation, f):
    model = build_model("fnn", "notes", vocab_size=5, n=5, embed_dim=2, hidden_size=2,
                        bias=True, activation=activation)  # fmt: skip
    set_(model.embedding.weight, L_T_COLUMNS)
    set_(model.hidden.weight, W1)
    set_(model.hidden.bias, [-0.5, 0.1])  # z = (0.38 - 0.5, 0.44 + 0.1): one negative entry
    with torch.no_grad():
        h = model(torch.tensor([[ZHE, BEN, SHU, HEN]])).hidden[0, -1]
    torch.testing.assert_close(h, torch.tensor([f(-0.12), f(0.54)]))


def test_fnn_defaults_are_bengios_and_bad_values_are_one_line_errors():
    from nlm.models.presets import PRESETS

    for preset in PRESETS["fnn"]:
        config = build_model("fnn", preset, vocab_size=64).config
        assert (config.combine, config.activation) == ("concat", "tanh")
    for field, value in (("combine", "max"), ("activation", "softplus")):
        with pytest.raises(NLMError, match=f"field '{field}'.*'{value}' is not one of") as error:
            build_model("fnn", "tiny", **{field: value})
        assert "\n" not in str(error.value)
