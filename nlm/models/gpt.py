"""Decoder-only Transformer language model (GPT-2 layout, after nanoGPT).

    x = wte(ids) + position(pos)
    for each block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))     pre-LayerNorm, residuals
    logits = lm_head(ln_f(x))                                          lm_head tied to wte

Attention is masked multi-head self-attention through F.scaled_dot_product_attention (flash /
memory-efficient kernels where available). Positions are learned (GPT-2) or sinusoidal
(Vaswani et al. 2017: PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)).
Init is GPT-2's: N(0, 0.02) everywhere, residual output projections N(0, 0.02 / sqrt(2 L)).

Left-padded batches (`attention_mask`): each row's positions count from its first real token,
and no query attends to a padded key, so a row computes what it would alone. Generation keeps
a preallocated KV cache (`KVCache`) and feeds one token per step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from nlm.config import Config
from nlm.errors import NLMError
from nlm.models.base import CausalLanguageModel, ModelOutput, attention_flops_per_token
from nlm.objectives import causal_lm_loss


@dataclasses.dataclass
class GPTConfig(Config):
    vocab_size: int = 50304
    block_size: int = 1024  # max positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    positions: str = "learned"  # "learned" | "sinusoidal"
    # "gelu" (exact, erf) | "gelu_tanh" (GPT-2's tanh approximation, for imported GPT-2 weights)
    activation: str = "gelu"


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) table: PE[pos, 2i] = sin(pos / 10000^(2i/dim)), PE[pos, 2i+1] = cos(...)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table.float()


@dataclasses.dataclass
class KVCache:
    """Keys/values of every layer for generation, preallocated to the longest length needed."""

    n_layer: int
    max_len: int
    length: int = 0  # filled positions
    key_mask: torch.Tensor | None = None  # (B, max_len) real tokens; None when nothing is padded
    next_pos: torch.Tensor | None = None  # (B,) position id of the next token per row
    keys: torch.Tensor | None = None  # (n_layer, B, n_head, max_len, head_dim)
    values: torch.Tensor | None = None

    def write(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hd) keys/values; return everything cached so far."""
        if self.keys is None:  # allocated on first use, in the dtype attention runs in (autocast)
            shape = (self.n_layer, *k.shape[:2], self.max_len, k.size(3))
            self.keys = k.new_empty(shape)
            self.values = v.new_empty(shape)
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    # Continuous batching: rows join and leave a running generation between decode steps.

    @staticmethod
    def join(caches: list[KVCache]) -> KVCache:
        """One cache with the rows of `caches` in order. Shorter caches are left-padded to the
        longest (zero keys/values, masked out), and there is room for every row's remaining
        tokens."""
        length = max(c.length for c in caches)
        room = max(c.max_len - c.length for c in caches)
        n_layer, _, n_head, _, head_dim = caches[0].keys.shape
        batch = sum(c.keys.size(1) for c in caches)
        keys = caches[0].keys.new_zeros(n_layer, batch, n_head, length + room, head_dim)
        values = torch.zeros_like(keys)
        key_mask = torch.ones(batch, length + room, dtype=torch.bool, device=keys.device)
        row = 0
        for c in caches:
            rows, pad = slice(row, row + c.keys.size(1)), length - c.length
            keys[:, rows, :, pad:length] = c.keys[:, :, :, : c.length]
            values[:, rows, :, pad:length] = c.values[:, :, :, : c.length]
            key_mask[rows, :pad] = False
            if c.key_mask is not None:
                key_mask[rows, pad:length] = c.key_mask[:, : c.length]
            row = rows.stop
        next_pos = torch.cat([c.next_pos for c in caches])
        mask = None if bool(key_mask.all()) else key_mask
        return KVCache(n_layer, length + room, length, mask, next_pos, keys, values)

    def select(self, rows: torch.Tensor) -> KVCache:
        """The cache of `rows` ((R,) long), without the leading positions none of them uses."""
        keys, values = self.keys.index_select(1, rows), self.values.index_select(1, rows)
        key_mask, start = self.key_mask, 0
        if key_mask is not None:
            key_mask = key_mask.index_select(0, rows)
            used = key_mask[:, : self.length].any(dim=0)
            start = int(used.int().argmax()) if bool(used.any()) else self.length
            key_mask = key_mask[:, start:]
            keys, values = keys[:, :, :, start:], values[:, :, :, start:]
            if bool(key_mask.all()):
                key_mask = None
        return KVCache(
            self.n_layer,
            self.max_len - start,
            self.length - start,
            key_mask,
            self.next_pos.index_select(0, rows),
            keys,
            values,
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.c_attn(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # write this step's keys/values, attend over everything so far
            k, v = cache.write(layer, k, v)
        # No explicit mask and queries == keys: plain causal attention (the fused fast path).
        is_causal = attn_mask is None and q.size(2) == k.size(2) and time > 1
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(CausalLanguageModel):
    family = "gpt"
    config_class = GPTConfig
    objective = "clm"
    causal = True
    recurrent = False
    max_positions_field = "block_size"
    summary_type = "last"  # the closing </s> has seen the whole input

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        if config.n_embd % config.n_head:
            raise NLMError(
                f"gpt config (field 'n_head'): {config.n_head} does not divide n_embd {config.n_embd}"
            )
        if config.positions not in ("learned", "sinusoidal"):
            raise NLMError(
                f"gpt config (field 'positions'): '{config.positions}' is not 'learned' or 'sinusoidal'"
            )
        if config.activation not in ("gelu", "gelu_tanh"):
            raise NLMError(
                f"gpt config (field 'activation'): '{config.activation}' is not 'gelu' or 'gelu_tanh'"
            )
        if config.positions == "sinusoidal" and config.n_embd % 2:
            raise NLMError(
                f"gpt config (field 'n_embd'): sinusoidal positions need an even size, got {config.n_embd}"
            )
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.positions == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        else:  # a fixed table: not a parameter, not saved in checkpoints
            self.wpe = None
            self.register_buffer(
                "pe", sinusoidal_positions(config.block_size, config.n_embd), persistent=False
            )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    def flops_per_token(self, seq_len: int) -> float:
        c = self.config
        return super().flops_per_token(seq_len) + attention_flops_per_token(
            c.n_layer, c.n_embd, seq_len
        )

    def input_embeddings(self) -> nn.Embedding:
        return self.wte

    def output_embeddings(self) -> torch.Tensor:
        return self.lm_head.weight

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = super().num_parameters(exclude_embeddings)
        if exclude_embeddings and self.wpe is not None:
            total -= self.wpe.weight.numel()
        return total

    def _embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        pos = self.wpe(positions) if self.wpe is not None else self.pe[positions]
        return self.drop(self.wte(input_ids) + pos)

    def _run(self, x, attn_mask, cache=None) -> torch.Tensor:
        for layer, block in enumerate(self.blocks):
            x = block(x, attn_mask, cache, layer)
        return self.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """(B, T) ids -> logits (B, T, V), hidden (B, T, n_embd), the mean loss when `targets`.

        `logits_to_keep` (transformers' name; 0 keeps all): the vocabulary projection of the
        last N positions only, logits (B, N, V), the loss over targets[:, -N:]. Evaluation
        scores only the new positions of an overlapping window this way (the projection is
        two thirds of the small model's forward FLOPs)."""
        batch, time = input_ids.shape
        if time > self.config.block_size:
            raise NLMError(
                f"input of {time} tokens is longer than the model's max_positions {self.config.block_size}"
            )
        positions, attn_mask = torch.arange(time, device=input_ids.device), None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            positions, attn_mask = padded_positions_and_mask(attention_mask.bool())
        hidden = self._run(self._embed(input_ids, positions), attn_mask)
        if logits_to_keep:
            logits = self.lm_head(hidden[:, -logits_to_keep:])
            targets = targets[:, -logits_to_keep:] if targets is not None else None
        else:
            logits = self.lm_head(hidden)
        loss = causal_lm_loss(logits, targets) if targets is not None else None
        return ModelOutput(logits=logits, loss=loss, hidden=hidden)

    # Generation with a KV cache.
    def prefill(self, input_ids, attention_mask, max_new_tokens):
        batch, time = input_ids.shape
        device = input_ids.device
        longest = time if attention_mask is None else int(attention_mask.sum(dim=1).max())
        if longest + max_new_tokens > self.config.block_size:
            raise NLMError(
                f"prompt of {longest} tokens + {max_new_tokens} new ones exceeds the model's "
                f"max_positions {self.config.block_size}"
            )
        cache = KVCache(
            self.config.n_layer,
            time + max_new_tokens,
            next_pos=torch.full((batch,), time, device=device),
        )
        positions, attn_mask = torch.arange(time, device=device), None
        if attention_mask is not None:
            positions, attn_mask = padded_positions_and_mask(attention_mask)
            cache.key_mask = torch.ones(
                batch, time + max_new_tokens, dtype=torch.bool, device=device
            )
            cache.key_mask[:, :time] = attention_mask
            cache.next_pos = attention_mask.sum(dim=1)
        hidden = self._run(self._embed(input_ids, positions), attn_mask, cache)
        cache.length = time
        return self.lm_head(hidden[:, -1]), cache

    def join_caches(self, caches):
        return KVCache.join(caches)

    def select_cache(self, cache, rows):
        return cache.select(rows)

    def decode_step(self, next_ids, cache):
        attn_mask = None
        if cache.key_mask is not None:  # the new query sees every real key so far, itself included
            attn_mask = cache.key_mask[:, None, None, : cache.length + 1]
        x = self._embed(next_ids[:, None], cache.next_pos[:, None])
        hidden = self._run(x, attn_mask, cache)
        cache.length += 1
        cache.next_pos = cache.next_pos + 1
        return self.lm_head(hidden[:, -1]), cache


def padded_positions_and_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a left-padded (B, T) mask: per-row position ids, and a (B, 1, T, T) attention mask.

    A query attends to real keys at or before it. Padded queries also see themselves so that
    no row of the mask is empty (SDPA would return NaN); their outputs are never used.
    """
    mask = mask.bool()
    time = mask.size(1)
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    causal = torch.ones(time, time, dtype=torch.bool, device=mask.device).tril()
    eye = torch.eye(time, dtype=torch.bool, device=mask.device)
    allowed = (causal[None] & mask[:, None, :]) | eye[None]
    return positions, allowed[:, None]
