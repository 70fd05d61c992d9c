"""The one tokenizer interface shared by SentencePiece, word and character tokenizers.

Every tokenizer has the same special tokens, in this order, with these ids:
    0 <pad>   1 <unk>   2 <s>   3 </s>   4 [CLS]   5 [SEP]   6 [MASK]
so models, objectives and collators can rely on fixed ids whatever the tokenizer kind.
A saved tokenizer is a directory holding `nlm-tokenizer.json` ({"kind": ..., ...}) plus whatever
files the kind needs (the SentencePiece model, the vocabulary). Directories saved before that file
was renamed hold it as `tokenizer.json` (the Hugging Face `tokenizers` file name, which HF tools
then failed to parse); they still load, and `fingerprint` hashes both layouts alike.

Special tokens written literally in a text encode to their ids in every kind: WikiText's `<unk>`
is the unknown token (not a new word), a fill-mask query's `[MASK]` is the mask token.
`decode` always drops `<pad>` and renders other special ids by name; with `skip_special=True`
it also drops the markup tokens (`<s> </s> [CLS] [SEP] [MASK]`). `<unk>` stands for real text
and is always shown.
"""

from __future__ import annotations

import abc
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from nlm.tokenizers.spelling import SpellingModel

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
# One regex finds every special token written literally in a text; the capture group keeps them.
SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
# The special tokens by first character, the usual literal one (WikiText's <unk>) first.
_SPECIALS_BY_FIRST_CHAR = {
    "<": ("<unk>", "<pad>", "<s>", "</s>"),
    "[": ("[MASK]", "[CLS]", "[SEP]"),
}


class Tokenizer(abc.ABC):
    kind: ClassVar[str]  # "spm-bpe" | "spm-unigram" | "word" | "char"

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    cls_id = CLS_ID
    sep_id = SEP_ID
    mask_id = MASK_ID

    # What an open-vocabulary bits/byte charges for text this tokenizer maps to <unk>
    # (nlm/tokenizers/spelling.py); None for a tokenizer saved without one.
    spelling: SpellingModel | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch` as arrays: all ids concatenated (int32) and each text's length
        (int64), without a Python list per text where the kind can avoid it."""
        return flatten_ids(self.encode_batch(texts))

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

    def unknown_spans(self, texts: Sequence[str]) -> list[list[str]] | None:
        """For each text, the pieces of it that encode to `<unk>` (a word, a character, a run
        of characters SentencePiece has no piece for), in order; a literal `<unk>` written in
        the text is the text's own marker, not a piece this tokenizer failed to spell, and is
        left out. None when the kind cannot tell (an imported Hugging Face tokenizer)."""
        return None


def keep_in_decode(token_id: int, skip_special: bool) -> bool:
    """Whether `decode` shows this id (see the module docstring)."""
    if token_id == PAD_ID:
        return False
    return not (skip_special and token_id < len(SPECIAL_TOKENS) and token_id != UNK_ID)


def split_specials(text: str) -> list[str]:
    """`text` cut around literal special tokens: ["the ", "[MASK]", " sat"] (empty parts dropped)."""
    return [part for part in SPECIAL_PATTERN.split(text) if part]


def cut_specials(texts: Sequence[str]) -> tuple[list[str], list[int], list[int]] | None:
    """The texts cut around their literal special tokens, for one batched encode of the rest:
    (plain pieces of all texts in order, pieces per text, the special ids in order), or None
    when no text holds a special token. Text i is its first piece, then the next special id
    and the next piece, and so on (a text with k specials has k + 1 pieces, some maybe empty).

    One `str.split` per text when a single kind of special token occurs in the batch (WikiText
    has only `<unk>`), the regex otherwise: the same cut either way.
    """
    # None of the special tokens holds a line break, so joining cannot make one no text has.
    present = _specials_in("\n".join(texts))
    if not present:
        return None
    if len(present) == 1:
        token = present[0]
        parts = [t.split(token) for t in texts]
        pieces = list(itertools.chain.from_iterable(parts))
        return pieces, list(map(len, parts)), [SPECIAL_IDS[token]] * (len(pieces) - len(parts))
    split = [SPECIAL_PATTERN.split(t) for t in texts]  # plain, special, plain, ..., plain
    pieces = [piece for parts in split for piece in parts[0::2]]
    counts = [(len(parts) + 1) // 2 for parts in split]
    return pieces, counts, [SPECIAL_IDS[s] for parts in split for s in parts[1::2]]


def _specials_in(text: str) -> list[str]:
    """The special tokens that occur in `text`: a few C-level scans, not one per token."""
    present = []
    for first, (common, *rare) in _SPECIALS_BY_FIRST_CHAR.items():
        rest = text
        if common in rest:
            present.append(common)
            rest = rest.replace(common, "\n")  # holds no special token, so it makes none
        if rest.count(first) > 256:  # many other "<" (markup?): one scan per token
            present += [token for token in rare if token in rest]
            continue
        found, pos = set(), rest.find(first)
        while pos >= 0:  # no special token is a prefix of another
            found.update(token for token in rare if rest.startswith(token, pos))
            pos = rest.find(first, pos + 1)
        present += [token for token in rare if token in found]
    return present


def flatten_ids(ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (all ids concatenated as int32, each list's length as int64)."""
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def join_specials(
    flat: np.ndarray, piece_lengths: np.ndarray, counts: Sequence[int], special_ids: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Put the special ids back between the encoded pieces of `cut_specials`: (ids, lengths)
    per text as `flatten_ids` gives them, with numpy on whole arrays."""
    counts_a = np.asarray(counts, dtype=np.int64)
    if len(counts_a) == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
    last = np.cumsum(counts_a) - 1  # index of each text's last piece
    between = np.ones(len(piece_lengths), dtype=bool)
    between[last] = False  # a special follows every piece but a text's last
    ends = np.cumsum(piece_lengths)
    ids = np.insert(flat, ends[between], np.asarray(special_ids, dtype=np.int32))
    lengths = np.add.reduceat(piece_lengths, last - counts_a + 1) + counts_a - 1
    return ids, lengths


def write_json(path: Path, data: object) -> None:
    """Byte-deterministic JSON (sorted keys, fixed layout) so a fingerprint depends on content only."""
    path.write_text(
        json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


META_FILE = "nlm-tokenizer.json"  # {"kind", "version", ...settings}
LEGACY_META_FILE = "tokenizer.json"  # its name before: HF's `tokenizers` file name


def meta_path(directory: str | Path) -> Path:
    """The metadata file of a saved tokenizer: `nlm-tokenizer.json`, or in a directory saved
    before the rename, `tokenizer.json` (the new name when neither exists, for the error)."""
    directory = Path(directory)
    new, old = directory / META_FILE, directory / LEGACY_META_FILE
    return old if not new.is_file() and old.is_file() else new


def fingerprint(directory: str | Path) -> str:
    """sha256 over the files of a saved tokenizer directory (manifests and checkpoints record it).

    The metadata file is hashed under its old name `tokenizer.json` and in that name's sort
    position, so a tokenizer saved today has the fingerprint the same tokenizer had when the
    file was called so: shard manifests and checkpoints written before the rename stay valid.
    """
    digest = hashlib.sha256()
    files = [p for p in Path(directory).iterdir() if p.is_file()]
    named = sorted(((LEGACY_META_FILE if p.name == META_FILE else p.name), p) for p in files)
    for name, path in named:
        digest.update(name.encode())
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


BOM = "\ufeff"


def normalize_text(text: str) -> str:
    """A document as every tokenizer and the shard pipeline see it: without a leading UTF-8 byte
    order mark and with Windows (CRLF) line ends as LF.

    Editors on Windows save the same text with a BOM and CRLF; without this the BOM glues onto
    the first word (a word "\ufefffor") and "\r" becomes a char token, so one corpus gave two
    vocabularies. Only CRLF pairs change: a lone "\r" is left as it is (it is rare, and a
    line-per-document file could not honour it as a line break anyway).
    """
    if text.startswith(BOM):
        text = text[1:]
    return text.replace("\r\n", "\n") if "\r" in text else text
