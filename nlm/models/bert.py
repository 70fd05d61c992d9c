"""BERT: a bidirectional Transformer encoder pretrained with masked-LM and next-sentence
prediction (Devlin et al. 2019), in the original post-LayerNorm layout.

    x = LayerNorm(tok(ids) + pos(0..T-1) + seg(token_type_ids))
    for each layer:  x = LN(x + attn(x));  x = LN(x + ffn(x))        GELU feed-forward
    MLM head:  logits = decoder(LN(gelu(dense(x))))                   decoder tied to tok
    NSP head:  nsp_logits = classifier(tanh(pooler(x[:, 0])))          on [CLS]; 0 = IsNext

forward(input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None, nsp_labels=None):
- without mlm_labels, `logits` is the full (B, T, V) (fill-mask needs it);
- with mlm_labels, the MLM head runs only on labelled positions (BERT's ~15%): `logits` is
  then (M, V), row-aligned with `mlm_labels[mlm_labels != -100]` (row-major order), and the
  loss is their mean cross-entropy (+ the NSP cross-entropy when nsp_labels are given).
`attention_mask` (B, T): 1 = real token, 0 = padding that no token attends to; None = all real.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nlm.config import Config
from nlm.errors import NLMError
from nlm.models.base import IGNORE_INDEX, LanguageModel, ModelOutput, attention_flops_per_token


@dataclasses.dataclass
class BERTConfig(Config):
    vocab_size: int = 30522
    max_positions: int = 512
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 3072
    type_vocab_size: int = 2
    dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    tie_weights: bool = True


class EncoderLayer(nn.Module):
    def __init__(self, config: BERTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.attn_out = nn.Linear(config.n_embd, config.n_embd)
        self.ln_attn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(config.n_embd, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, config.n_embd)
        self.ln_ffn = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        batch, time, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        q, k, v = (t.view(batch, time, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        x = self.ln_attn(x + self.drop(self.attn_out(y)))
        return self.ln_ffn(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class BERT(LanguageModel):
    family = "bert"
    config_class = BERTConfig
    objective = "mlm"
    causal = False
    recurrent = False
    max_positions_field = "max_positions"
    summary_type = "first"  # [CLS]

    def __init__(self, config: BERTConfig) -> None:
        super().__init__(config)
        if config.n_embd % config.n_head:
            raise NLMError(
                f"bert config (field 'n_head'): {config.n_head} does not divide n_embd {config.n_embd}"
            )
        self.tok = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos = nn.Embedding(config.max_positions, config.n_embd)
        self.seg = nn.Embedding(config.type_vocab_size, config.n_embd)
        self.ln_emb = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_layer))
        # MLM head: transform + LayerNorm + decoder (tied) with its own bias.
        self.mlm_dense = nn.Linear(config.n_embd, config.n_embd)
        self.mlm_ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.n_embd, config.vocab_size)
        # NSP head: pooler on [CLS] + a 2-way classifier.
        self.pooler = nn.Linear(config.n_embd, config.n_embd)
        self.nsp = nn.Linear(config.n_embd, 2)
        self.apply(self._init_weights)
        if config.tie_weights:
            self.decoder.weight = self.tok.weight

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

    def pretraining_head_parameters(self) -> list[nn.Parameter]:
        heads = (self.mlm_dense, self.mlm_ln, self.pooler, self.nsp)
        # The decoder's weight is the (trained) token table; only its bias is the MLM head's.
        return [p for head in heads for p in head.parameters()] + [self.decoder.bias]

    def input_embeddings(self) -> nn.Embedding:
        return self.tok

    def output_embeddings(self) -> torch.Tensor:
        return self.decoder.weight

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) final hidden states -> (..., V) masked-LM logits."""
        return self.decoder(self.mlm_ln(F.gelu(self.mlm_dense(hidden))))

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        nsp_labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        batch, time = input_ids.shape
        if time > self.config.max_positions:
            raise NLMError(
                f"input of {time} tokens is longer than the model's max_positions {self.config.max_positions}"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(time, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions) + self.seg(token_type_ids.long())
        x = self.drop(self.ln_emb(x))
        attn_mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            attn_mask = attention_mask.bool()[:, None, None, :]  # keys only; (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, attn_mask)
        nsp_logits = self.nsp(torch.tanh(self.pooler(x[:, 0])))

        loss = None
        if mlm_labels is not None:
            selected = mlm_labels != IGNORE_INDEX
            logits = self.mlm_logits(x[selected])  # (M, V): only where there is a label
            targets = mlm_labels[selected]
            # An empty selection would give NaN; 0 * sum keeps the graph and the loss at 0.
            loss = (
                F.cross_entropy(logits.float(), targets) if targets.numel() else logits.sum() * 0.0
            )
        else:
            logits = self.mlm_logits(x)
        if nsp_labels is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels.long())
            loss = nsp_loss if loss is None else loss + nsp_loss
        return ModelOutput(logits=logits, loss=loss, hidden=x, nsp_logits=nsp_logits)
