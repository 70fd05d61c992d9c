"""LSTM language model (Hochreiter & Schmidhuber 1997; Zaremba et al. 2014 for the LM setup).

    i_t = sigma(W_i x_t + U_i h_{t-1} + b_i)        input gate
    f_t = sigma(W_f x_t + U_f h_{t-1} + b_f)        forget gate
    o_t = sigma(W_o x_t + U_o h_{t-1} + b_o)        output gate
    c~_t = tanh(W_c x_t + U_c h_{t-1} + b_c)        candidate
    c_t = f_t * c_{t-1} + i_t * c~_t ;  h_t = o_t * tanh(c_t)

`peephole=True` is Gers & Schmidhuber's (2000) variant: the input and forget gates also see
c_{t-1} and the output gate sees c_t, each through a diagonal (per-unit) weight p:
    i_t = sigma(... + p_i * c_{t-1}),  f_t = sigma(... + p_f * c_{t-1}),  o_t = sigma(... + p_o * c_t)
The course notes (section 5) write these terms as matrices, V_f c_{t-1}, V_i c_{t-1}, V_o c_t,
which would let every gate look at every cell. nlm's peepholes are diagonal, V = diag(p): a
unit's gates see only that unit's cell. That is the peephole LSTM of its sources, where a cell
feeds only the gates of its own memory block (Gers & Schmidhuber 2000, "Recurrent nets that time
and count"; Gers, Schraudolph & Schmidhuber 2002, "Learning precise timing with LSTM recurrent
networks", JMLR 3: 115-143) and a block has one cell here, as in the vector peephole weights
p_i, p_f, p_o of Greff et al. 2017 ("LSTM: a search space odyssey"). Which gates peek, and at
which time step (c_{t-1} for i and f, c_t for o), is as in the notes.
The plain variant is torch.nn.LSTM (one fused kernel); the peephole one is written out with a
loop over time (the input projections of all steps are still one matmul). Both use torch's
gate order (i, f, c~, o), so a plain layer's weights copy straight into a peephole layer.
State is (h, c), each (n_layer, B, H).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from nlm.config import Config
from nlm.models.rnn import RecurrentLanguageModel


@dataclasses.dataclass
class LSTMConfig(Config):
    vocab_size: int = 10000
    embed_dim: int = 200
    hidden_size: int = 200
    n_layer: int = 2
    dropout: float = 0.2
    tie_weights: bool = True
    bias: bool = True
    peephole: bool = False


class LSTMLanguageModel(RecurrentLanguageModel):
    family = "lstm"
    config_class = LSTMConfig
    objective = "clm"
    causal = True
    recurrent = True
    max_positions_field = None
    summary_type = None

    def make_core(self) -> nn.Module:
        c = self.config
        dropout = c.dropout if c.n_layer > 1 else 0.0
        if c.peephole:
            return PeepholeLSTM(c.embed_dim, c.hidden_size, c.n_layer, c.bias, dropout)
        return nn.LSTM(
            c.embed_dim, c.hidden_size, c.n_layer, bias=c.bias, batch_first=True, dropout=dropout
        )


class PeepholeLSTMLayer(nn.Module):
    def __init__(self, input_size: int, hidden_size: int, bias: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 4 * hidden_size, bias=bias)  # W x_t (+ b), gates i f c~ o
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)  # U h_{t-1}
        self.peep = nn.Parameter(torch.empty(3, hidden_size))  # p_i, p_f, p_o
        bound = hidden_size**-0.5  # torch.nn.LSTM's init
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, I) inputs, (B, H) h and c -> ((B, T, H) outputs, h_T, c_T)."""
        p_i, p_f, p_o = self.peep
        gates_x = self.ih(x)  # every time step in one matmul
        outputs = []
        for t in range(x.size(1)):
            gi, gf, gc, go = (gates_x[:, t] + self.hh(h)).chunk(4, dim=-1)
            i = torch.sigmoid(gi + p_i * c)
            f = torch.sigmoid(gf + p_f * c)
            c_new = f * c + i * torch.tanh(gc)
            o = torch.sigmoid(go + p_o * c_new)
            h_new = o * torch.tanh(c_new)
            if mask is not None:  # left padding: the state stays put until the first real token
                real = mask[:, t, None]
                h_new = torch.where(real, h_new, h)
                c_new = torch.where(real, c_new, c)
                outputs.append(h_new * real)
            else:
                outputs.append(h_new)
            h, c = h_new, c_new
        return torch.stack(outputs, dim=1), h, c


class PeepholeLSTM(nn.Module):
    """A stack of peephole LSTM layers with torch.nn.LSTM's calling convention (plus a mask)."""

    def __init__(
        self, input_size: int, hidden_size: int, n_layer: int, bias: bool, dropout: float
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layers = nn.ModuleList(
            PeepholeLSTMLayer(input_size if k == 0 else hidden_size, hidden_size, bias)
            for k in range(n_layer)
        )
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, state: Any = None, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        n_layer, batch = len(self.layers), x.size(0)
        if state is None:
            zeros = x.new_zeros(n_layer, batch, self.hidden_size)
            state = (zeros, zeros)
        h0, c0 = state
        hs, cs = [], []
        for k, layer in enumerate(self.layers):
            if k > 0:
                x = self.drop(x)  # between layers, as torch.nn.LSTM's dropout
            x, h, c = layer(x, h0[k], c0[k], mask)
            hs.append(h)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))
