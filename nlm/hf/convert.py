"""Weights and configs between nlm's gpt/bert and `transformers`' GPT-2/BERT, both ways.

gpt -> GPT2LMHeadModel. nlm's gpt is GPT-2's layout under nanoGPT's names; GPT-2 stores its
projections as `Conv1D` with the weight (in, out), nlm as `nn.Linear` (out, in), so every
projection matrix is transposed. nlm's `bias=False` exports as zero biases (GPT-2 always has
them), sinusoidal positions as the position table they compute. GELU: nlm's exact GELU is
transformers' "gelu"; the tanh approximation ("gelu_tanh", what GPT-2 itself uses) is
"gelu_pytorch_tanh", the same kernel.

bert -> BertForPreTraining (the same file loads as BertForMaskedLM). nlm's bert is the original
post-LayerNorm BERT; its fused QKV projection splits into query/key/value, the MLM head and the
NSP head (pooler + classifier) map one to one.

Import goes the other way and refuses what nlm cannot compute exactly (another activation,
relative positions, cross-attention, ...), naming the config field. The vocabulary is remapped
(`remap_rows`) so that nlm's fixed special ids 0-6 hold the tokens of the same role (see
nlm/tokenizers/hf.py).
"""

from __future__ import annotations

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


# --- gpt <-> GPT-2 ------------------------------------------------------------------------------
def gpt2_config(config: GPTConfig, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """transformers.GPT2Config fields for an nlm gpt config (`special_ids`: bos/eos/pad ids)."""
    return dict(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_inner=4 * config.n_embd,
        activation_function=GPT_ACTIVATIONS[config.activation],
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        tie_word_embeddings=config.tie_weights,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        architectures=["GPT2LMHeadModel"],
    )


def gpt_to_gpt2(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """nlm gpt state dict -> GPT2LMHeadModel state dict (fp32 copies)."""
    out: dict[str, torch.Tensor] = {}
    zeros = lambda n: torch.zeros(n)  # noqa: E731  (bias=False exports as zero biases)
    n = config.n_embd

    def put(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().float().clone().contiguous()

    put("transformer.wte.weight", state["wte.weight"])
    if config.positions == "learned":
        put("transformer.wpe.weight", state["wpe.weight"])
    else:
        put("transformer.wpe.weight", sinusoidal_positions(config.block_size, n))
    for i in range(config.n_layer):
        src, dst = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            put(f"{dst}{ln}.weight", state[f"{src}{ln}.weight"])
            put(f"{dst}{ln}.bias", state.get(f"{src}{ln}.bias", zeros(n)))
        for nlm_name, hf_name, width in (
            ("attn.c_attn", "attn.c_attn", 3 * n),
            ("attn.c_proj", "attn.c_proj", n),
            ("mlp.c_fc", "mlp.c_fc", 4 * n),
            ("mlp.c_proj", "mlp.c_proj", n),
        ):
            put(f"{dst}{hf_name}.weight", state[f"{src}{nlm_name}.weight"].t())  # Conv1D: (in, out)
            put(f"{dst}{hf_name}.bias", state.get(f"{src}{nlm_name}.bias", zeros(width)))
    put("transformer.ln_f.weight", state["ln_f.weight"])
    put("transformer.ln_f.bias", state.get("ln_f.bias", zeros(n)))
    put("lm_head.weight", state["wte.weight"] if config.tie_weights else state["lm_head.weight"])
    return out


def gpt_config_from_gpt2(hf: dict[str, Any], source: str) -> GPTConfig:
    """An nlm GPTConfig from a GPT2Config dict, or a one-line NLMError naming the field."""

    def bad(field: str, why: str) -> NLMError:
        return NLMError(f"{source} (field '{field}'): {why}")

    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT_ACTIVATIONS_IN:
        raise bad(
            "activation_function",
            f"{activation!r}: nlm's gpt computes {', '.join(GPT_ACTIVATIONS_IN)}",
        )
    n_embd = int(hf.get("n_embd", 768))
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
    return GPTConfig(
        vocab_size=int(hf.get("vocab_size", 50257)),
        block_size=int(hf.get("n_positions", 1024)),
        n_layer=int(hf.get("n_layer", 12)),
        n_head=int(hf.get("n_head", 12)),
        n_embd=n_embd,
        dropout=float(hf.get("resid_pdrop", 0.1)),
        bias=True,
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
        positions="learned",
        activation=GPT_ACTIVATIONS_IN[activation],
    )


def gpt2_to_gpt(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel state dict -> nlm gpt state dict (the inverse of `gpt_to_gpt2`)."""
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise NLMError(f"GPT-2 weights: no tensor '{name}'")
        return state[name].detach().float()

    out["wte.weight"] = get("transformer.wte.weight")
    out["wpe.weight"] = get("transformer.wpe.weight")
    for i in range(config.n_layer):
        src, dst = f"transformer.h.{i}.", f"blocks.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{dst}{ln}.weight"] = get(f"{src}{ln}.weight")
            out[f"{dst}{ln}.bias"] = get(f"{src}{ln}.bias")
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out[f"{dst}{name}.weight"] = get(f"{src}{name}.weight").t()
            out[f"{dst}{name}.bias"] = get(f"{src}{name}.bias")
    out["ln_f.weight"] = get("transformer.ln_f.weight")
    out["ln_f.bias"] = get("transformer.ln_f.bias")
    out["lm_head.weight"] = out["wte.weight"] if config.tie_weights else get("lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


# --- bert <-> BERT -------------------------------------------------------------------------------
def bert_hf_config(config: BERTConfig, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """transformers.BertConfig fields for an nlm bert config."""
    return dict(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        intermediate_size=config.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        max_position_embeddings=config.max_positions,
        type_vocab_size=config.type_vocab_size,
        layer_norm_eps=config.layer_norm_eps,
        position_embedding_type="absolute",
        tie_word_embeddings=config.tie_weights,
        pad_token_id=special_ids.get("pad"),
        architectures=["BertForPreTraining"],
    )


# (nlm name, transformers name) of every bert tensor but the fused QKV and the vocabulary rows.
_BERT_LAYER = (
    ("attn_out", "attention.output.dense"),
    ("ln_attn", "attention.output.LayerNorm"),
    ("ffn_in", "intermediate.dense"),
    ("ffn_out", "output.dense"),
    ("ln_ffn", "output.LayerNorm"),
)
_BERT_TOP = (
    ("tok", "bert.embeddings.word_embeddings"),
    ("pos", "bert.embeddings.position_embeddings"),
    ("seg", "bert.embeddings.token_type_embeddings"),
    ("ln_emb", "bert.embeddings.LayerNorm"),
    ("mlm_dense", "cls.predictions.transform.dense"),
    ("mlm_ln", "cls.predictions.transform.LayerNorm"),
    ("pooler", "bert.pooler.dense"),
    ("nsp", "cls.seq_relationship"),
)


def bert_to_hf(state: dict[str, torch.Tensor], config: BERTConfig) -> dict[str, torch.Tensor]:
    """nlm bert state dict -> BertForPreTraining state dict."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().float().clone().contiguous()

    for nlm_name, hf_name in _BERT_TOP:
        put(f"{hf_name}.weight", state[f"{nlm_name}.weight"])
        if f"{nlm_name}.bias" in state:
            put(f"{hf_name}.bias", state[f"{nlm_name}.bias"])
    for i in range(config.n_layer):
        src, dst = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for part, w, b in zip(
            ("query", "key", "value"),
            state[f"{src}qkv.weight"].chunk(3, dim=0),
            state[f"{src}qkv.bias"].chunk(3, dim=0),
            strict=True,
        ):
            put(f"{dst}attention.self.{part}.weight", w)
            put(f"{dst}attention.self.{part}.bias", b)
        for nlm_name, hf_name in _BERT_LAYER:
            put(f"{dst}{hf_name}.weight", state[f"{src}{nlm_name}.weight"])
            put(f"{dst}{hf_name}.bias", state[f"{src}{nlm_name}.bias"])
    decoder = state["tok.weight"] if config.tie_weights else state["decoder.weight"]
    put("cls.predictions.decoder.weight", decoder)
    put("cls.predictions.bias", state["decoder.bias"])
    put("cls.predictions.decoder.bias", state["decoder.bias"])
    return out


def bert_config_from_hf(hf: dict[str, Any], source: str) -> BERTConfig:
    """An nlm BERTConfig from a BertConfig dict, or a one-line NLMError naming the field."""

    def bad(field: str, why: str) -> NLMError:
        return NLMError(f"{source} (field '{field}'): {why}")

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
    hidden_dropout = float(hf.get("hidden_dropout_prob", 0.1))
    return BERTConfig(
        vocab_size=int(hf.get("vocab_size", 30522)),
        max_positions=int(hf.get("max_position_embeddings", 512)),
        n_layer=int(hf.get("num_hidden_layers", 12)),
        n_head=int(hf.get("num_attention_heads", 12)),
        n_embd=int(hf.get("hidden_size", 768)),
        intermediate_size=int(hf.get("intermediate_size", 3072)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)),
        dropout=hidden_dropout,
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        tie_weights=bool(hf.get("tie_word_embeddings", True)),
    )


def hf_to_bert(state: dict[str, torch.Tensor], config: BERTConfig) -> dict[str, torch.Tensor]:
    """BertForPreTraining state dict -> nlm bert state dict (the inverse of `bert_to_hf`)."""
    out: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise NLMError(f"BERT weights: no tensor '{name}'")
        return state[name].detach().float()

    for nlm_name, hf_name in _BERT_TOP:
        out[f"{nlm_name}.weight"] = get(f"{hf_name}.weight")
        if nlm_name not in ("tok", "pos", "seg"):
            out[f"{nlm_name}.bias"] = get(f"{hf_name}.bias")
    for i in range(config.n_layer):
        src, dst = f"bert.encoder.layer.{i}.", f"layers.{i}."
        parts = ("query", "key", "value")
        out[f"{dst}qkv.weight"] = torch.cat([get(f"{src}attention.self.{p}.weight") for p in parts])
        out[f"{dst}qkv.bias"] = torch.cat([get(f"{src}attention.self.{p}.bias") for p in parts])
        for nlm_name, hf_name in _BERT_LAYER:
            out[f"{dst}{nlm_name}.weight"] = get(f"{src}{hf_name}.weight")
            out[f"{dst}{nlm_name}.bias"] = get(f"{src}{hf_name}.bias")
    out["decoder.weight"] = (
        out["tok.weight"] if config.tie_weights else get("cls.predictions.decoder.weight")
    )
    out["decoder.bias"] = get("cls.predictions.bias")
    return {k: v.contiguous() for k, v in out.items()}


# --- the vocabulary rows ----------------------------------------------------------------------
VOCAB_ROWS = {  # the tensors whose first dimension is the vocabulary, per nlm family
    "gpt": ("wte.weight", "lm_head.weight"),
    "bert": ("tok.weight", "decoder.weight", "decoder.bias"),
}


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
    for name in VOCAB_ROWS[family]:
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
    for name in VOCAB_ROWS[family]:
        tensor = state.get(name)
        if tensor is None:
            continue
        if id(tensor) not in done:
            done[id(tensor)] = tensor[order].contiguous()
        out[name] = done[id(tensor)]
    return out
