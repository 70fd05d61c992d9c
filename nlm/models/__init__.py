"""The model families, by name: the one registry every other list of families derives from.

Each family lives in its own module, one architecture per file, and declares its facts (what it
trains on, whether it is causal or recurrent, its context, FLOPs...) as class attributes; see
nlm/models/base.py. Adding a family is one model file, one line in `FAMILIES` and its presets
(docs/ARCHITECTURE.md, "Adding a model family").

Importing this package does not import torch: `FAMILIES` is plain data (the CLI builds its
parsers and configs check names from it), and the classes load on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nlm.errors import NLMError

if TYPE_CHECKING:
    from nlm.models.base import LanguageModel

# family -> "module:Class", in the order every listing shows them; imported on first use.
FAMILIES: dict[str, str] = {
    "fnn": "nlm.models.fnn:FNNLanguageModel",
    "rnn": "nlm.models.rnn:RNNLanguageModel",
    "lstm": "nlm.models.lstm:LSTMLanguageModel",
    "gpt": "nlm.models.gpt:GPT",
    "bert": "nlm.models.bert:BERT",
    "elmo": "nlm.models.elmo:ELMo",
    "transformer": "nlm.models.transformer:Transformer",
}


def model_class(family: str) -> type[LanguageModel]:
    """The class registered as `family`; NLMError naming the known ones for any other name."""
    if family not in FAMILIES:
        raise NLMError(f"unknown model '{family}' (known: {', '.join(FAMILIES)})")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def families_where(predicate: Callable[[type[LanguageModel]], bool]) -> list[str]:
    """The registered families whose class satisfies `predicate`, in registry order, e.g.
    `families_where(lambda cls: cls.causal)` -> ['fnn', 'rnn', 'lstm', 'gpt']."""
    return [family for family in FAMILIES if predicate(model_class(family))]


def build_model(family: str, preset: str | None = None, **overrides: Any) -> LanguageModel:
    """A freshly initialised model from a preset (see presets.py) plus field overrides."""
    from nlm.models.presets import preset_config

    cls = model_class(family)
    fields = preset_config(family, preset) if preset else {}
    fields.update(overrides)
    return cls(cls.config_class.from_dict(fields, source=f"{family} config"))


# Re-exported from nlm.models.base, which imports torch: loaded when first asked for (PEP 562).
_FROM_BASE = (
    "IGNORE_INDEX",
    "CausalLanguageModel",
    "IncrementalDecoder",
    "LanguageModel",
    "ModelOutput",
)


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from nlm.models import base

        return getattr(base, name)
    raise AttributeError(f"module 'nlm.models' has no attribute {name!r}")


__all__ = [
    "FAMILIES",
    *_FROM_BASE,
    "build_model",
    "families_where",
    "model_class",
]
