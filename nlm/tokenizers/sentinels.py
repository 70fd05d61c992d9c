"""T5's sentinel tokens as a tokenizer's own: `<extra_id_0>`, `<extra_id_1>`, ... at the end of
the vocabulary, for every tokenizer kind (issue 18).

Span corruption (nlm.objectives.span_corrupt) replaces the k-th dropped span by the k-th
sentinel. `with_sentinels(tokenizer, n)` gives a tokenizer whose ids are the inner tokenizer's,
then `<extra_id_0>` .. `<extra_id_{n-1}>` = inner.vocab_size + k (ascending; T5's own vocabulary
counts them down from its last id, which changes nothing but the numbering). They encode from
their text (a literal `<extra_id_3>` in a text is that sentinel, as in T5's tokenizer, when
k < n) and decode to it; `decode(skip_special=True)` keeps them, as it keeps `<unk>`: in a span
model's output they say which span follows.

Saved as the inner tokenizer's files plus `sentinels.json` {"count": n}; `load_tokenizer`
wraps a directory that holds it. The file takes part in the tokenizer's fingerprint, so shards
and checkpoints tell a tokenizer with sentinels from the same one without.

Before this, span shard sets and checkpoints kept the sentinels out of the tokenizer: ids past
its vocab_size, their count in the shard manifest (settings.sentinels) and in the model's
vocab_size. `nlm.checkpoint.load_checkpoint` still loads such a checkpoint (the model's extra
ids are exactly the sentinels, so it wraps the tokenizer in memory); such a shard set is refused
by `nlm train` with a line saying to prepare it again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nlm.errors import NLMError
from nlm.tokenizers.base import Tokenizer, flatten_ids

SENTINEL_FILE = "sentinels.json"
SENTINEL_PATTERN = re.compile(r"(<extra_id_\d+>)")
_PREFIX = "<extra_id_"


def sentinel_token(k: int) -> str:
    """The text of the k-th sentinel: `<extra_id_k>`."""
    return f"{_PREFIX}{k}>"


class SentinelTokenizer(Tokenizer):
    """`inner`'s vocabulary followed by `count` sentinel tokens (module docstring). Everything
    else (kind, spelling model, unknown spans, kind-specific attributes) is the inner one's."""

    def __init__(self, inner: Tokenizer, count: int) -> None:
        if isinstance(inner, SentinelTokenizer):
            inner = inner.inner
        if count < 1:
            raise NLMError(f"sentinels={count}: must be at least 1")
        self.inner = inner
        self.count = int(count)
        self.kind = inner.kind  # type: ignore[misc]  # an instance attribute: the inner's kind
        self.spelling = inner.spelling

    def __getattr__(self, name: str) -> Any:  # kind-specific attributes (tokens, counts, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def first_sentinel(self) -> int:
        """The id of `<extra_id_0>`: the inner tokenizer's vocab_size."""
        return self.inner.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size + self.count

    def sentinel_index(self, text: str) -> int | None:
        """k for the text `<extra_id_k>` with k < count, else None."""
        if text.startswith(_PREFIX) and text.endswith(">") and text[len(_PREFIX) : -1].isdigit():
            k = int(text[len(_PREFIX) : -1])
            return k if k < self.count else None
        return None

    def encode(self, text: str) -> list[int]:
        if _PREFIX not in text:
            return self.inner.encode(text)
        ids: list[int] = []
        plain = ""  # text between sentinels is encoded in one piece, as without them
        for part in SENTINEL_PATTERN.split(text):
            k = self.sentinel_index(part)
            if k is None:
                plain += part
                continue
            if plain:
                ids += self.inner.encode(plain)
                plain = ""
            ids.append(self.first_sentinel + k)
        if plain:
            ids += self.inner.encode(plain)
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not any(_PREFIX in t for t in texts):
            return self.inner.encode_batch(texts)
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if not any(_PREFIX in t for t in texts):
            return self.inner.encode_flat(texts)
        return flatten_ids([self.encode(t) for t in texts])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The inner tokenizer's text of the runs between sentinels, and each sentinel's
        `<extra_id_k>`, joined by a space (no space for a char tokenizer, whose text has none
        between tokens)."""
        first = self.first_sentinel
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < first:
                run.append(i)
                continue
            if run:
                parts.append(self.inner.decode(run, skip_special=skip_special))
                run = []
            parts.append(self.id_to_token(i))
        if run:
            parts.append(self.inner.decode(run, skip_special=skip_special))
        return ("" if self.kind == "char" else " ").join(p for p in parts if p)

    def id_to_token(self, token_id: int) -> str:
        if token_id >= self.first_sentinel:
            if token_id >= self.vocab_size:
                raise IndexError(f"id {token_id} is past the vocabulary of {self.vocab_size}")
            return sentinel_token(token_id - self.first_sentinel)
        return self.inner.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        k = self.sentinel_index(token)
        return self.first_sentinel + k if k is not None else self.inner.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.first_sentinel or self.inner.is_special(token_id)

    def unknown_spans(self, texts: Sequence[str]) -> list[list[str]] | None:
        return self.inner.unknown_spans(
            [
                SENTINEL_PATTERN.sub(
                    lambda m: "" if self.sentinel_index(m[0]) is not None else m[0], t
                )
                for t in texts
            ]
        )

    def save(self, directory: str | Path) -> None:
        self.inner.save(directory)
        write_sentinel_file(directory, self.count)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        from nlm.tokenizers import load_tokenizer

        return load_tokenizer(directory)


def with_sentinels(tokenizer: Tokenizer, count: int) -> SentinelTokenizer:
    """`tokenizer` (its own ids unchanged) followed by `count` sentinels; a tokenizer that has
    sentinels already gets `count` of them instead."""
    return SentinelTokenizer(tokenizer, count)


def sentinel_count(tokenizer: Tokenizer) -> int:
    """How many sentinel tokens `tokenizer` has (0 for a plain one)."""
    return tokenizer.count if isinstance(tokenizer, SentinelTokenizer) else 0


def first_sentinel_id(tokenizer: Tokenizer) -> int:
    """The id of `<extra_id_0>`: a SentinelTokenizer's first sentinel, or for a plain tokenizer
    the first id past its vocabulary (where span models put them before the sentinels joined
    the tokenizer). The ids below it are ordinary tokens."""
    return getattr(tokenizer, "first_sentinel", tokenizer.vocab_size)


def write_sentinel_file(directory: str | Path, count: int) -> None:
    """DIR/sentinels.json {"count": count}: the saved form of `count` sentinels."""
    (Path(directory) / SENTINEL_FILE).write_text(
        json.dumps({"count": count}) + "\n", encoding="utf-8"
    )


def read_sentinel_count(directory: str | Path) -> int:
    """The count in DIR/sentinels.json, 0 when there is none; NLMError naming a corrupt file."""
    path = Path(directory) / SENTINEL_FILE
    if not path.is_file():
        return 0
    try:
        count = json.loads(path.read_text(encoding="utf-8"))["count"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: corrupt sentinel file ({exc!r})") from None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise NLMError(f"{path} (field 'count'): expected a positive integer, got {count!r}")
    return count


__all__ = [
    "SENTINEL_FILE",
    "SentinelTokenizer",
    "first_sentinel_id",
    "read_sentinel_count",
    "sentinel_count",
    "sentinel_token",
    "with_sentinels",
    "write_sentinel_file",
]
