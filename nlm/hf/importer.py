"""`import_hf`: a `transformers` GPT-2 or BERT directory -> an nlm checkpoint.

The result is an ordinary nlm checkpoint (nlm/checkpoint.py) with an "hf" tokenizer
(nlm/tokenizers/hf.py), so `nlm eval`, `nlm generate`, `nlm serve`, `nlm finetune` and
`nlm train --init-from` take it like any other. Its config.json records where it came from
under "imported".

Checked before anything is written: the directory holds a config.json with a `model_type` nlm
can compute exactly (gpt2, bert; the fields of nlm/hf/convert.py), safetensors weights (a
pickle-only checkpoint is refused: weights load without unpickling), a fast tokenizer whose ids
fit the model's rows, and the converted model's logits equal the `transformers` model's
(max |diff| <= 1e-4, fp32). A source that is not a local directory is fetched from the Hugging
Face Hub when there is a network.

nlm's fixed special ids 0-6 take the tokens of the same role where the model has them (GPT-2's
<|endoftext|> becomes </s>; BERT's [PAD] [UNK] [CLS] [SEP] [MASK] theirs); a role it lacks gets
an added row (the mean row, see `convert.remap_rows`). `nlm export --format hf` drops those rows
again, so import -> export gives back the original logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nlm.checkpoint import save_checkpoint
from nlm.errors import NLMError
from nlm.hf import convert
from nlm.models import model_class
from nlm.tokenizers.base import SPECIAL_TOKENS
from nlm.tokenizers.hf import ROLES, HFTokenizer

TOLERANCE = 1e-4
FAMILIES = {"gpt2": "gpt", "bert": "bert"}  # transformers model_type -> nlm family
# Which Hugging Face role fills each nlm special first: eos before bos, so that GPT-2's one
# <|endoftext|> (bos = eos = unk) becomes </s>, the token nlm puts between documents.
ROLE_ORDER = ("</s>", "<unk>", "<pad>", "[CLS]", "[SEP]", "[MASK]", "<s>")


def read_hf_config(directory: Path) -> dict[str, Any]:
    """config.json of a `transformers` directory, or a one-line NLMError."""
    path = directory / "config.json"
    if not path.is_file():
        raise NLMError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise NLMError(f"{path}: not a JSON object")
    if config.get("format") == "nlm-checkpoint":
        raise NLMError(f"{directory}: already an nlm checkpoint (nothing to import)")
    if "model_type" not in config:
        raise NLMError(f"{path}: not a Hugging Face model config (no field 'model_type')")
    if config["model_type"] not in FAMILIES:
        raise NLMError(
            f"{path} (field 'model_type'): '{config['model_type']}' is not supported; nlm imports "
            f"{' and '.join(FAMILIES)}"
        )
    return config


def resolve_source(source: str) -> Path:
    """A local directory as it is; anything else is a Hub id, downloaded when there is a network."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise NLMError(f"{source}: not a directory")
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise NLMError(f"{source}: no such directory")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, ...: one line either way
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NLMError(
            f"{source}: no such directory, and not fetched from the Hugging Face Hub ({first})"
        ) from None


def _load_hf_model(directory: Path, family: str) -> tuple[Any, list[str]]:
    """The `transformers` model (fp32, eval) and the names of tensors it had to initialise."""
    import transformers

    cls = getattr(transformers, convert.MAPPINGS[family].hf_model)
    torch.manual_seed(0)  # a head the file lacks (BERT's NSP) is initialised reproducibly
    try:
        model, info = cls.from_pretrained(directory, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not list(directory.glob("*.safetensors")):
            first = "no *.safetensors weights; nlm loads weights without unpickling"
        raise NLMError(f"{directory}: cannot load the weights ({first})") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("attn.bias")]
    missing = [k for k in missing if k not in ("lm_head.weight", "cls.predictions.decoder.weight")]
    essential = [k for k in missing if not k.startswith(("bert.pooler", "cls.seq_relationship"))]
    if essential:
        raise NLMError(
            f"{directory}: the weights lack {len(essential)} tensors of a {cls.__name__} "
            f"(e.g. {essential[0]})"
        )
    return model.float().eval(), missing


def _specials(hf_tok: Any) -> tuple[dict[str, int | None], dict[str, str]]:
    """nlm special token -> Hugging Face id (None: no token of that role), and the roles."""
    roles = {
        role: str(token)
        for role, token in hf_tok.special_tokens_map.items()
        if role in ROLES.values() and isinstance(token, str)
    }
    specials: dict[str, int | None] = dict.fromkeys(SPECIAL_TOKENS)
    taken: set[int] = set()
    for token in ROLE_ORDER:
        name = roles.get(ROLES[token])
        if name is None:
            continue
        hf_id = hf_tok.convert_tokens_to_ids(name)
        if hf_id is None or hf_id in taken:
            continue
        specials[token] = int(hf_id)
        taken.add(int(hf_id))
    return specials, roles


def _hf_tokenizer(directory: Path, hf_rows: int) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        hf_tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NLMError(f"{directory}: no usable tokenizer files ({first})") from None
    except Exception as exc:  # the Rust parser's own exception type for a corrupt tokenizer.json
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NLMError(f"{directory}: unreadable tokenizer files ({first})") from None
    if not getattr(hf_tok, "is_fast", False):
        raise NLMError(f"{directory}: the tokenizer has no fast (`tokenizers`) version")
    if len(hf_tok) > hf_rows:
        raise NLMError(
            f"{directory}: the tokenizer files do not match the model: {len(hf_tok)} token ids, "
            f"but the model has {hf_rows} embedding rows"
        )
    specials, roles = _specials(hf_tok)
    return HFTokenizer(
        hf_tok.backend_tokenizer.to_str(), specials, hf_rows, roles, source=str(directory)
    )


def import_hf(source: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Convert a `transformers` GPT-2/BERT model (directory or Hub id) into an nlm checkpoint at
    `out`; returns a summary. One-line NLMError for anything nlm cannot convert exactly."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise NLMError(f"{out}: already exists; pass --overwrite to replace it")
    directory = resolve_source(str(source))
    hf_config = read_hf_config(directory)
    family = FAMILIES[hf_config["model_type"]]
    where = str(directory / "config.json")
    mapping = convert.MAPPINGS[family]
    config = mapping.config_from_hf(hf_config, where)
    hf, initialised = _load_hf_model(directory, family)
    weights = mapping.weights_from_hf(hf.state_dict(), config)
    hf_rows = weights[mapping.vocab_rows[0]].shape[0]
    tokenizer = _hf_tokenizer(directory, hf_rows)
    to_hf = torch.from_numpy(tokenizer.to_hf)
    weights = convert.remap_rows(weights, family, to_hf)
    config = config.replace(vocab_size=tokenizer.vocab_size)
    model = model_class(family)(config)
    model.load_state_dict(weights, strict=True)
    model.eval()

    diff = _compare(model, hf, family, to_hf, tokenizer.pad_id)
    if not diff <= TOLERANCE:
        raise RuntimeError(f"the imported model's logits differ from transformers' by {diff}")
    added = [SPECIAL_TOKENS[i] for i in tokenizer.added_ids]
    extra = {
        "imported": {
            "source": str(source),
            "class": type(hf).__name__,
            "model_type": hf_config["model_type"],
            "added_special_rows": added,
            "initialised": initialised,
            "max_abs_logit_diff": diff,
        }
    }
    if out.is_file() and overwrite:
        out.unlink()
    # save_checkpoint swaps the new directory in by renames: an old one stays until then.
    save_checkpoint(out, model, tokenizer, metrics={"params": model.num_parameters()}, extra=extra)
    return {"out": str(out), "family": family, **extra["imported"], "vocab_size": config.vocab_size}


@torch.no_grad()
def _compare(model: Any, hf: Any, family: str, to_hf: torch.Tensor, pad_id: int) -> float:
    """max |nlm - transformers| logits on a padded batch of ids both vocabularies have."""
    ordinary = torch.nonzero(to_hf >= 0).squeeze(1)
    length = min(12, model.max_positions)
    gen = torch.Generator().manual_seed(0)
    ids = ordinary[torch.randint(0, len(ordinary), (3, length), generator=gen)]
    mask = torch.ones_like(ids)
    mask[1, : length // 3] = 0
    ids[mask == 0] = pad_id if to_hf[pad_id] >= 0 else ids[0, 0]
    keep = to_hf >= 0
    order = torch.empty(int(to_hf.max()) + 1, dtype=torch.long)
    order[to_hf[keep]] = torch.nonzero(keep).squeeze(1)
    hf_ids = to_hf[ids]
    if family == "gpt":
        ours = model(ids, attention_mask=mask).logits
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        theirs = hf(input_ids=hf_ids, attention_mask=mask, position_ids=positions).logits
    else:
        mask, ids, hf_ids = mask.flip(1), ids.flip(1), hf_ids.flip(1)
        types = torch.zeros_like(ids)
        ours = model(ids, token_type_ids=types, attention_mask=mask).logits
        theirs = hf(input_ids=hf_ids, token_type_ids=types, attention_mask=mask).prediction_logits
    real = mask.bool()
    return (ours[..., order][real] - theirs[real]).abs().max().item()
