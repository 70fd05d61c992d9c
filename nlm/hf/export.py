"""`export_hf`: an nlm gpt/bert checkpoint -> a `transformers` model directory.

    OUT/config.json               GPT2Config / BertConfig (model_type, architectures, ...)
    OUT/model.safetensors         weights, metadata {"format": "pt"}
    OUT/generation_config.json    gpt: bos/eos/pad ids
    OUT/tokenizer.json            the tokenizer in `tokenizers`' format (nlm/hf/tokenizer.py)
    OUT/tokenizer_config.json, OUT/special_tokens_map.json
    OUT/README.md                 model card: YAML front matter + training settings

Everything is checked before anything is written: the family has a `transformers` class, the
tokenizer converts exactly, and the `transformers` model gives nlm's logits (max |diff| <= 1e-4
in fp32) on a left-padded probe batch. The directory is written to a temporary sibling, loaded
back and checked again, then renamed into place: a failed export leaves nothing behind.
The checkpoint is nlm's consolidated one (a ZeRO-3 run exports it already gathered), so no
`zero_to_fp32` step is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from nlm.checkpoint import Checkpoint, load_checkpoint
from nlm.errors import NLMError
from nlm.files import replace_dir, temp_dir_for
from nlm.hf import convert
from nlm.hf.card import model_card
from nlm.hf.tokenizer import fast_tokenizer

TOLERANCE = 1e-4  # max |logit difference| accepted, fp32
HF_CLASSES = {"gpt": "GPT2LMHeadModel", "bert": "BertForPreTraining"}


def special_ids(ckpt: Checkpoint) -> dict[str, int | None]:
    """bos/eos/pad ids of the exported vocabulary."""
    tok = ckpt.tokenizer
    if tok.kind == "hf":
        return {
            "bos": tok.specials["<s>"] if tok.specials["<s>"] is not None else tok.specials["</s>"],
            "eos": tok.specials["</s>"],
            "pad": tok.specials["<pad>"],
        }
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}


def hf_model(ckpt: Checkpoint) -> Any:
    """The checkpoint's model as a `transformers` model (fp32, eval mode)."""
    import transformers

    family, model = ckpt.family, ckpt.model
    state = model.state_dict()
    config = model.config
    if ckpt.tokenizer.kind == "hf":  # imported: rows back in the Hugging Face order
        tok = ckpt.tokenizer
        state = convert.unmap_rows(state, family, torch.from_numpy(tok.to_hf), tok.hf_rows)
        config = config.replace(vocab_size=tok.hf_rows)
    ids = special_ids(ckpt)
    mapping = convert.MAPPINGS[family]
    hf_config = getattr(transformers, mapping.hf_config)(**mapping.config_to_hf(config, ids))
    hf = getattr(transformers, mapping.hf_model)(hf_config)
    weights = mapping.weights_to_hf(state, config)
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    missing = [k for k in missing if k not in tied and not k.endswith("attn.bias")]
    if missing or unexpected:  # a mapping bug, not bad input
        raise RuntimeError(f"weights do not map onto {type(hf).__name__}: {missing + unexpected}")
    if family == "gpt" and config.tie_weights:
        hf.tie_weights()
    return hf.float().eval()


def probe_batch(ckpt: Checkpoint, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded (3, length) batch of ordinary and special ids, and its mask (ids with a
    row in both models: an imported tokenizer's added specials have none in transformers')."""
    tok = ckpt.tokenizer
    allowed = torch.arange(ckpt.model.config.vocab_size)
    if tok.kind == "hf":
        allowed = torch.nonzero(torch.from_numpy(tok.to_hf) >= 0).squeeze(1)
    length = min(length, ckpt.model.max_positions)
    gen = torch.Generator().manual_seed(0)
    ids = allowed[torch.randint(0, len(allowed), (3, length), generator=gen)]
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0
    mask[2, : length // 2] = 0
    ids[mask == 0] = ckpt.tokenizer.pad_id
    return ids, mask


@torch.no_grad()
def compare_logits(ckpt: Checkpoint, hf: Any) -> float:
    """max |nlm logits - transformers logits| over the real positions of `probe_batch`."""
    ids, mask = probe_batch(ckpt)
    model = ckpt.model.eval()
    if ckpt.family == "gpt":
        ours = model(ids, attention_mask=mask).logits
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        theirs = hf(input_ids=_to_hf(ckpt, ids), attention_mask=mask, position_ids=positions).logits
    else:
        types = torch.zeros_like(ids)
        mask = mask.flip(1)  # bert pads on the right
        ids = ids.flip(1)
        ours = model(ids, token_type_ids=types, attention_mask=mask).logits
        theirs = hf(input_ids=_to_hf(ckpt, ids), token_type_ids=types, attention_mask=mask)
        theirs = theirs.prediction_logits
    ours = _ours_in_hf_order(ckpt, ours)
    real = mask.bool()
    return (ours[real] - theirs[real]).abs().max().item()


def _to_hf(ckpt: Checkpoint, ids: torch.Tensor) -> torch.Tensor:
    tok = ckpt.tokenizer
    if tok.kind != "hf":
        return ids
    to_hf = torch.from_numpy(tok.to_hf)
    mapped = to_hf[ids]
    return torch.where(mapped < 0, torch.zeros_like(mapped), mapped)  # added rows: any real id


def _ours_in_hf_order(ckpt: Checkpoint, logits: torch.Tensor) -> torch.Tensor:
    tok = ckpt.tokenizer
    if tok.kind != "hf":
        return logits
    keep = torch.from_numpy(tok.to_hf) >= 0
    order = torch.empty(tok.hf_rows, dtype=torch.long)
    order[torch.from_numpy(tok.to_hf)[keep]] = torch.nonzero(keep).squeeze(1)
    return logits[..., order]


def export_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write `checkpoint` (an nlm gpt/bert checkpoint or run directory) as a `transformers`
    model directory `out`; returns a summary (class, files, max logit difference).

    Raises NLMError (one line) for a family without a `transformers` class, a tokenizer that
    cannot convert exactly, or an `out` that exists (unless `overwrite`)."""
    out = Path(out)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.family not in HF_CLASSES:
        raise NLMError(
            f"{ckpt.path}: {ckpt.family} has no transformers class; --format hf exports gpt "
            "(GPT2LMHeadModel) and bert (BertForPreTraining)"
        )
    if ckpt.config.get("task"):
        raise NLMError(
            f"{ckpt.path}: a fine-tuned {ckpt.config['task']} checkpoint; --format hf exports "
            "pretrained gpt/bert checkpoints"
        )
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise NLMError(f"{out}: already exists; pass --overwrite to replace it")
    if ckpt.tokenizer.kind == "hf" and ckpt.tokenizer.vocab_size != ckpt.model.config.vocab_size:
        raise NLMError(
            f"{ckpt.path}: the model has {ckpt.model.config.vocab_size} vocabulary rows, the "
            f"imported tokenizer maps {ckpt.tokenizer.vocab_size}"
        )
    fast = fast_tokenizer(ckpt.tokenizer, ckpt.family, ckpt.model.max_positions)
    hf = hf_model(ckpt)
    diff = compare_logits(ckpt, hf)
    if not diff <= TOLERANCE:
        raise RuntimeError(f"the transformers model's logits differ from nlm's by {diff}")

    tmp = temp_dir_for(out)  # built beside `out`, swapped in by renames when complete
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        if ckpt.family == "gpt":
            ids = special_ids(ckpt)
            hf.generation_config.update(
                bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
            )
            hf.generation_config.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        if not (tmp / "special_tokens_map.json").exists():  # transformers 5 folds it into
            # tokenizer_config.json; older readers (and other tools) still look for it
            roles = {k: v for k, v in fast.special_tokens_map.items() if isinstance(v, str)}
            (tmp / "special_tokens_map.json").write_text(json.dumps(roles, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(ckpt, HF_CLASSES[ckpt.family]), encoding="utf-8")
        reloaded = _reload(tmp, ckpt.family)
        diff = max(diff, compare_logits(ckpt, reloaded))
        if not diff <= TOLERANCE:
            raise RuntimeError(f"{tmp}: the saved model's logits differ from nlm's by {diff}")
        if out.is_file():
            out.unlink()
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "checkpoint": str(ckpt.path),
        "out": str(out),
        "family": ckpt.family,
        "class": HF_CLASSES[ckpt.family],
        "tokenizer": ckpt.tokenizer.kind,
        "max_abs_logit_diff": diff,
        "files": sorted(p.name for p in out.iterdir()),
    }


def _reload(directory: Path, family: str) -> Any:
    import transformers

    cls = transformers.GPT2LMHeadModel if family == "gpt" else transformers.BertForPreTraining
    return cls.from_pretrained(directory, use_safetensors=True).float().eval()
