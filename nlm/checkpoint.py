"""The serving checkpoint: one directory format for every model family.

    DIR/config.json        {"format": "nlm-checkpoint", "version": 1, "family": ...,
                            "model_type": "nlm-<family>", "model": {model config},
                            "tokenizer": {"kind", "fingerprint"}, ...extra}
    DIR/model.safetensors  weights (tied tensors stored once), metadata {"format": "pt"};
                           loading never unpickles
    DIR/tokenizer/         the tokenizer's own files
    DIR/metrics.json       training/eval metrics (may be {})

Written to a temporary sibling directory and renamed into place, so a reader never sees a
half-written checkpoint. Training (DeepSpeed) checkpoints are a different thing: the trainer
exports this format at the end of a run.

`model_type` is there for Hugging Face tools: `transformers.AutoConfig` reads it and stops with
"does not recognize this architecture" instead of guessing a model from the directory's name
(a path containing "bert" used to give a full-size BERT-base config). `nlm export --format hf`
(nlm/hf/) writes the Hugging Face format itself.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from nlm.errors import NLMError
from nlm.files import locked, previous_dir, replace_dir, temp_dir_for, write_json
from nlm.models import FAMILIES, LanguageModel, model_class
from nlm.tokenizers import load_tokenizer
from nlm.tokenizers.base import Tokenizer, fingerprint

FORMAT = "nlm-checkpoint"
VERSION = 1
# What `transformers` expects in a safetensors header (it refuses files marked otherwise).
SAFETENSORS_METADATA = {"format": "pt"}


@dataclasses.dataclass
class Checkpoint:
    path: Path
    family: str
    model: LanguageModel
    tokenizer: Tokenizer
    metrics: dict[str, Any]
    config: dict[str, Any]  # the whole config.json


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a training run directory holding one in `model/`."""
    path = Path(path)
    if not path.exists():
        raise NLMError(f"{path}: no such checkpoint or run directory")
    if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    if not (path / "config.json").is_file() and (old := previous_dir(path / "model")):
        return old  # an export crashed between its two renames: the old model is complete
    return path


def read_checkpoint_config(directory: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint_dir(directory) / "config.json"
    if not path.is_file():
        raise NLMError(f"{directory}: not a checkpoint directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: unreadable config.json ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise NLMError(f"{path}: not an nlm checkpoint (field 'format' is not '{FORMAT}')")
    if config.get("family") not in FAMILIES:
        raise NLMError(
            f"{path}: field 'family' is {config.get('family')!r}, not one of {', '.join(FAMILIES)}"
        )
    return config


def save_checkpoint(
    directory: str | Path,
    model: LanguageModel,
    tokenizer: Tokenizer,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    directory = Path(directory)
    tmp = temp_dir_for(directory)
    try:
        tokenizer.save(tmp / "tokenizer")
        config = {
            "format": FORMAT,
            "version": VERSION,
            "family": model.family,
            "model_type": f"nlm-{model.family}",
            "model": model.config.to_dict(),
            "tokenizer": {"kind": tokenizer.kind, "fingerprint": fingerprint(tmp / "tokenizer")},
            **(extra or {}),
        }
        # save_model stores each shared (tied) tensor once; load_model restores the aliasing.
        safetensors.torch.save_model(
            model, str(tmp / "model.safetensors"), metadata=SAFETENSORS_METADATA
        )
        write_json(tmp / "metrics.json", metrics or {}, sort_keys=True)
        write_json(tmp / "config.json", config, sort_keys=True)
        # Swapped in by renames: the old model stays complete until the new one is in place
        # (deleting it first left no model at all after a crash in between).
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | Path, family: str | None = None, device: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a serving checkpoint. With `family`, refuse a checkpoint of any other family."""
    directory = resolve_checkpoint_dir(directory)
    config = read_checkpoint_config(directory)
    if family is not None and config["family"] != family:
        raise NLMError(f"{directory}: is a {config['family']} checkpoint, not {family}")
    source = f"{directory}/config.json"
    if not isinstance(config.get("model"), dict):
        raise NLMError(f"{source} (field 'model'): missing or not an object")
    cls = model_class(config["family"])
    model_config = cls.config_class.from_dict(config["model"], source=source)
    try:
        model = cls(model_config)
    except (ValueError, TypeError, AssertionError) as exc:  # a config the model rejects
        raise NLMError(
            f"{source} (field 'model'): not a valid {config['family']} config ({exc})"
        ) from None
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise NLMError(f"{directory}: no model.safetensors")
    try:
        missing, unexpected = safetensors.torch.load_model(
            model, str(weights), strict=False, device=str(device)
        )
    except safetensors.SafetensorError as exc:  # truncated, corrupt, or not safetensors at all
        raise NLMError(f"{weights}: unreadable weights ({exc})") from None
    except RuntimeError as exc:  # shapes differ from the config's model
        first = str(exc).strip().splitlines()[-1].strip()
        raise NLMError(
            f"{weights}: weights do not match the {config['family']} config ({first})"
        ) from None
    if missing or unexpected:
        names = ", ".join([*sorted(missing), *sorted(unexpected)][:3])
        raise NLMError(f"{weights}: weights do not match a {config['family']} model ({names} …)")
    model.to(device).eval()
    tokenizer = legacy_sentinels(model, load_tokenizer(directory / "tokenizer"))
    _check_tokenizer(directory, config, tokenizer, model)
    metrics_path = directory / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NLMError(f"{metrics_path}: unreadable metrics ({exc})") from None
    return Checkpoint(directory, config["family"], model, tokenizer, metrics, config)


def legacy_sentinels(model: LanguageModel, tokenizer: Tokenizer) -> Tokenizer:
    """A span model saved before the sentinels joined the tokenizer (nlm/tokenizers/
    sentinels.py) has them as the rows past its tokenizer's vocabulary: the tokenizer with that
    many `<extra_id_k>` tokens (in memory; the files stay as they are). Others: `tokenizer`."""
    from nlm.tokenizers.sentinels import sentinel_count, with_sentinels

    model_vocab = getattr(model.config, "vocab_size", None)
    if (
        model.objective == "span"
        and sentinel_count(tokenizer) == 0
        and isinstance(model_vocab, int)
        and model_vocab > tokenizer.vocab_size
    ):
        return with_sentinels(tokenizer, model_vocab - tokenizer.vocab_size)
    return tokenizer


def _check_tokenizer(
    directory: Path, config: dict[str, Any], tokenizer: Tokenizer, model: LanguageModel
) -> None:
    """The tokenizer must be the one the model was trained with (else ids point at wrong rows)."""
    recorded = (config.get("tokenizer") or {}).get("fingerprint")
    if recorded is not None and recorded != fingerprint(directory / "tokenizer"):
        raise NLMError(
            f"{directory}/tokenizer: does not match the fingerprint in config.json (field 'tokenizer')"
        )
    model_vocab = getattr(model.config, "vocab_size", None)
    if isinstance(model_vocab, int) and tokenizer.vocab_size > model_vocab:
        raise NLMError(
            f"{directory}/tokenizer: {tokenizer.vocab_size} tokens, but the model has only {model_vocab} rows"
        )


def record_metrics(checkpoint: str | Path, updates: dict[str, Any]) -> Path:
    """Merge `updates` into a checkpoint's metrics.json (e.g. `nlm eval --record` adds the test
    figures that /v1/models shows). Under a lock, through `nlm.files.write_json`: never half a
    file, and two concurrent runs both keep their figures."""
    directory = resolve_checkpoint_dir(Path(checkpoint))
    path = directory / "metrics.json"
    with locked(path):  # two runs recording at once must not lose one's figures
        try:
            metrics = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise NLMError(f"{path}: unreadable metrics ({exc})") from None
        metrics.update(updates)
        write_json(path, metrics, sort_keys=True)
    return path
