"""ELMo's bidirectional LSTM language model (Peters et al. 2018, "Deep contextualized word
representations", NAACL; section 3.1 the biLM, 3.2 the layer mix).

Two multi-layer LSTM language models read the same tokens, one left to right, one right to left.
They share the token embedding and the softmax (Θ_x and Θ_s in eq. 1) and have their own LSTMs:

    forward:   p(t_k | t_1 .. t_{k-1})    from the top forward state  f_L[k-1]
    backward:  p(t_k | t_{k+1} .. t_N)    from the top backward state b_L[k+1]

    loss = ( NLL_forward + NLL_backward ) / 2

The paper maximises the sum of both directions' log-likelihoods; nlm reports their *mean*
(`loss`), so that one number compares with the other families' per-token loss, and each
direction's mean NLL apart (`ModelOutput.direction_losses`). The gradient is the sum's, halved.

Each LSTM layer after the first adds its input to its output (the residual connection between
layers (section 3.4: "a residual connection from the first to second layer"). As in ELMo's released models, each LSTM's cell can be wider than its output
(`hidden_size` cells, projected to `embed_dim` outputs: torch.nn.LSTM's `proj_size`, Sak et al.
2014's LSTMP), so every layer's states have the embedding's width E and the layers can be mixed.
The token layer is a plain embedding table: ELMo's character CNN (and its highway layers) is not
implemented.

Contextual embeddings (eq. 1 of section 3.2):

    ELMo_k = γ · Σ_{j=0..L} softmax(s)_j · h_{k,j},     h_{k,0} = [x_k ; x_k],  h_{k,j} = [f_j[k] ; b_j[k]]

layer 0 is the token embedding duplicated for both directions, as in the paper; s starts at 0
(uniform weights) and γ at 1. They are parameters a downstream task may learn; pretraining does
not touch them. `ModelOutput.hidden` is ELMo_k, (B, T, 2E); `layer_states` gives every h_j.

Calling convention (the clm shards' x = row[:-1], y = row[1:]):
- `logits[:, t]` is the forward direction's distribution of `targets[:, t]` (the token after
  `input_ids[:, t]`), as for the causal families;
- `backward_logits[:, t]` is the backward direction's distribution of `input_ids[:, t]` given the
  tokens after it: `input_ids[:, t+1:]` and, when `targets` is given, its last column (the row's
  last token, so both directions predict T tokens of a row of T+1). Without targets the last
  position has no right context (its state is zeros).
- `attention_mask` (1 = real token) may pad either side; padding never reaches a real token's
  state in either direction. It cannot be combined with `targets`.

The model is bidirectional, so it is not `causal` (no generation) although it trains on clm
shards; `backward_lm` tells evaluation to score the backward direction too.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nlm.config import Config
from nlm.errors import NLMError
from nlm.models.base import IGNORE_INDEX, LanguageModel, ModelOutput


@dataclasses.dataclass
class ELMoConfig(Config):
    vocab_size: int = 10000
    embed_dim: int = 128  # E: the token vectors and each direction's LSTM outputs
    hidden_size: int = 512  # LSTM cells per direction and layer (projected to E when larger)
    n_layer: int = 2
    dropout: float = 0.1
    residual: bool = True  # add each LSTM layer's input to its output (layers 2..L)
    tie_weights: bool = True  # the shared softmax is the embedding table


class ELMo(LanguageModel):
    """Forward and backward LSTM LMs over one embedding and one softmax (module docstring)."""

    family = "elmo"
    config_class = ELMoConfig
    objective = "clm"
    causal = False
    recurrent = False
    max_positions_field = None
    summary_type = None
    backward_lm = True

    def __init__(self, config: ELMoConfig) -> None:
        super().__init__(config)
        for field in ("n_layer", "embed_dim", "hidden_size"):
            if getattr(config, field) < 1:
                raise NLMError(
                    f"elmo config (field '{field}'): must be >= 1, got {getattr(config, field)}"
                )
        if config.hidden_size < config.embed_dim:
            raise NLMError(
                f"elmo config (field 'hidden_size'): must be >= embed_dim ({config.embed_dim}), "
                f"got {config.hidden_size} (the cells project down to embed_dim outputs)"
            )
        e, h = config.embed_dim, config.hidden_size
        proj = e if h > e else 0

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                nn.LSTM(e, h, batch_first=True, proj_size=proj) for _ in range(config.n_layer)
            )

        self.embedding = nn.Embedding(config.vocab_size, e)
        self.forward_layers = stack()
        self.backward_layers = stack()
        self.drop = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(e, config.vocab_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        # eq. 1's task weights: s_j (softmax-normalised) over the L+1 layers, and the scale γ.
        self.mix_weights = nn.Parameter(torch.zeros(config.n_layer + 1))
        self.mix_scale = nn.Parameter(torch.ones(1))  # 1-d: DeepSpeed broadcasts no 0-d tensor

    @property
    def hidden_size(self) -> int:
        return 2 * self.config.embed_dim

    def input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def output_embeddings(self) -> torch.Tensor:
        return self.decoder.weight

    # -- the two directions ------------------------------------------------------------------

    def _run(
        self, layers: nn.ModuleList, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """(B, T, E) left-aligned inputs (real tokens first, `lengths` of them; None: all) ->
        each layer's (B, T, E) outputs, left to right in the order given."""
        outputs, h = [], x
        for k, lstm in enumerate(layers):
            inp = self.drop(h)
            if lengths is None:
                out, _ = lstm(inp)
            else:
                packed = pack_padded_sequence(
                    inp, lengths.cpu(), batch_first=True, enforce_sorted=False
                )
                out, _ = lstm(packed)
                out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
            h = out + h if self.config.residual and k > 0 else out
            outputs.append(h)
        return outputs

    def _directions(
        self, embedded: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each layer's forward and backward states, (B, T, E) each, at the input's positions.

        The forward state at t has read positions ..t, the backward state at t positions t..
        (real tokens only). Padding positions get zeros."""
        if mask is None:
            fwd = self._run(self.forward_layers, embedded, None)
            bwd = [b.flip(1) for b in self._run(self.backward_layers, embedded.flip(1), None)]
            return fwd, bwd
        batch, time, _ = embedded.shape
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise NLMError("attention_mask: every row needs at least one real token")
        first = mask.int().argmax(dim=1)  # the first real position of each row
        steps = torch.arange(time, device=embedded.device)[None, :]
        if bool((mask != ((steps >= first[:, None]) & (steps < (first + lengths)[:, None]))).any()):
            raise NLMError("attention_mask: each row's real tokens must be contiguous")
        # Left-align (real tokens first), and reverse each row's real tokens for the backward LM.
        aligned = (steps + first[:, None]) % time
        reverse = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
        reverse = (reverse + first[:, None]) % time
        fwd = self._run(self.forward_layers, _gather(embedded, aligned), lengths)
        bwd = self._run(self.backward_layers, _gather(embedded, reverse), lengths)
        # Back to the input's positions: the inverse permutations, and zeros on the padding.
        unalign = torch.argsort(aligned, dim=1)
        unreverse = torch.argsort(reverse, dim=1)
        real = mask[..., None].to(embedded.dtype)
        return (
            [_gather(f, unalign) * real for f in fwd],
            [_gather(b, unreverse) * real for b in bwd],
        )

    def layer_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(L+1, B, T, 2E): h_0 = [x; x] (the token embedding, duplicated), h_j = [f_j; b_j]."""
        embedded = self.embedding(input_ids)
        mask = _real(attention_mask)
        fwd, bwd = self._directions(embedded, mask)
        if mask is not None:
            embedded = embedded * mask[..., None].to(embedded.dtype)
        layers = [torch.cat([embedded, embedded], dim=-1)]
        layers += [torch.cat([f, b], dim=-1) for f, b in zip(fwd, bwd, strict=True)]
        return torch.stack(layers)

    def mix(self, layers: torch.Tensor) -> torch.Tensor:
        """ELMo = γ · Σ_j softmax(s)_j · h_j: (L+1, B, T, 2E) layer states -> (B, T, 2E)."""
        weights = torch.softmax(self.mix_weights, dim=0).to(layers.dtype)
        return self.mix_scale.to(layers.dtype) * torch.einsum("j,jbtd->btd", weights, layers)

    # -- the contract ------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ModelOutput:
        mask = _real(attention_mask)
        if mask is not None and targets is not None:
            raise NLMError("elmo: attention_mask with padding cannot be combined with targets")
        batch, time = input_ids.shape
        ids = input_ids
        if targets is not None:  # the row's last token: right context of input_ids[:, -1]
            last = targets[:, -1:]
            ids = torch.cat([input_ids, last.clamp_min(0)], dim=1)
        embedded = self.embedding(ids)
        fwd, bwd = self._directions(embedded, mask)
        emb = embedded[:, :time]
        if mask is not None:
            emb = emb * mask[..., None].to(emb.dtype)
        layers = [torch.cat([emb, emb], dim=-1)]
        layers += [
            torch.cat([f[:, :time], b[:, :time]], dim=-1) for f, b in zip(fwd, bwd, strict=True)
        ]
        hidden = self.mix(torch.stack(layers))

        logits = self.decoder(self.drop(fwd[-1][:, :time]))
        # The backward state that predicts input_ids[:, t] has read t+1..: one position right.
        after = bwd[-1][:, 1:]
        if targets is None:
            after = torch.cat([after, torch.zeros_like(after[:, :1])], dim=1)
        backward_logits = self.decoder(self.drop(after))

        loss = direction_losses = None
        if targets is not None:
            backward_targets = input_ids.masked_fill(input_ids == 0, IGNORE_INDEX)
            # no right context when the row's last token is unknown
            unknown = targets[:, -1] == IGNORE_INDEX
            backward_targets[:, -1] = backward_targets[:, -1].masked_fill(unknown, IGNORE_INDEX)
            f_loss = _mean_nll(logits, targets)
            b_loss = _mean_nll(backward_logits, backward_targets)
            loss = (f_loss + b_loss) / 2
            direction_losses = {"forward": f_loss, "backward": b_loss}
        return ModelOutput(
            logits=logits,
            loss=loss,
            hidden=hidden,
            backward_logits=backward_logits,
            direction_losses=direction_losses,
        )


def _real(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The boolean mask of real tokens, or None when there is no padding (the fast path)."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    return None if bool(mask.all()) else mask


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[b, index[b, t]] for (B, T, D) x and (B, T) index."""
    return x.gather(1, index[..., None].expand(-1, -1, x.size(-1)))


def _mean_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )
