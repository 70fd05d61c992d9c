"""Which models to serve: "path" or "name=path" entries -> uniquely named, checked checkpoints.

Kept free of Ray so `nlm serve` can refuse a bad path before it pays for importing and starting
Ray.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from nlm.checkpoint import read_checkpoint_config, resolve_checkpoint_dir
from nlm.errors import NLMError

GATEWAY = "Gateway"  # the ingress deployment's name; no model may take it
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclasses.dataclass
class ModelSpec:
    name: str
    path: Path
    family: str


def model_name(path: Path) -> str:
    """A run directory's name (runs/gpt-small -> gpt-small), also for its model/ subdirectory."""
    path = Path(os.path.abspath(path))  # not resolve(): a symlink's own name is the one meant
    name = path.parent.name if path.name == "model" and path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._") or "model"


def parse_checkpoints(specs: list[str]) -> list[ModelSpec]:
    """Checked, uniquely named models from "path" / "name=path" entries (NLMError otherwise)."""
    if not specs:
        raise NLMError("no checkpoints given (args.checkpoints is empty)")
    models: list[ModelSpec] = []
    for spec in specs:
        if not isinstance(spec, str) or not spec:
            raise NLMError(f"checkpoint {spec!r}: expected a path or name=path")
        name, sep, path_text = spec.partition("=")
        if not sep or "/" in name or not name:
            name, path_text = "", spec
        path = Path(path_text).expanduser()
        config = read_checkpoint_config(path)  # NLMError for a missing or foreign directory
        name = name or model_name(path)
        if not NAME_RE.match(name) or name == GATEWAY:
            raise NLMError(
                f"checkpoint {spec!r}: model name '{name}' must match {NAME_RE.pattern} and not be '{GATEWAY}'"
            )
        if any(m.name == name for m in models):
            raise NLMError(
                f"checkpoint {spec!r}: two models named '{name}'; give one another name with name=path"
            )
        models.append(ModelSpec(name, resolve_checkpoint_dir(path).resolve(), config["family"]))
    return models
