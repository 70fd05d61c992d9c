"""Vocabulary-table tokenizers: word level and character level.

Both count units over a stream of texts (a `Counter`, never the whole corpus in memory) and keep
a vocabulary by one of the three rules of the course notes:
    all units in the training data            (vocab_size=None, min_count=None)
    units with frequency >= min_count          (min_count=N)
    the top-V most frequent units              (vocab_size=V: V counts the 7 special tokens too)
(min_count and vocab_size may be combined.) Ties break by count descending, then by the unit
itself, so the same text always gives the same ids. Everything else encodes to <unk>.

Saved as DIR/nlm-tokenizer.json {"kind", "version", ...settings} and DIR/vocab.json, one
[token, training count] pair a line in id order (the counts feed unigram baselines and
frequency-aware word-vector studies), and DIR/spelling.json, the spelling model that an
open-vocabulary bits/byte charges each `<unk>` with (nlm/tokenizers/spelling.py: estimated here
on the training units the vocabulary leaves out; a directory saved without it still loads).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from nlm.errors import NLMError
from nlm.tokenizers import spelling
from nlm.tokenizers.base import (
    META_FILE,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    keep_in_decode,
    meta_path,
    read_json,
    split_specials,
    write_json,
)

VERSION = 1


def select_vocabulary(
    counts: Counter[str], vocab_size: int | None = None, min_count: int | None = None
) -> list[tuple[str, int]]:
    """The kept (unit, count) pairs in id order, specials excluded (they come first, fixed)."""
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise NLMError(
            f"vocab_size={vocab_size}: must exceed the {len(SPECIAL_TOKENS)} special tokens"
        )
    if min_count is not None and min_count < 1:
        raise NLMError(f"min_count={min_count}: must be at least 1")
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if min_count is not None:
        ranked = [(unit, n) for unit, n in ranked if n >= min_count]
    if vocab_size is not None:
        ranked = ranked[: vocab_size - len(SPECIAL_TOKENS)]
    return ranked


class VocabularyTokenizer(Tokenizer):
    """A fixed table of units; subclasses say how a text splits into units and how they join."""

    def __init__(self, units: list[tuple[str, int]], **settings: Any) -> None:
        self.tokens = list(SPECIAL_TOKENS) + [unit for unit, _ in units]
        self.counts = [0] * len(SPECIAL_TOKENS) + [n for _, n in units]
        self.ids = {token: i for i, token in enumerate(self.tokens)}
        self.settings = settings

    # --- what a subclass defines -------------------------------------------------------
    def split(self, text: str) -> list[str]:
        """The units of a text that holds no special tokens."""
        raise NotImplementedError

    def join(self, tokens: list[str]) -> str:
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int | None = None,
        min_count: int | None = None,
        **settings: Any,
    ) -> VocabularyTokenizer:
        probe = cls([], **settings)  # only its `split` is used, to count with the right settings
        counts: Counter[str] = Counter()
        for text in texts:
            for part in split_specials(text):
                if part not in SPECIAL_IDS:
                    counts.update(probe.split(part))
        if not counts:
            raise NLMError(f"no text to train a {cls.kind} tokenizer on")
        kept = select_vocabulary(counts, vocab_size, min_count)
        tokenizer = cls(kept, **settings)
        tokenizer.spelling = spelling.estimate_left_out(counts, {unit for unit, _ in kept})
        return tokenizer

    # --- the interface -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in split_specials(text):
            if part in SPECIAL_IDS:
                ids.append(SPECIAL_IDS[part])
            else:
                ids.extend(self.ids.get(unit, UNK_ID) for unit in self.split(part))
        return ids

    def unknown_spans(self, texts: Sequence[str]) -> list[list[str]]:
        return [
            [
                unit
                for part in split_specials(text)
                if part not in SPECIAL_IDS
                for unit in self.split(part)
                if unit not in self.ids
            ]
            for text in texts
        ]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.join([self.tokens[i] for i in ids if keep_in_decode(i, skip_special)])

    def id_to_token(self, token_id: int) -> str:
        return self.tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / META_FILE, {"kind": self.kind, "version": VERSION, **self.settings})
        # One pair a line: diffable, and still plain JSON.
        rows = (
            json.dumps([t, n], ensure_ascii=False)
            for t, n in zip(self.tokens, self.counts, strict=True)
        )
        (directory / "vocab.json").write_text("[\n" + ",\n".join(rows) + "\n]\n", encoding="utf-8")
        if self.spelling is not None:
            self.spelling.save(directory)

    @classmethod
    def load(cls, directory: str | Path) -> VocabularyTokenizer:
        directory = Path(directory)
        meta = read_json(meta_path(directory))
        path = directory / "vocab.json"
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            pairs = [(str(t), int(n)) for t, n in rows]
        except FileNotFoundError:
            raise NLMError(f"{path}: missing (not a saved {cls.kind} tokenizer?)") from None
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise NLMError(f"{path}: corrupt vocabulary ({exc})") from None
        if tuple(t for t, _ in pairs[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise NLMError(f"{path}: corrupt vocabulary (the special tokens must come first)")
        settings = {k: v for k, v in meta.items() if k not in ("kind", "version")}
        try:
            tokenizer = cls(pairs[len(SPECIAL_TOKENS) :], **settings)
        except TypeError:
            raise NLMError(f"{meta_path(directory)}: unknown settings {sorted(settings)}") from None
        tokenizer.spelling = spelling.SpellingModel.load(directory)
        return tokenizer


class WordTokenizer(VocabularyTokenizer):
    """Whitespace-separated words (pre-tokenized English, pre-segmented Chinese); decode joins
    with single spaces."""

    kind = "word"

    def __init__(self, units: list[tuple[str, int]]) -> None:
        super().__init__(units)

    def split(self, text: str) -> list[str]:
        return text.split()

    def join(self, tokens: list[str]) -> str:
        return " ".join(tokens)


class CharTokenizer(VocabularyTokenizer):
    """Unicode characters. With segmented=True (pre-segmented Chinese) the whitespace that marks
    word boundaries is not part of the text and is dropped."""

    kind = "char"

    def __init__(self, units: list[tuple[str, int]], segmented: bool = False) -> None:
        super().__init__(units, segmented=bool(segmented))

    def split(self, text: str) -> list[str]:
        if self.settings["segmented"]:
            return [c for c in text if not c.isspace()]
        return list(text)

    def join(self, tokens: list[str]) -> str:
        return "".join(tokens)
