"""Elman recurrent language model (Mikolov et al. 2010), and the machinery lstm.py reuses.

    h_t = tanh(U h_{t-1} + W x_t + b)      per layer (torch.nn.RNN, tanh; its b_ih + b_hh is b)
    P(w_{t+1} | w_1..w_t) = softmax(V h_t + c)

The layout follows PyTorch's word_language_model example: embedding -> dropout -> 1-2
recurrent layers (dropout between them) -> dropout -> softmax layer, optionally tied to the
embedding (through a projection when hidden_size != embed_dim, see nlm/models/base.py).
`forward` takes and returns `state` (n_layer, B, H) for truncated BPTT; the trainer detaches it
between windows.

Left-padded batches (`attention_mask`) are run as packed sequences, so each row's state starts
at its first real token exactly as if it were alone, still in one fused call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nlm.config import Config
from nlm.errors import NLMError
from nlm.models.base import CausalLanguageModel, ModelOutput, output_layer
from nlm.objectives import causal_lm_loss


@dataclasses.dataclass
class RNNConfig(Config):
    vocab_size: int = 10000
    embed_dim: int = 200
    hidden_size: int = 200
    n_layer: int = 2
    dropout: float = 0.2
    tie_weights: bool = True
    bias: bool = True


class RecurrentLanguageModel(CausalLanguageModel):
    """embedding -> recurrent core -> softmax; subclasses build the core (`make_core`)."""

    recurrent = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.n_layer < 1:
            raise NLMError(
                f"{self.family} config (field 'n_layer'): must be >= 1, got {config.n_layer}"
            )
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.drop = nn.Dropout(config.dropout)
        self.core = self.make_core()
        self.proj, self.decoder = output_layer(
            self.embedding, config.hidden_size, config.tie_weights, config.bias
        )
        # word_language_model's init: small uniform embeddings/softmax, zero softmax bias.
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if not config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        if self.decoder.bias is not None:
            nn.init.zeros_(self.decoder.bias)

    def make_core(self) -> nn.Module:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def output_embeddings(self) -> torch.Tensor:
        return self.decoder.weight

    def run_core(
        self, x: torch.Tensor, state: Any, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any]:
        """(B, T, E) inputs -> ((B, T, H) outputs, final state); `mask` marks real tokens."""
        if mask is None:
            return self.core(x, state)
        return run_left_padded(self.core, x, state, mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        state: Any = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = attention_mask.bool()
        x = self.drop(self.embedding(input_ids))
        hidden, state = self.run_core(x, state, mask)
        out = self.drop(hidden)
        logits = self.decoder(self.proj(out) if self.proj is not None else out)
        loss = causal_lm_loss(logits, targets) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden=hidden, state=state)

    # Generation: the cache is the recurrent state, (n_layer, B, H) (a pair of them for lstm).
    cache_batch_dim = 1

    def prefill(self, input_ids, attention_mask, max_new_tokens):
        out = self.forward(input_ids, attention_mask=attention_mask)
        return out.logits[:, -1], out.state  # left padding: the last position is real in every row

    def decode_step(self, next_ids, state):
        out = self.forward(next_ids[:, None], state=state)
        return out.logits[:, -1], out.state


def run_left_padded(
    core: nn.Module, x: torch.Tensor, state: Any, mask: torch.Tensor
) -> tuple[torch.Tensor, Any]:
    """Run a left-padded batch so that padding never touches the state.

    torch's fused RNN/LSTM take right-padded packed sequences: rotate each row so its real
    tokens come first, pack, run, unpack, rotate back. Padded positions get zero outputs.
    Cores that are not torch.nn.RNNBase (the peephole LSTM) take the mask themselves.
    """
    if not isinstance(core, nn.RNNBase):
        return core(x, state, mask)
    batch, time, _ = x.shape
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise NLMError("attention_mask: every row needs at least one real token")
    steps = torch.arange(time, device=x.device)[None, :]
    pads = (time - lengths)[:, None]
    to_left = ((steps + pads) % time)[..., None]
    left = x.gather(1, to_left.expand(-1, -1, x.size(2)))
    packed = pack_padded_sequence(left, lengths.cpu(), batch_first=True, enforce_sorted=False)
    out, state = core(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=time)
    back = ((steps - pads) % time)[..., None]
    return out.gather(1, back.expand(-1, -1, out.size(2))), state


class RNNLanguageModel(RecurrentLanguageModel):
    family = "rnn"
    config_class = RNNConfig
    objective = "clm"
    causal = True
    recurrent = True
    max_positions_field = None
    summary_type = None

    def make_core(self) -> nn.Module:
        c = self.config
        return nn.RNN(
            c.embed_dim,
            c.hidden_size,
            c.n_layer,
            nonlinearity="tanh",
            bias=c.bias,
            batch_first=True,
            dropout=c.dropout if c.n_layer > 1 else 0.0,
        )
