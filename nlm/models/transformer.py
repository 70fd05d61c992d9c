"""Encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need").

    memory = Encoder(source)                                   N layers, each:
        x = Sub(x, SelfAttention)     x = Sub(x, FFN)
    logits = W · Decoder(target_in, memory)                    N layers, each:
        y = Sub(y, MaskedSelfAttention)                        never looks ahead
        y = Sub(y, CrossAttention)                             q from y, k and v from memory
        y = Sub(y, FFN)

    Sub(x, F) = LayerNorm(x + Dropout(F(x)))        post-LN, the paper's section 3.1 (default)
              = x + Dropout(F(LayerNorm(x)))        pre-LN (`norm: pre`, Xiong et al. 2020),
                                                    with a final LayerNorm on each stack

Inputs are `sqrt(d_model) · E[token] + PE[pos]` with the paper's sinusoidal PE (section 3.5);
the source and target tables are one matrix when `share_embeddings` (section 3.4), and the
softmax weight is the target table when `tie_weights`. Every attention is
`F.scaled_dot_product_attention`. Training is teacher-forced: the decoder reads `<s>` and the
target shifted right, and predicts the target. Generation (`prefill` / `decode_step`, the
`IncrementalDecoder` protocol) encodes each source once, computes every layer's cross-attention
keys and values once (`Seq2SeqCache.memory_*`), and keeps a self-attention KV cache (gpt's
`KVCache`) that grows by one token per step.

Source padding may be on either side (the encoder masks padded keys, positions count from each
row's first real token), so a row computes what it would alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nlm.config import Config
from nlm.errors import NLMError
from nlm.models.base import (
    IGNORE_INDEX,
    CausalLanguageModel,
    LanguageModel,
    ModelOutput,
    attention_flops_per_token,
)
from nlm.models.gpt import KVCache, sinusoidal_positions
from nlm.objectives import causal_lm_loss

DECODER_START_ID = 2  # <s> (nlm/tokenizers/base.py's fixed special ids)
PAD_ID = 0


@dataclasses.dataclass
class TransformerConfig(Config):
    vocab_size: int = 32128
    max_positions: int = 512  # the longest source, and the longest target
    n_layer: int = 6  # encoder layers, and decoder layers
    n_head: int = 8
    n_embd: int = 512  # d_model
    ffn_size: int = 2048  # d_ff
    dropout: float = 0.1
    norm: str = "post"  # "post": LayerNorm(x + Sublayer(x)) as in the paper | "pre"
    share_embeddings: bool = True  # one token table for source and target
    tie_weights: bool = True  # the softmax weight is the target token table
    bias: bool = True
    layer_norm_eps: float = 1e-5


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (section 3.2.2): softmax(q k^T / sqrt(d_k)) v per
    head, heads concatenated and projected. Queries come from `x`; keys and values from whatever
    `keys_values` was given (x itself for self-attention, the encoder output for cross)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c, bias = config.n_embd, config.bias
        self.n_head = config.n_head
        self.q = nn.Linear(c, c, bias=bias)
        self.k = nn.Linear(c, c, bias=bias)
        self.v = nn.Linear(c, c, bias=bias)
        self.out = nn.Linear(c, c, bias=bias)
        self.dropout = config.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, n_head, T, C / n_head)."""
        return x.view(*x.shape[:2], self.n_head, -1).transpose(1, 2)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) states -> their keys and values, (B, n_head, S, head_dim) each."""
        return self._heads(self.k(memory)), self._heads(self.v(memory))

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """(B, T, C) queries' states attend over (B, nh, S, hd) keys/values -> (B, T, C).
        `attn_mask` (broadcast to (B, nh, T, S)) is True where a query may look."""
        q = self._heads(self.q(x))
        y = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        return self.out(y.transpose(1, 2).reshape(x.shape))


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.ffn_size, bias=config.bias)
        self.w2 = nn.Linear(config.ffn_size, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.drop(F.relu(self.w1(x))))


class SubLayer(nn.Module):
    """A residual connection and layer normalisation around one sub-layer:
    post-LN `LayerNorm(x + Dropout(f(x)))` (the paper, section 3.1 and 5.4) or pre-LN
    `x + Dropout(f(LayerNorm(x)))`."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre = config.norm == "pre"
        self.norm = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.pre:
            return x + self.drop(f(self.norm(x)))
        return self.norm(x + self.drop(f(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.attn = Attention(config)
        self.attn_sub = SubLayer(config)
        self.ffn = FeedForward(config)
        self.ffn_sub = SubLayer(config)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_sub(x, lambda h: self.attn(h, *self.attn.keys_values(h), attn_mask=key_mask))
        return self.ffn_sub(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.self_sub = SubLayer(config)
        self.cross_attn = Attention(config)
        self.cross_sub = SubLayer(config)
        self.ffn = FeedForward(config)
        self.ffn_sub = SubLayer(config)

    def forward(
        self,
        y: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        memory_mask: torch.Tensor | None,
        self_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """Teacher-forced (cache None): causal self-attention over all of `y`. Cached: `y` is
        the next position(s), attending over the cached keys plus their own (`self_mask`: the
        real keys of joined caches)."""

        def masked_self_attention(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attn.keys_values(h)
            if cache is not None:
                k, v = cache.write(layer, k, v)
            causal = cache is None and h.size(1) > 1
            return self.self_attn(h, k, v, attn_mask=self_mask, is_causal=causal)

        y = self.self_sub(y, masked_self_attention)
        y = self.cross_sub(y, lambda h: self.cross_attn(h, *memory_kv, attn_mask=memory_mask))
        return self.ffn_sub(y, self.ffn)


@dataclasses.dataclass
class Seq2SeqCache:
    """What generation keeps per row: the decoder's self-attention cache, and every layer's
    cross-attention keys/values of the encoded source (computed once, in `prefill`)."""

    self_attn: KVCache
    memory_keys: torch.Tensor  # (n_layer, B, n_head, S, head_dim)
    memory_values: torch.Tensor
    memory_mask: torch.Tensor | None  # (B, S) True = real source token; None: all real

    @staticmethod
    def join(caches: list[Seq2SeqCache]) -> Seq2SeqCache:
        """One cache with the rows of `caches` in order; shorter sources padded on the right
        (zero keys/values, masked out)."""
        longest = max(c.memory_keys.size(3) for c in caches)
        keys, values, masks = [], [], []
        for c in caches:
            pad = longest - c.memory_keys.size(3)
            keys.append(F.pad(c.memory_keys, (0, 0, 0, pad)))
            values.append(F.pad(c.memory_values, (0, 0, 0, pad)))
            mask = c.memory_mask
            if mask is None:
                mask = torch.ones(c.memory_keys.shape[1], c.memory_keys.size(3), dtype=torch.bool)
                mask = mask.to(c.memory_keys.device)
            masks.append(F.pad(mask, (0, pad), value=False))
        mask = torch.cat(masks)
        return Seq2SeqCache(
            KVCache.join([c.self_attn for c in caches]),
            torch.cat(keys, dim=1),
            torch.cat(values, dim=1),
            None if bool(mask.all()) else mask,
        )

    def select(self, rows: torch.Tensor) -> Seq2SeqCache:
        """The cache of `rows` ((R,) long), in that order."""
        mask = None if self.memory_mask is None else self.memory_mask.index_select(0, rows)
        return Seq2SeqCache(
            self.self_attn.select(rows),
            self.memory_keys.index_select(1, rows),
            self.memory_values.index_select(1, rows),
            None if mask is None or bool(mask.all()) else mask,
        )


class Transformer(LanguageModel):
    """The encoder-decoder of Vaswani et al. 2017 (module docstring).

    `forward(input_ids, targets=None, attention_mask=None, decoder_input_ids=None)`:
    `input_ids` (B, S) the source (`attention_mask` 1 = real token, either padding side);
    `targets` (B, T) the target tokens (-100 ignored), the decoder reading `<s>` + targets
    shifted right unless `decoder_input_ids` is given. -> ModelOutput with `logits` (B, T, V)
    (no targets, no decoder input: one step from `<s>`, T = 1), `loss` (the mean token NLL of
    the targets) and `hidden` (B, S, C), the encoder's output (what embeddings read). Raises
    NLMError when the source or target is longer than `max_positions`.
    """

    family = "transformer"
    config_class = TransformerConfig
    objective = "span"
    causal = False  # it generates, but from a source: not a left-to-right LM of its input
    recurrent = False
    max_positions_field = "max_positions"
    summary_type = None

    # Generation is CausalLanguageModel's loop over `prefill` / `decode_step` (one source each).
    generate = CausalLanguageModel.generate

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        if config.n_embd % config.n_head:
            raise NLMError(
                f"transformer config (field 'n_head'): {config.n_head} does not divide n_embd {config.n_embd}"
            )
        if config.n_embd % 2:
            raise NLMError(
                f"transformer config (field 'n_embd'): sinusoidal positions need an even size, got {config.n_embd}"
            )
        if config.norm not in ("post", "pre"):
            raise NLMError(
                f"transformer config (field 'norm'): '{config.norm}' is not 'post' or 'pre'"
            )
        c = config.n_embd
        self.source_tokens = nn.Embedding(config.vocab_size, c)
        self.target_tokens = (
            self.source_tokens if config.share_embeddings else nn.Embedding(config.vocab_size, c)
        )
        self.register_buffer("pe", sinusoidal_positions(config.max_positions, c), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_layer))
        # Pre-LN leaves each stack's output unnormalised: a final LayerNorm (post-LN has none).
        final = config.norm == "pre"
        eps = config.layer_norm_eps
        self.encoder_norm = nn.LayerNorm(c, eps=eps) if final else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c, eps=eps) if final else nn.Identity()
        self.lm_head = nn.Linear(c, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_weights:
            self.lm_head.weight = self.target_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        # fairseq's Transformer init: Xavier-uniform matrices; tokens N(0, d^-1/2), so that
        # sqrt(d) · E[token] has unit scale like the positions.
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.n_embd**-0.5)

    # --- facts -------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def flops_per_token(self, seq_len: int) -> float:
        """6N plus three attentions per layer pair (encoder self, decoder self, cross) over
        `seq_len` positions."""
        c = self.config
        return super().flops_per_token(seq_len) + attention_flops_per_token(
            3 * c.n_layer, c.n_embd, seq_len
        )

    def input_embeddings(self) -> nn.Embedding:
        return self.source_tokens

    def output_embeddings(self) -> torch.Tensor:
        return self.lm_head.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = super().num_parameters(exclude_embeddings)
        if exclude_embeddings and self.target_tokens is not self.source_tokens:
            total -= self.target_tokens.weight.numel()
        return total

    # --- the two stacks ------------------------------------------------------------------------

    def _check_length(self, what: str, length: int) -> None:
        if length > self.config.max_positions:
            raise NLMError(
                f"{what} of {length} tokens is longer than the model's max_positions "
                f"{self.config.max_positions}"
            )

    def _embed(self, table: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor):
        return self.drop(table(ids) * math.sqrt(self.config.n_embd) + self.pe[positions])

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, S) source -> ((B, S, C) memory, (B, 1, 1, S) key mask or None when all real)."""
        self._check_length("input", input_ids.size(1))
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            real = attention_mask.bool()
            positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
            key_mask = real[:, None, None, :]
        x = self._embed(self.source_tokens, input_ids, positions)
        for layer in self.encoder:
            x = layer(x, key_mask)
        return self.encoder_norm(x), key_mask

    def _memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_attn.keys_values(memory) for layer in self.decoder]

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced decoder: (B, T) target inputs over (B, S, C) memory -> (B, T, C)."""
        self._check_length("target", decoder_input_ids.size(1))
        positions = torch.arange(decoder_input_ids.size(1), device=decoder_input_ids.device)
        y = self._embed(self.target_tokens, decoder_input_ids, positions)
        for layer, kv in zip(self.decoder, self._memory_kv(memory), strict=True):
            y = layer(y, kv, memory_mask)
        return self.decoder_norm(y)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        memory, memory_mask = self.encode(input_ids, attention_mask)
        if decoder_input_ids is None:
            if targets is not None:
                decoder_input_ids = shift_right(targets)
            else:
                decoder_input_ids = input_ids.new_full((input_ids.size(0), 1), DECODER_START_ID)
        logits = self.lm_head(self.decode(decoder_input_ids, memory, memory_mask))
        loss = causal_lm_loss(logits, targets) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden=memory)

    # --- incremental decoding (IncrementalDecoder) -----------------------------------------------

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int
    ) -> tuple[torch.Tensor, Seq2SeqCache]:
        """Encode (B, S) sources (the prompts), cache the cross-attention keys/values, and run
        the decoder on `<s>`: ((B, V) logits of the first target token, cache). Raises NLMError
        when a source or `max_new_tokens` exceeds `max_positions`."""
        longest = input_ids.size(1) if attention_mask is None else int(attention_mask.sum(1).max())
        self._check_length("source", longest)
        if max_new_tokens > self.config.max_positions:
            raise NLMError(
                f"{max_new_tokens} new tokens exceed the model's max_positions {self.config.max_positions}"
            )
        memory, key_mask = self.encode(input_ids, attention_mask)
        kv = self._memory_kv(memory)
        batch = input_ids.size(0)
        cache = Seq2SeqCache(
            KVCache(
                self.config.n_layer,
                max_new_tokens + 1,
                next_pos=torch.zeros(batch, dtype=torch.long, device=input_ids.device),
            ),
            torch.stack([k for k, _ in kv]),
            torch.stack([v for _, v in kv]),
            None if key_mask is None else key_mask[:, 0, 0],
        )
        start = input_ids.new_full((batch,), DECODER_START_ID)
        return self.decode_step(start, cache)

    def decode_step(
        self, next_ids: torch.Tensor, cache: Seq2SeqCache
    ) -> tuple[torch.Tensor, Seq2SeqCache]:
        """Feed one target token per row ((B,) long): ((B, V) logits of the next, cache)."""
        kv_cache = cache.self_attn
        self_mask = None
        if kv_cache.key_mask is not None:  # joined rows: each sees its own real keys and itself
            self_mask = kv_cache.key_mask[:, None, None, : kv_cache.length + 1]
        memory_mask = None if cache.memory_mask is None else cache.memory_mask[:, None, None, :]
        y = self._embed(self.target_tokens, next_ids[:, None], kv_cache.next_pos[:, None])
        for layer, block in enumerate(self.decoder):
            kv = (cache.memory_keys[layer], cache.memory_values[layer])
            y = block(y, kv, memory_mask, self_mask, kv_cache, layer)
        kv_cache.length += 1
        kv_cache.next_pos = kv_cache.next_pos + 1
        return self.lm_head(self.decoder_norm(y)[:, -1]), cache

    def join_caches(self, caches: list[Seq2SeqCache]) -> Seq2SeqCache:
        return Seq2SeqCache.join(caches)

    def select_cache(self, cache: Seq2SeqCache, rows: torch.Tensor) -> Seq2SeqCache:
        return cache.select(rows)


def shift_right(targets: torch.Tensor) -> torch.Tensor:
    """Teacher forcing's decoder input: (B, T) targets -> `<s>` followed by targets[:, :-1]
    (ignored labels, -100, read as `<pad>`)."""
    shifted = targets.new_full(targets.shape, DECODER_START_ID)
    shifted[:, 1:] = targets[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, PAD_ID)
