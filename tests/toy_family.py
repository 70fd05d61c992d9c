"""A model family that lives outside nlm: what tests/test_families.py registers (one line in
`FAMILIES`, its presets) to show that adding a family touches nothing else.

A bigram model, P(w_{t+1} | w_t) = softmax(W e(w_t) + b): the smallest causal LM there is. It
declares every family fact itself, as a new family file must (nlm/models/base.py).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from nlm.config import Config
from nlm.models.base import CausalLanguageModel, ModelOutput
from nlm.objectives import causal_lm_loss


@dataclasses.dataclass
class BigramConfig(Config):
    vocab_size: int = 256
    embed_dim: int = 16
    dropout: float = 0.0


class BigramLanguageModel(CausalLanguageModel):
    family = "bigram"
    config_class = BigramConfig
    objective = "clm"
    causal = True
    recurrent = False
    max_positions_field = None
    summary_type = None

    def __init__(self, config: BigramConfig) -> None:
        super().__init__(config)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        self.decoder = nn.Linear(config.embed_dim, config.vocab_size)

    @property
    def context_size(self) -> int:
        return 1

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    def input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def output_embeddings(self) -> torch.Tensor:
        return self.decoder.weight

    def forward(self, input_ids, targets=None, attention_mask=None) -> ModelOutput:
        hidden = self.embedding(input_ids)
        logits = self.decoder(hidden)
        loss = causal_lm_loss(logits, targets) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden=hidden)

    # The cache is each row's last token, (B, 1).
    def prefill(self, input_ids, attention_mask, max_new_tokens):
        last = input_ids[:, -1:]
        return self.decoder(self.embedding(last[:, 0])), last

    def decode_step(self, next_ids, cache):
        return self.decoder(self.embedding(next_ids)), next_ids[:, None]
