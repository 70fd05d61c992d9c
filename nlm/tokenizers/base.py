"""The one tokenizer interface shared by SentencePiece, word and character tokenizers.

Every tokenizer has the same special tokens, in this order, with these ids:
    0 <pad>   1 <unk>   2 <s>   3 </s>   4 [CLS]   5 [SEP]   6 [MASK]
so models, objectives and collators can rely on fixed ids whatever the tokenizer kind.
A saved tokenizer is a directory holding `tokenizer.json` ({"kind": ..., ...}) plus whatever
files the kind needs (the SentencePiece model, the vocabulary).
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))


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
    def decode(self, ids: Iterable[int]) -> str: ...

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


def fingerprint(directory: str | Path) -> str:
    """sha256 over the files of a saved tokenizer directory (manifests and checkpoints record it)."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
