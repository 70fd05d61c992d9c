"""A Hugging Face `tokenizers` tokenizer behind nlm's interface: the kind "hf".

`nlm import` gives an imported GPT-2 or BERT this kind. nlm's models, objectives and collators
rely on the fixed special ids 0-6 (`base.SPECIAL_TOKENS`), a Hugging Face vocabulary has its own
ids, so the two are related by a fixed map:

    nlm ids 0..6    the seven special tokens; each is the Hugging Face token of the same role
                    (pad, unk, bos, eos, cls, sep, mask) where there is one, else a row that the
                    Hugging Face model does not have (`nlm import` adds it to the embeddings)
    nlm ids 7..     every other Hugging Face id, in increasing order

Saved as DIR/nlm-tokenizer.json {"kind": "hf", "version", "specials": {token: hf id or null},
"hf_rows", "special_tokens": {role: token}} and DIR/hf-tokenizer.json, the Hugging Face file as
it was given (kept byte for byte, so re-saving never changes the fingerprint).

Encoding is the Hugging Face tokenizer's (`add_special_tokens=False`: nlm adds markup itself),
so an imported model sees exactly the ids it was trained on. Text is not cut at nlm's literal
special tokens first, unlike the other kinds: GPT-2 reads a literal "<unk>" as the three pieces
"<", "unk", ">", and so does the imported model; a tokenizer that `nlm export` wrote declares
the seven as its own special tokens, so there they come out as one id each, as in nlm.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nlm.errors import NLMError
from nlm.tokenizers.base import (
    META_FILE,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    Tokenizer,
    keep_in_decode,
    meta_path,
    read_json,
    write_json,
)

VERSION = 1
BACKEND_FILE = "hf-tokenizer.json"
# The Hugging Face role of each nlm special token (tokenizer_config.json's names).
ROLES = {
    "<pad>": "pad_token",
    "<unk>": "unk_token",
    "<s>": "bos_token",
    "</s>": "eos_token",
    "[CLS]": "cls_token",
    "[SEP]": "sep_token",
    "[MASK]": "mask_token",
}


def id_map(specials: dict[str, int | None], hf_rows: int) -> np.ndarray:
    """(V_nlm,) int64: the Hugging Face id of each nlm id, -1 for a special with none.

    `specials` gives each nlm special token's Hugging Face id (or None); `hf_rows` is the number
    of rows of the Hugging Face model's embedding table (every id below it keeps a row)."""
    used = {i for i in specials.values() if i is not None}
    head = [-1 if specials.get(t) is None else int(specials[t]) for t in SPECIAL_TOKENS]
    rest = [i for i in range(hf_rows) if i not in used]
    return np.asarray(head + rest, dtype=np.int64)


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(
        self,
        backend_json: str,
        specials: dict[str, int | None],
        hf_rows: int,
        special_tokens: dict[str, str] | None = None,
        source: str = "Hugging Face tokenizer",
    ) -> None:
        from tokenizers import Tokenizer as Backend

        try:
            self.backend = Backend.from_str(backend_json)
        except Exception as exc:  # the Rust parser's error types are not exported
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise NLMError(f"{source}: not a Hugging Face tokenizer.json ({first})") from None
        if set(specials) != set(SPECIAL_TOKENS):
            raise NLMError(f"{source}: field 'specials' must name the seven special tokens")
        bad = [i for i in specials.values() if i is not None and not 0 <= int(i) < hf_rows]
        ids = [i for i in specials.values() if i is not None]
        if bad or len(set(ids)) != len(ids):
            raise NLMError(f"{source}: field 'specials' holds ids outside the vocabulary or twice")
        top = self.backend.get_vocab_size(with_added_tokens=True)
        if top > hf_rows:
            raise NLMError(
                f"{source}: the tokenizer has {top} ids but the model only {hf_rows} rows"
            )
        self.backend_json = backend_json
        self.specials = {
            t: (None if specials[t] is None else int(specials[t])) for t in SPECIAL_TOKENS
        }
        self.hf_rows = int(hf_rows)
        self.special_tokens = dict(special_tokens or {})
        self.to_hf = id_map(self.specials, self.hf_rows)
        self.from_hf = np.empty(self.hf_rows, dtype=np.int64)
        ordinary = self.to_hf >= 0
        self.from_hf[self.to_hf[ordinary]] = np.nonzero(ordinary)[0]

    @property
    def vocab_size(self) -> int:
        return len(self.to_hf)

    @property
    def added_ids(self) -> list[int]:
        """nlm ids that have no Hugging Face token (rows `nlm import` added)."""
        return [i for i, t in enumerate(SPECIAL_TOKENS) if self.specials[t] is None]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self.from_hf[np.asarray(e.ids, dtype=np.int64)].tolist() for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        words: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i >= len(SPECIAL_TOKENS):
                run.append(int(self.to_hf[i]))
                continue
            if run:
                words.append(self.backend.decode(run, skip_special_tokens=False).strip())
                run = []
            if keep_in_decode(i, skip_special):
                words.append(SPECIAL_TOKENS[i])
        if run:
            words.append(self.backend.decode(run, skip_special_tokens=False).strip())
        return " ".join(w for w in words if w)

    def id_to_token(self, token_id: int) -> str:
        if token_id < len(SPECIAL_TOKENS):
            return SPECIAL_TOKENS[token_id]
        return self.backend.id_to_token(int(self.to_hf[token_id])) or f"<row {token_id}>"

    def token_to_id(self, token: str) -> int | None:
        if token in SPECIAL_IDS:
            return SPECIAL_IDS[token]
        hf_id = self.backend.token_to_id(token)
        return None if hf_id is None else int(self.from_hf[hf_id])

    def meta(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "version": VERSION,
            "specials": self.specials,
            "hf_rows": self.hf_rows,
            "special_tokens": self.special_tokens,
        }

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / META_FILE, self.meta())
        (directory / BACKEND_FILE).write_text(self.backend_json, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        directory = Path(directory)
        source = meta_path(directory)
        meta = read_json(source)
        path = directory / BACKEND_FILE
        if not path.is_file():
            raise NLMError(f"{path}: missing (not a saved hf tokenizer?)")
        try:
            specials, hf_rows = meta["specials"], int(meta["hf_rows"])
            special_tokens = meta.get("special_tokens") or {}
            if not isinstance(specials, dict) or not isinstance(special_tokens, dict):
                raise TypeError("not an object")
        except (KeyError, TypeError, ValueError) as exc:
            raise NLMError(f"{source}: corrupt hf tokenizer metadata ({exc})") from None
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise NLMError(f"{path}: not UTF-8 text") from None
        return cls(text, specials, hf_rows, special_tokens, source=str(path))
