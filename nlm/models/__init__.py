"""The five model families, by name. Each lives in its own module, one architecture per file."""

from __future__ import annotations

import importlib
from typing import Any

from nlm.errors import NLMError
from nlm.models.base import IGNORE_INDEX, CausalLanguageModel, LanguageModel, ModelOutput

# family -> "module:Class"; imported on first use so importing nlm.models stays cheap.
FAMILIES: dict[str, str] = {
    "fnn": "nlm.models.fnn:FNNLanguageModel",
    "rnn": "nlm.models.rnn:RNNLanguageModel",
    "lstm": "nlm.models.lstm:LSTMLanguageModel",
    "gpt": "nlm.models.gpt:GPT",
    "bert": "nlm.models.bert:BERT",
}


def model_class(family: str) -> type[LanguageModel]:
    if family not in FAMILIES:
        raise NLMError(f"unknown model '{family}' (known: {', '.join(FAMILIES)})")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(family: str, preset: str | None = None, **overrides: Any) -> LanguageModel:
    """A freshly initialised model from a preset (see presets.py) plus field overrides."""
    from nlm.models.presets import preset_config

    cls = model_class(family)
    fields = preset_config(family, preset) if preset else {}
    fields.update(overrides)
    return cls(cls.config_class.from_dict(fields, source=f"{family} config"))


__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "CausalLanguageModel",
    "LanguageModel",
    "ModelOutput",
    "build_model",
    "model_class",
]
