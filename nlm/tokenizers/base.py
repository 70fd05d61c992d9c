"""The one tokenizer interface shared by SentencePiece, word and character tokenizers.

Every tokenizer has the same special tokens, in this order, with these ids:
    0 <pad>   1 <unk>   2 <s>   3 </s>   4 [CLS]   5 [SEP]   6 [MASK]
so models, objectives and collators can rely on fixed ids whatever the tokenizer kind.
A saved tokenizer is a directory holding `tokenizer.json` ({"kind": ..., ...}) plus whatever
files the kind needs (the SentencePiece model, the vocabulary).

Special tokens written literally in a text encode to their ids in every kind: WikiText's `<unk>`
is the unknown token (not a new word), a fill-mask query's `[MASK]` is the mask token.
`decode` always drops `<pad>` and renders other special ids by name; with `skip_special=True`
it also drops the markup tokens (`<s> </s> [CLS] [SEP] [MASK]`). `<unk>` stands for real text
and is always shown.
"""

from __future__ import annotations

import abc
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
# One regex finds every special token written literally in a text; the capture group keeps them.
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


class Tokenizer(abc.ABC):
    kind: ClassVar[str]  # "spm-bpe" | "spm-unigram" | "word" | "char"

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    cls_id = CLS_ID
    sep_id = SEP_ID
    mask_id = MASK_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str: ...

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str: ...

    @abc.abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None when it is not in the vocabulary."""

    @abc.abstractmethod
    def save(self, directory: str | Path) -> None: ...

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: str | Path) -> Tokenizer: ...

    def is_special(self, token_id: int) -> bool:
        return token_id < len(SPECIAL_TOKENS)


def keep_in_decode(token_id: int, skip_special: bool) -> bool:
    """Whether `decode` shows this id (see the module docstring)."""
    if token_id == PAD_ID:
        return False
    return not (skip_special and token_id < len(SPECIAL_TOKENS) and token_id != UNK_ID)


def split_specials(text: str) -> list[str]:
    """`text` cut around literal special tokens: ["the ", "[MASK]", " sat"] (empty parts dropped)."""
    return [part for part in SPECIAL_PATTERN.split(text) if part]


def write_json(path: Path, data: object) -> None:
    """Byte-deterministic JSON (sorted keys, fixed layout) so a fingerprint depends on content only."""
    path.write_text(
        json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def fingerprint(directory: str | Path) -> str:
    """sha256 over the files of a saved tokenizer directory (manifests and checkpoints record it)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    """A tokenizer's JSON file as a dict, or a one-line NLMError naming the file."""
    from nlm.errors import NLMError

    if not path.is_file():
        raise NLMError(f"{path}: missing (not a saved tokenizer?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: corrupt tokenizer file ({exc})") from None
    if not isinstance(data, dict):
        raise NLMError(f"{path}: corrupt tokenizer file (expected a JSON object)")
    return data
