"""One config system: dataclasses that round-trip through JSON/YAML dicts.

Every model config, training config and pipeline config is a `@dataclass` inheriting
`Config`. Unknown keys are an error (naming the key), so a typo in a YAML file never
silently falls back to a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Self

from nlm.errors import NLMError


@dataclasses.dataclass
class Config:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise NLMError(
                f"{source}: unknown field '{unknown[0]}' for {cls.__name__} "
                f"(known: {', '.join(sorted(names))})"
            )
        try:
            return cls(**data)
        except TypeError as exc:  # missing required field
            raise NLMError(f"{source}: {cls.__name__}: {exc}") from None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise NLMError(f"{source}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        return cls.from_dict(data, source=source)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def load_json(cls, path: str | Path) -> Self:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), source=str(path))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """A byte size as written in configs and flags: '64M' -> 67108864 (binary units k, M, G, T,
    optional 'iB'/'B'); a plain number is bytes. Raises argparse.ArgumentTypeError (so argparse
    reports it against its flag) for anything else."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4M, 512k, 1G)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))
