"""Weights and configs between nlm's gpt/bert and `transformers`' GPT-2/BERT, both ways.

Each direction reads the same two tables, so a tensor or a config field is named once:
`Link`s pair every nlm tensor with its transformers counterpart(s) (`gpt_links`, `bert_links`),
`Field`s pair every config field (`GPT_FIELDS`, `BERT_FIELDS`). `to_hf` / `from_hf` walk a
table one way or the other; `MAPPINGS[family]` is what export and import call.

gpt <-> GPT2LMHeadModel. nlm's gpt is GPT-2's layout under nanoGPT's names; GPT-2 stores its
projections as `Conv1D` with the weight (in, out), nlm as `nn.Linear` (out, in), so every
projection matrix is transposed. nlm's `bias=False` exports as zero biases (GPT-2 always has
them), sinusoidal positions as the position table they compute. GELU: nlm's exact GELU is
transformers' "gelu"; the tanh approximation ("gelu_tanh", what GPT-2 itself uses) is
"gelu_pytorch_tanh", the same kernel.

bert <-> BertForPreTraining (the same file loads as BertForMaskedLM). nlm's bert is the original
post-LayerNorm BERT; its fused QKV projection splits into query/key/value, the MLM head and the
NSP head (pooler + classifier) map one to one.

Import refuses what nlm cannot compute exactly (another activation, relative positions,
cross-attention, ...), naming the config field. The vocabulary is remapped (`remap_rows`) so
that nlm's fixed special ids 0-6 hold the tokens of the same role (see nlm/tokenizers/hf.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from nlm.errors import NLMError
from nlm.models.bert import BERTConfig
from nlm.models.gpt import GPTConfig, sinusoidal_positions

GPT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}  # nlm -> transformers
# transformers' names for the two GELUs nlm computes (gelu_new / gelu_fast: the same tanh
# formula as torch's tanh GELU, written out in Python).
GPT_ACTIVATIONS_IN = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which nlm's gpt uses (GPT-2's too)


# --- the two tables and the walks over them -----------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Link:
    """One nlm tensor and the transformers tensor(s) it is.

    `hf` holds several names where nlm's tensor is their concatenation along dim 0 (BERT's fused
    QKV). `transpose`: GPT-2's Conv1D stores (in, out), nlm's Linear (out, in). `tied`: under
    `tie_weights` this tensor is that nlm tensor (exported from it, imported as the same
    object). `fill`: what export writes when nlm has no such tensor (bias=False, sinusoidal
    positions); import always reads it. `also`: further transformers names export writes the
    same tensor to (BERT's decoder bias appears twice).
    """

    nlm: str
    hf: tuple[str, ...]
    transpose: bool = False
    tied: str | None = None
    fill: Callable[[], torch.Tensor] | None = None
    also: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Field:
    """One config field: nlm's name, transformers' name, transformers' default when absent, the
    type import reads it as, and further transformers names export writes the value to."""

    nlm: str
    hf: str
    default: Any
    kind: Callable[[Any], Any]
    also: tuple[str, ...] = ()


def to_hf(state: dict[str, torch.Tensor], links: list[Link], tie: bool) -> dict[str, torch.Tensor]:
    """nlm state dict -> transformers state dict along `links` (fp32 copies)."""
    out: dict[str, torch.Tensor] = {}
    for link in links:
        name = link.tied if tie and link.tied else link.nlm
        tensor = state[name] if name in state or link.fill is None else link.fill()
        tensor = tensor.detach().float()
        if link.transpose:
            tensor = tensor.t()
        for hf_name, part in zip(link.hf, tensor.chunk(len(link.hf), dim=0), strict=True):
            out[hf_name] = part.clone().contiguous()
        for hf_name in link.also:
            out[hf_name] = tensor.clone().contiguous()
    return out


def from_hf(
    state: dict[str, torch.Tensor], links: list[Link], tie: bool, what: str
) -> dict[str, torch.Tensor]:
    """transformers state dict -> nlm state dict along `links`; a missing tensor is a one-line
    NLMError naming it (`what`: "GPT-2 weights", ...). Tied tensors are one object."""

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise NLMError(f"{what}: no tensor '{name}'")
        return state[name].detach().float()

    out: dict[str, torch.Tensor] = {}
    for link in links:
        if tie and link.tied:
            out[link.nlm] = out[link.tied]
            continue
        tensor = torch.cat([get(name) for name in link.hf])
        out[link.nlm] = tensor.t() if link.transpose else tensor
    return {k: v.contiguous() for k, v in out.items()}


def config_to_hf(config: Any, fields: tuple[Field, ...]) -> dict[str, Any]:
    """The transformers config fields of `fields` for an nlm config."""
    out: dict[str, Any] = {}
    for field in fields:
        for name in (field.hf, *field.also):
            out[name] = getattr(config, field.nlm)
    return out


def config_from_hf(hf: dict[str, Any], fields: tuple[Field, ...]) -> dict[str, Any]:
    """nlm config keyword arguments from a transformers config dict (its defaults when absent)."""
    return {f.nlm: f.kind(hf.get(f.hf, f.default)) for f in fields}


def _refused(source: str, field: str, why: str) -> NLMError:
    """The one-line error for a transformers config field nlm cannot compute exactly."""
    return NLMError(f"{source} (field '{field}'): {why}")


def _linear(nlm: str, hf: str, width: int | None = None, transpose: bool = False) -> list[Link]:
    """A weight and its bias; `width`: export zeros of that size when nlm has no bias."""
    fill = None if width is None else (lambda: torch.zeros(width))
    return [
        Link(f"{nlm}.weight", (f"{hf}.weight",), transpose=transpose),
        Link(f"{nlm}.bias", (f"{hf}.bias",), fill=fill),
    ]


# --- gpt <-> GPT-2 ------------------------------------------------------------------------------
GPT_FIELDS = (  # activation_function is mapped by name (GPT_ACTIVATIONS), not copied
    Field("vocab_size", "vocab_size", 50257, int),
    Field("block_size", "n_positions", 1024, int),
    Field("n_embd", "n_embd", 768, int),
    Field("n_layer", "n_layer", 12, int),
    Field("n_head", "n_head", 12, int),
    Field("dropout", "resid_pdrop", 0.1, float, also=("embd_pdrop", "attn_pdrop")),
    Field("tie_weights", "tie_word_embeddings", True, bool),
)


def gpt_links(config: GPTConfig) -> list[Link]:
    """Every tensor of an nlm gpt and its GPT2LMHeadModel name."""
    n = config.n_embd
    positions = lambda: sinusoidal_positions(config.block_size, n)  # noqa: E731
    links = [
        Link("wte.weight", ("transformer.wte.weight",)),
        Link("wpe.weight", ("transformer.wpe.weight",), fill=positions),
    ]
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            links += _linear(src + ln, dst + ln, n)
        for name, width in (("attn.c_attn", 3 * n), ("attn.c_proj", n), ("mlp.c_fc", 4 * n),
                            ("mlp.c_proj", n)):  # fmt: skip
            links += _linear(src + name, dst + name, width, transpose=True)
    links += _linear("ln_f", "transformer.ln_f", n)
    links.append(Link("lm_head.weight", ("lm_head.weight",), tied="wte.weight"))
    return links


def gpt2_config(config: GPTConfig, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """transformers.GPT2Config fields for an nlm gpt config (`special_ids`: bos/eos/pad ids)."""
    return dict(
        config_to_hf(config, GPT_FIELDS),
        n_inner=4 * config.n_embd,
        activation_function=GPT_ACTIVATIONS[config.activation],
        layer_norm_epsilon=LAYER_NORM_EPS,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        architectures=["GPT2LMHeadModel"],
    )


def gpt_config_from_gpt2(hf: dict[str, Any], source: str) -> GPTConfig:
    """An nlm GPTConfig from a GPT2Config dict, or a one-line NLMError naming the field."""

    bad = functools.partial(_refused, source)

    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT_ACTIVATIONS_IN:
        raise bad(
            "activation_function",
            f"{activation!r}: nlm's gpt computes {', '.join(GPT_ACTIVATIONS_IN)}",
        )
    fields = config_from_hf(hf, GPT_FIELDS)
    n_embd = fields["n_embd"]
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise bad("n_inner", f"{hf['n_inner']}: nlm's gpt has an MLP of 4 x n_embd = {4 * n_embd}")
    eps = float(hf.get("layer_norm_epsilon", LAYER_NORM_EPS))
    if eps != LAYER_NORM_EPS:
        raise bad("layer_norm_epsilon", f"{eps}: nlm's gpt uses {LAYER_NORM_EPS}")
    for field, wanted in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if bool(hf.get(field, wanted)) != wanted:
            raise bad(field, f"{hf[field]}: nlm's gpt supports only {wanted}")
    # GPT-2 always has biases and a learned position table.
    return GPTConfig(
        **fields, bias=True, positions="learned", activation=GPT_ACTIVATIONS_IN[activation]
    )


# --- bert <-> BERT -------------------------------------------------------------------------------
BERT_FIELDS = (
    Field("vocab_size", "vocab_size", 30522, int),
    Field("max_positions", "max_position_embeddings", 512, int),
    Field("n_layer", "num_hidden_layers", 12, int),
    Field("n_head", "num_attention_heads", 12, int),
    Field("n_embd", "hidden_size", 768, int),
    Field("intermediate_size", "intermediate_size", 3072, int),
    Field("type_vocab_size", "type_vocab_size", 2, int),
    Field("dropout", "hidden_dropout_prob", 0.1, float, also=("attention_probs_dropout_prob",)),
    Field("layer_norm_eps", "layer_norm_eps", 1e-12, float),
    Field("tie_weights", "tie_word_embeddings", True, bool),
)


def bert_links(config: BERTConfig) -> list[Link]:
    """Every tensor of an nlm bert and its BertForPreTraining name(s)."""
    links = [
        Link(f"{nlm}.weight", (f"bert.embeddings.{hf}.weight",))
        for nlm, hf in (
            ("tok", "word_embeddings"),
            ("pos", "position_embeddings"),
            ("seg", "token_type_embeddings"),
        )  # fmt: skip
    ]
    for nlm, hf in (
        ("ln_emb", "bert.embeddings.LayerNorm"),
        ("mlm_dense", "cls.predictions.transform.dense"),
        ("mlm_ln", "cls.predictions.transform.LayerNorm"),
        ("pooler", "bert.pooler.dense"),
        ("nsp", "cls.seq_relationship"),
    ):
        links += _linear(nlm, hf)
    for i in range(config.n_layer):
        src, dst = f"layers.{i}.", f"bert.encoder.layer.{i}."
        qkv = [f"{dst}attention.self.{part}" for part in ("query", "key", "value")]
        links += [
            Link(f"{src}qkv.weight", tuple(f"{name}.weight" for name in qkv)),
            Link(f"{src}qkv.bias", tuple(f"{name}.bias" for name in qkv)),
        ]
        for nlm, hf in (
            ("attn_out", "attention.output.dense"),
            ("ln_attn", "attention.output.LayerNorm"),
            ("ffn_in", "intermediate.dense"),
            ("ffn_out", "output.dense"),
            ("ln_ffn", "output.LayerNorm"),
        ):
            links += _linear(src + nlm, dst + hf)
    links += [
        Link("decoder.weight", ("cls.predictions.decoder.weight",), tied="tok.weight"),
        Link("decoder.bias", ("cls.predictions.bias",), also=("cls.predictions.decoder.bias",)),
    ]
    return links


def bert_hf_config(config: BERTConfig, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """transformers.BertConfig fields for an nlm bert config."""
    return dict(
        config_to_hf(config, BERT_FIELDS),
        hidden_act="gelu",
        position_embedding_type="absolute",
        pad_token_id=special_ids.get("pad"),
        architectures=["BertForPreTraining"],
    )


def bert_config_from_hf(hf: dict[str, Any], source: str) -> BERTConfig:
    """An nlm BERTConfig from a BertConfig dict, or a one-line NLMError naming the field."""

    bad = functools.partial(_refused, source)

    if hf.get("hidden_act", "gelu") != "gelu":
        raise bad("hidden_act", f"{hf['hidden_act']!r}: nlm's bert computes the exact 'gelu'")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise bad(
            "position_embedding_type",
            f"{hf['position_embedding_type']!r}: nlm's bert has absolute positions",
        )
    for field in ("is_decoder", "add_cross_attention"):
        if hf.get(field):
            raise bad(field, "true: nlm's bert is an encoder without cross-attention")
    return BERTConfig(**config_from_hf(hf, BERT_FIELDS))


# --- one mapping per family --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mapping:
    """Everything that converts one nlm family: its transformers classes (by name, so this module
    does not import transformers), its tensor table, its config fields both ways, and the
    tensors whose first dimension is the vocabulary."""

    hf_config: str  # transformers config class
    hf_model: str  # transformers model class that export builds and import loads
    links: Callable[[Any], list[Link]]
    config_to_hf: Callable[[Any, dict[str, int | None]], dict[str, Any]]
    config_from_hf: Callable[[dict[str, Any], str], Any]
    what: str  # how errors name the weights
    vocab_rows: tuple[str, ...]

    def weights_to_hf(self, state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
        """nlm state dict -> transformers state dict (fp32 copies)."""
        return to_hf(state, self.links(config), config.tie_weights)

    def weights_from_hf(
        self, state: dict[str, torch.Tensor], config: Any
    ) -> dict[str, torch.Tensor]:
        """transformers state dict -> nlm state dict (the inverse of `weights_to_hf`); a missing
        tensor is a one-line NLMError naming it."""
        return from_hf(state, self.links(config), config.tie_weights, self.what)


MAPPINGS = {
    "gpt": Mapping(
        "GPT2Config", "GPT2LMHeadModel", gpt_links, gpt2_config, gpt_config_from_gpt2,
        "GPT-2 weights", ("wte.weight", "lm_head.weight"),
    ),
    "bert": Mapping(
        "BertConfig", "BertForPreTraining", bert_links, bert_hf_config, bert_config_from_hf,
        "BERT weights", ("tok.weight", "decoder.weight", "decoder.bias"),
    ),
}  # fmt: skip


# --- the vocabulary rows ----------------------------------------------------------------------
def remap_rows(
    state: dict[str, torch.Tensor], family: str, to_hf: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Rows of the vocabulary tensors reordered to nlm ids: row i is the Hugging Face row
    `to_hf[i]`; where that is -1 (a special token the Hugging Face model lacks) the row is the
    mean of all rows.

    Why the mean: its logit is the mean logit (h . mean(e) = mean(h . e), and the same for the
    bias), and exp(mean) <= mean(exp), so each added row takes at most 1/V of the probability
    mass; the logits of every original token are unchanged. Tied tensors stay tied.
    """
    out = dict(state)
    done: dict[int, torch.Tensor] = {}
    for name in MAPPINGS[family].vocab_rows:
        tensor = state.get(name)
        if tensor is None:
            continue
        if id(tensor) in done:  # tied: the same remapped tensor
            out[name] = done[id(tensor)]
            continue
        index = to_hf.clamp(min=0)
        rows = tensor[index].clone()
        added = to_hf < 0
        if bool(added.any()):
            rows[added] = tensor.mean(dim=0)
        out[name] = done[id(tensor)] = rows.contiguous()
    return out


def unmap_rows(
    state: dict[str, torch.Tensor], family: str, to_hf: torch.Tensor, hf_rows: int
) -> dict[str, torch.Tensor]:
    """The inverse of `remap_rows`: rows back in Hugging Face order, the added rows dropped."""
    out = dict(state)
    keep = to_hf >= 0
    order = torch.empty(hf_rows, dtype=torch.long)
    order[to_hf[keep]] = torch.nonzero(keep).squeeze(1)
    done: dict[int, torch.Tensor] = {}
    for name in MAPPINGS[family].vocab_rows:
        tensor = state.get(name)
        if tensor is None:
            continue
        if id(tensor) not in done:
            done[id(tensor)] = tensor[order].contiguous()
        out[name] = done[id(tensor)]
    return out
