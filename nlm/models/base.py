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
  `targets` (see nlm/models/bert.py). With `mlm_labels` its `logits` are (M, V), only the
  labelled positions (aligned with `mlm_labels[mlm_labels != -100]`); without, (B, T, V).
- Causal forwards also accept `attention_mask` (left padding, 1 = real token): each row then
  computes exactly what it would alone. gpt/bert have `max_positions` (block size); a longer
  input raises NLMError.
- `ModelOutput.hidden` is the final hidden state (B, T, H) before the output projection; serving
  mean-pools it for /v1/embed.
- Weight tying (`tie_weights`, all five): the softmax matrix is the input embedding table, the
  course notes' "L_T^T x h". When the hidden size H differs from the embedding size E (fnn,
  rnn, lstm), a bias-free linear projection H -> E sits before the tied softmax, so
  logits = L (P h) + b; `output_embeddings()` is then still L (V, E). `ModelOutput.hidden` is
  h, before the projection.
- Causal models share `generate` (below): each implements `_prefill` (run the prompt, return
  the last position's logits and a cache: KV cache, recurrent state or the fnn window) and
  `_decode` (one new token per row). Left-padded batches use `attention_mask` (1 = real token);
  every row's result equals generating for that prompt alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from nlm.config import Config
from nlm.errors import NLMError
from nlm.sampling import check_sampling_args, sample_next

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


class CausalLanguageModel(LanguageModel):
    """A left-to-right model with incremental generation (fnn, rnn, lstm, gpt)."""

    causal: ClassVar[bool] = True

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[torch.Tensor, Any]:
        """Run the (left-padded) prompt: (B, V) logits for the next token, plus the cache."""
        raise NotImplementedError

    def _decode(self, next_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token per row (B,): (B, V) logits for the token after it, plus the cache."""
        raise NotImplementedError

    # Continuous batching (nlm.inference.ContinuousGeneration) adds and drops rows of a running
    # generation between decode steps. The default handles caches that are a tensor or a tuple
    # of tensors with the batch along `cache_batch_dim` (recurrent state, the fnn window); gpt's
    # KV cache overrides both.
    cache_batch_dim: ClassVar[int] = 0

    def _join_caches(self, caches: list[Any]) -> Any:
        """One cache holding the rows of `caches` in order (each from `_prefill`/`_decode`)."""
        return _map_tensors(lambda *ts: torch.cat(ts, dim=self.cache_batch_dim), *caches)

    def _select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """The cache of the given rows (a (R,) long index), in that order."""
        return _map_tensors(lambda t: t.index_select(self.cache_batch_dim, rows), cache)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue each prompt by `max_new_tokens` tokens -> (new_ids (B, N), logprobs (B, N)).

        `logprobs` are the model's log-softmax (temperature 1) of each chosen token. Runs in eval
        mode (no dropout) and restores the previous mode afterwards.
        """
        check_sampling_args(temperature, top_k, top_p)
        if input_ids.dim() != 2 or input_ids.size(1) == 0:
            raise NLMError(
                f"input_ids: expected a non-empty (batch, time) tensor, got shape {tuple(input_ids.shape)}"
            )
        if max_new_tokens < 0:
            raise NLMError(f"field 'max_new_tokens': must be >= 0, got {max_new_tokens}")
        attention_mask = check_left_padding(input_ids, attention_mask)
        batch = input_ids.size(0)
        if max_new_tokens == 0:
            empty = torch.empty(batch, 0, device=input_ids.device)
            return empty.long(), empty.float()
        was_training = self.training
        self.eval()
        try:
            logits, cache = self._prefill(input_ids, attention_mask, max_new_tokens)
            new_ids, logprobs = [], []
            for step in range(max_new_tokens):
                ids, lp = sample_next(logits, temperature, top_k, top_p, generator)
                new_ids.append(ids)
                logprobs.append(lp)
                if step + 1 < max_new_tokens:
                    logits, cache = self._decode(ids, cache)
        finally:
            self.train(was_training)
        return torch.stack(new_ids, dim=1), torch.stack(logprobs, dim=1)


def _map_tensors(fn: Any, *states: Any) -> Any:
    """fn applied to matching tensors of same-shaped states (a tensor or nested tuples/lists)."""
    first = states[0]
    if isinstance(first, tuple | list):
        return type(first)(_map_tensors(fn, *parts) for parts in zip(*states, strict=True))
    return fn(*states)


def detach_state(state: Any) -> Any:
    """A recurrent state (a tensor, or a tuple/list of them such as the LSTM's (h, c)) cut from
    the graph: truncated BPTT carries the values into the next window, not the gradients."""
    if state is None:
        return None
    return _map_tensors(torch.Tensor.detach, state)


def check_left_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Validate a left-padding mask; None when it marks every token real (the fast path)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise NLMError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}"
        )
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise NLMError("attention_mask: prompts must be left-padded (zeros first, then ones)")
    return mask


def output_layer(
    embedding: nn.Embedding, hidden_size: int, tie_weights: bool, bias: bool = True
) -> tuple[nn.Linear | None, nn.Linear]:
    """(projection or None, decoder) for a softmax over the vocabulary on top of size-H states.

    Tied: the decoder's weight is the embedding table (V, E); if H != E a bias-free H -> E
    projection comes first (see the module docstring).
    """
    vocab_size, embed_dim = embedding.weight.shape
    proj = None
    if tie_weights and hidden_size != embed_dim:
        proj = nn.Linear(hidden_size, embed_dim, bias=False)
    decoder = nn.Linear(embed_dim if tie_weights else hidden_size, vocab_size, bias=bias)
    if tie_weights:
        decoder.weight = embedding.weight
    return proj, decoder
