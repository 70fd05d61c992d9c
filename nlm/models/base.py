"""What every model family shares: the output type and the `LanguageModel` interface.

Conventions (all five families):
- `forward(input_ids, targets=None, ...) -> ModelOutput`. `input_ids` is (B, T) int64.
- Causal families (fnn, rnn, lstm, gpt) use nanoGPT's target convention: `targets[b, t]` is the
  token that follows `input_ids[b, t]` (the data pipeline stores rows of T+1 tokens and the
  trainer slices x = row[:-1], y = row[1:]). Positions with target -100 are ignored.
  Loss is the mean cross-entropy over non-ignored positions.
- Recurrent families (rnn, lstm) also take and return `state` so truncated BPTT can carry the
  hidden state across consecutive windows (detach it between windows in the trainer).
- bert's forward takes `token_type_ids`, `attention_mask`, `mlm_labels`, `nsp_labels` instead of
  `targets` (see nlm/models/bert.py).
- `ModelOutput.hidden` is the final hidden state (B, T, H) before the output projection; serving
  mean-pools it for /v1/embed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from nlm.config import Config

IGNORE_INDEX = -100


@dataclasses.dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    state: Any = None  # recurrent state (rnn/lstm), KV cache (gpt generation)
    nsp_logits: torch.Tensor | None = None  # bert only


class LanguageModel(nn.Module):
    """Base class of the five families. Subclasses set `family` and `config_class`."""

    family: ClassVar[str]
    config_class: ClassVar[type[Config]]
    causal: ClassVar[bool] = True

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique trainable parameters (a tied matrix counts once)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
        if exclude_embeddings:
            total -= self.input_embeddings().weight.numel()
        return total

    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table: its rows are the model's word vectors."""
        raise NotImplementedError

    def output_embeddings(self) -> torch.Tensor:
        """(V, H) weight of the softmax layer (the same tensor as the input table when tied)."""
        raise NotImplementedError
