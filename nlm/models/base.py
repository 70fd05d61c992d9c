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
- gpt's forward also takes `logits_to_keep` (transformers' name; 0 = all): logits (B, N, V)
  of the last N positions only. Evaluation passes it when the forward has it (as transformers'
  generation does), so an overlapping window projects only its new positions.
- `ModelOutput.hidden` is the final hidden state (B, T, H) before the output projection; serving
  mean-pools it for /v1/embed.
- Weight tying (`tie_weights`, all five): the softmax matrix is the input embedding table, the
  course notes' "L_T^T x h". When the hidden size H differs from the embedding size E (fnn,
  rnn, lstm), a bias-free linear projection H -> E sits before the tied softmax, so
  logits = L (P h) + b; `output_embeddings()` is then still L (V, E). `ModelOutput.hidden` is
  h, before the projection.
- Causal models share `generate` (below) through the public incremental-decoding protocol
  (`IncrementalDecoder`): `prefill` runs the prompt and returns the last position's logits and a
  cache (KV cache, recurrent state or the fnn window), `decode_step` feeds one new token per row,
  and `join_caches` / `select_cache` add and drop rows between steps (continuous batching,
  nlm.inference.ContinuousGeneration). Left-padded batches use `attention_mask` (1 = real
  token); every row's result equals generating for that prompt alone.

Family facts. Everything the rest of nlm needs to know about a family is a fact on its class
(set in its own file), never a comparison with its name (tests/test_families.py checks both):

    family               the registry name (nlm/models/__init__.py FAMILIES)
    config_class         its `Config` dataclass
    objective            "clm" | "mlm": the shards it trains on (`nlm prepare --objective`)
    causal               left to right: `generate`, the decoding protocol, perplexity over windows;
                         False: bidirectional, scored by pseudo-log-likelihood (Salazar et al. 2020)
    recurrent            carries a state from one window to the next (truncated BPTT): trained on
                         parallel streams, evaluated as one stream
    max_positions_field  the config field that bounds the input length (None: unbounded);
                         `max_positions` reads it (HF's `max_position_embeddings`)
    summary_type         which hidden state sums up a sequence for a task head (HF's
                         SequenceSummary): "first" ([CLS], bert's input layout), "last" (the
                         closing </s>, left-padded batches), None: not fine-tunable
    backward_lm          also a right-to-left LM on the same clm rows (elmo): `ModelOutput`
                         carries `backward_logits` and `direction_losses`; evaluation reports the
                         backward perplexity beside the forward one. Default False.
and per instance (they depend on the config): `max_positions`, `context_size` (tokens of left
context one prediction sees: n-1 for the fnn, None when it sees all before it), `hidden_size`
(H of `ModelOutput.hidden`), `flops_per_token(seq_len)` and `pretraining_head_parameters()`.
How the other layers use them: evaluation (nlm/evaluation.py) scores `not causal` models by
pseudo-likelihood, `recurrent` ones as a stream and the rest over windows overlapping by
`context_size` (or a stride); serving (nlm.inference.serving_endpoints) offers generate to causal
models and fill-mask to mlm ones; the trainer batches `objective` rows, as streams when
`recurrent`. A clm family that is not causal (elmo, bidirectional) reads clm rows like the
causal ones but gets no generate endpoint; its `logits` are its forward (left-to-right) LM's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

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
    # elmo only: the backward LM's (B, T, V) logits of input_ids[:, t] given the tokens after it,
    # and each direction's mean NLL ({"forward", "backward"}) when targets were given.
    backward_logits: torch.Tensor | None = None
    direction_losses: dict[str, torch.Tensor] | None = None


class LanguageModel(nn.Module):
    """Base class of the families. Subclasses set the family facts (module docstring)."""

    family: ClassVar[str]
    config_class: ClassVar[type[Config]]
    objective: ClassVar[Literal["clm", "mlm", "span"]]
    causal: ClassVar[bool]
    recurrent: ClassVar[bool] = False
    max_positions_field: ClassVar[str | None] = None
    summary_type: ClassVar[Literal["first", "last"] | None] = None
    backward_lm: ClassVar[bool] = False

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config

    @property
    def max_positions(self) -> int | None:
        """The longest input (tokens) the model takes; None when unbounded. Longer inputs raise
        NLMError in `forward`."""
        if self.max_positions_field is None:
            return None
        return getattr(self.config, self.max_positions_field)

    @property
    def context_size(self) -> int | None:
        """How many previous tokens one prediction conditions on; None: every earlier token of
        its input (within `max_positions`), or the whole carried stream for recurrent models."""
        return None

    @property
    def hidden_size(self) -> int:
        """H, the last dimension of `ModelOutput.hidden` (what embeddings and task heads read)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at `seq_len` tokens per row: 6N for the N weights (forward
        2N, backward 4N; Kaplan et al. 2020, nanoGPT/PaLM's MFU count). N counts every parameter
        once (a tied matrix once). Transformers add their attention term
        (`attention_flops_per_token`); the recurrent and n-gram families have none."""
        return 6.0 * self.num_parameters()

    def pretraining_head_parameters(self) -> list[nn.Parameter]:
        """Parameters only the pretraining objective uses, not the hidden states (bert's MLM
        transform, pooler, NSP classifier, decoder bias): frozen when fine-tuning a task head."""
        return []

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


@runtime_checkable
class IncrementalDecoder(Protocol):
    """Token-by-token decoding with a cache, the protocol `generate` and continuous batching
    (nlm.inference.ContinuousGeneration, Yu et al., Orca, OSDI 2022) drive.

    A cache is whatever the model needs to continue: gpt's `KVCache`, the recurrent state, the
    fnn's window. It is opaque to callers: they pass it back to `decode_step`, `join_caches` and
    `select_cache` only, and rows keep their order.
    """

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[torch.Tensor, Any]:
        """Run (B, T) left-padded prompts (`attention_mask` 1 = real token, None = all real),
        with room for `max_new_tokens` more: ((B, V) logits of the next token, cache). Raises
        NLMError when prompt plus new tokens exceed `max_positions`."""
        ...

    def decode_step(self, next_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token per row ((B,) long): ((B, V) logits of the token after it, cache)."""
        ...

    def join_caches(self, caches: list[Any]) -> Any:
        """One cache holding the rows of `caches` in order (each from `prefill`/`decode_step`,
        possibly at different lengths)."""
        ...

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """The cache of the given rows ((R,) long index), in that order."""
        ...


class CausalLanguageModel(LanguageModel):
    """A left-to-right model with incremental generation (fnn, rnn, lstm, gpt); implements
    `IncrementalDecoder`."""

    objective: ClassVar[Literal["clm", "mlm"]] = "clm"
    causal: ClassVar[bool] = True

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[torch.Tensor, Any]:
        """See `IncrementalDecoder.prefill`."""
        raise NotImplementedError

    def decode_step(self, next_ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
        """See `IncrementalDecoder.decode_step`."""
        raise NotImplementedError

    # The defaults handle caches that are a tensor or a tuple of tensors with the batch along
    # `cache_batch_dim` (recurrent state, the fnn window); gpt's KV cache overrides both.
    cache_batch_dim: ClassVar[int] = 0

    def join_caches(self, caches: list[Any]) -> Any:
        """See `IncrementalDecoder.join_caches`."""
        return _map_tensors(lambda *ts: torch.cat(ts, dim=self.cache_batch_dim), *caches)

    def select_cache(self, cache: Any, rows: torch.Tensor) -> Any:
        """See `IncrementalDecoder.select_cache`."""
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
            logits, cache = self.prefill(input_ids, attention_mask, max_new_tokens)
            new_ids, logprobs = [], []
            for step in range(max_new_tokens):
                ids, lp = sample_next(logits, temperature, top_k, top_p, generator)
                new_ids.append(ids)
                logprobs.append(lp)
                if step + 1 < max_new_tokens:
                    logits, cache = self.decode_step(ids, cache)
        finally:
            self.train(was_training)
        return torch.stack(new_ids, dim=1), torch.stack(logprobs, dim=1)


def attention_flops_per_token(n_layer: int, width: int, seq_len: int) -> float:
    """Self-attention's FLOPs per token beyond the weights' 6N: 12·L·(H·Q)·T for L layers of H
    heads of size Q (H·Q = width) over T positions (the PaLM paper's appendix B, nanoGPT's MFU)."""
    return 12.0 * n_layer * width * seq_len


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
