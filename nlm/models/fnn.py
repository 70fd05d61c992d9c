"""Feed-forward neural probabilistic language model (Bengio et al. 2003).

    x = [C(w_{t-n+2}); ...; C(w_t)]              the n-1 context embeddings, oldest first
    h = tanh(d + H x)                             hidden layer
    y = b + W x + U h                             W x: optional direct input->output connections
    P(w_{t+1} | context) = softmax(y)

Over a (B, T) batch every position t is predicted from the n-1 tokens ending at t, so the model
fits the same causal-LM loop as the others (targets[:, t] is the token after input_ids[:, t]).
Context before the first token is filled with <pad> (id 0): its embedding is learned and acts
as a start-of-text marker. Left-padding in a batch uses the same id, which is why a padded
prompt generates exactly what it would alone.

`combine` says how the n-1 context vectors become x (the course notes, section 3, step 2:
"拼接所有的条件词的向量, 形成一个向量 ... 或者加和, 取平均"): `concat` (the default, Bengio's;
x has (n-1) * embed_dim entries and keeps word order), `sum` or `mean` (x has embed_dim entries;
the order of the context words is lost, as in a bag of words). `activation` is the hidden
layer's nonlinearity f in h = f(d + H x): `tanh` (the default, Bengio's and the notes'), `relu`,
`sigmoid` or `gelu`.

With `tie_weights`, U is the embedding table (the notes' L_T^T x h); if hidden_size differs
from embed_dim a bias-free projection hidden -> embed comes first (nlm/models/base.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nlm.config import Config
from nlm.errors import NLMError
from nlm.models.base import CausalLanguageModel, ModelOutput, output_layer
from nlm.objectives import causal_lm_loss

PAD_ID = 0
COMBINES = ("concat", "sum", "mean")
ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "sigmoid": torch.sigmoid, "gelu": F.gelu}


@dataclasses.dataclass
class FNNConfig(Config):
    vocab_size: int = 10000
    n: int = 5  # the model is an n-gram model: n-1 tokens of context
    embed_dim: int = 60
    hidden_size: int = 100
    direct: bool = False  # Bengio's optional direct connections W x
    tie_weights: bool = True
    bias: bool = True
    dropout: float = 0.0  # on the hidden layer
    # Added later: a checkpoint written before them has neither key and loads as concat + tanh,
    # which is what every fnn computed then.
    combine: str = "concat"  # concat | sum | mean: how the n-1 context vectors make x
    activation: str = "tanh"  # tanh | relu | sigmoid | gelu: f in h = f(d + H x)


class FNNLanguageModel(CausalLanguageModel):
    family = "fnn"
    config_class = FNNConfig
    objective = "clm"
    causal = True
    recurrent = False
    max_positions_field = None  # slides its n-1 window over any length
    summary_type = None

    def __init__(self, config: FNNConfig) -> None:
        super().__init__(config)
        if config.n < 2:
            raise NLMError(f"fnn config (field 'n'): must be >= 2, got {config.n}")
        if config.combine not in COMBINES:
            raise NLMError(
                f"fnn config (field 'combine'): {config.combine!r} is not one of "
                f"{', '.join(COMBINES)}"
            )
        if config.activation not in ACTIVATIONS:
            raise NLMError(
                f"fnn config (field 'activation'): {config.activation!r} is not one of "
                f"{', '.join(ACTIVATIONS)}"
            )
        self.context = config.n - 1
        self.activation = ACTIVATIONS[config.activation]
        x_size = config.embed_dim * (self.context if config.combine == "concat" else 1)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.hidden = nn.Linear(x_size, config.hidden_size, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)
        self.proj, self.decoder = output_layer(
            self.embedding, config.hidden_size, config.tie_weights, config.bias
        )
        self.direct = nn.Linear(x_size, config.vocab_size, bias=False) if config.direct else None
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if not config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if self.decoder.bias is not None:
            nn.init.zeros_(self.decoder.bias)
        if self.direct is not None:
            nn.init.zeros_(self.direct.weight)  # start as the plain model; training opens it up

    @property
    def context_size(self) -> int:
        """n-1: each prediction sees only the n-1 tokens ending at it."""
        return self.context

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def output_embeddings(self) -> torch.Tensor:
        return self.decoder.weight

    def windows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, n-1): the context window ending at each position."""
        padded = F.pad(input_ids, (self.context - 1, 0), value=PAD_ID)
        return padded.unfold(1, self.context, 1)

    def combined(self, windows: torch.Tensor) -> torch.Tensor:
        """(..., n-1) windows -> x: (..., (n-1) * E) for `concat` (oldest token first), (..., E)
        for `sum` and `mean` over the n-1 context vectors."""
        vectors = self.embedding(windows)  # (..., n-1, E)
        if self.config.combine == "sum":
            return vectors.sum(-2)
        if self.config.combine == "mean":
            return vectors.mean(-2)
        return vectors.flatten(-2)

    def _from_windows(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., n-1) windows -> (logits (..., V), hidden (..., H))."""
        x = self.combined(windows)
        h = self.activation(self.hidden(x))
        out = self.drop(h)
        logits = self.decoder(self.proj(out) if self.proj is not None else out)
        if self.direct is not None:
            logits = logits + self.direct(x)
        return logits, h

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        if attention_mask is not None:  # left padding: masked tokens read as <pad>
            input_ids = input_ids.masked_fill(~attention_mask.bool(), PAD_ID)
        logits, hidden = self._from_windows(self.windows(input_ids))
        loss = causal_lm_loss(logits, targets) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden=hidden)

    # Generation: the cache is the current (B, n-1) window, slid one token per step.
    def prefill(self, input_ids, attention_mask, max_new_tokens):
        if attention_mask is not None:
            input_ids = input_ids.masked_fill(~attention_mask.bool(), PAD_ID)
        window = self.windows(input_ids)[:, -1]
        return self._from_windows(window)[0], window

    def decode_step(self, next_ids, window):
        window = torch.cat([window[:, 1:], next_ids[:, None]], dim=1)
        return self._from_windows(window)[0], window
