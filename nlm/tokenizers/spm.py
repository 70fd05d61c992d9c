"""SentencePiece subword tokenizers: BPE ("spm-bpe") and unigram ("spm-unigram").

Trained on a seeded reservoir sample of at most `sample_size` texts drawn in one pass over an
iterator, so training memory does not grow with the corpus. The seven special tokens are pinned to ids 0-6:
<pad> <unk> <s> </s> through SentencePiece's own meta-piece ids, [CLS] [SEP] [MASK] as control
symbols (they fill the next free ids in order). Special tokens written literally in a text are
cut out before SentencePiece sees it (in training and in encode), so WikiText's `<unk>` becomes
the unknown id rather than the pieces "<", "unk", ">".

Byte fallback is on by default: a character with no piece of its own (an unseen CJK character,
an emoji) becomes its UTF-8 byte pieces `<0xE6>...`, never `<unk>`, so the tokenizer is
open-vocabulary on any text and decode gives the character back. Trained with
byte_fallback=False, such characters are `<unk>`; the tokenizer then saves a spelling model
(DIR/spelling.json, nlm/tokenizers/spelling.py: estimated on the sampled training characters it
has no piece for, or on all of them) for the open-vocabulary bits/byte.

Normalization is "identity": decode(encode(text)) gives the text back up to whitespace runs,
for Chinese full-width punctuation too (NFKC would rewrite it). Saved as DIR/nlm-tokenizer.json
and DIR/spm.model; the trainer is single-threaded and seeded, so the same texts and seed give the
same bytes.
"""

from __future__ import annotations

import io
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nlm.errors import NLMError
from nlm.tokenizers import spelling
from nlm.tokenizers.base import (
    META_FILE,
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
    cut_specials,
    flatten_ids,
    join_specials,
    keep_in_decode,
    split_specials,
    write_json,
)

VERSION = 1
DEFAULT_VOCAB_SIZE = 8000


def _plain_texts(texts: Iterable[str]) -> Iterator[str]:
    """Texts without their literal special tokens (not text to learn pieces from)."""
    for text in texts:
        text = " ".join(p for p in split_specials(text) if p not in SPECIAL_IDS).strip()
        if text:
            yield text


def reservoir_sample(items: Iterable[str], size: int, seed: int) -> list[str]:
    """A uniform sample of at most `size` items in one pass, holding only the sample (Algorithm R)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, item in enumerate(items):
        if n < size:
            sample.append(item)
        else:
            j = rng.randrange(n + 1)
            if j < size:
                sample[j] = item
    return sample


class SentencePieceTokenizer(Tokenizer):
    model_type: str  # SentencePiece's name: "bpe" | "unigram"

    def __init__(self, model_proto: bytes, source: str = "SentencePiece model") -> None:
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as exc:
            raise NLMError(f"{source}: corrupt SentencePiece model ({exc})") from None
        pieces = tuple(self.sp.id_to_piece(i) for i in range(len(SPECIAL_TOKENS)))
        if pieces != SPECIAL_TOKENS:
            raise NLMError(f"{source}: special tokens are {pieces}, expected {SPECIAL_TOKENS}")

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int | None = None,
        seed: int = 0,
        sample_size: int = 100_000,
        byte_fallback: bool = True,
        character_coverage: float = 0.9995,
        num_threads: int = 1,
    ) -> SentencePieceTokenizer:
        if sample_size < 1:
            raise NLMError(f"sample_size={sample_size}: must be at least 1")
        # The bounded sample is drawn here, not by SentencePiece's input_sentence_size: its
        # random seed is process-global and honoured only on first use, so a second tokenizer
        # trained in the same process would ignore its seed.
        sample = reservoir_sample(_plain_texts(texts), sample_size, seed)
        if not sample:
            raise NLMError(f"no text to train a {cls.kind} tokenizer on")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                model_writer=model,
                model_type=cls.model_type,
                vocab_size=vocab_size or DEFAULT_VOCAB_SIZE,
                hard_vocab_limit=False,  # a small text gets a smaller vocabulary, not an error
                pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                control_symbols=list(SPECIAL_TOKENS[4:]),
                input_sentence_size=0,  # already sampled
                max_sentence_length=1 << 16,  # WikiText paragraphs exceed the 4192-byte default
                normalization_rule_name="identity",
                byte_fallback=byte_fallback,
                character_coverage=character_coverage,
                num_threads=num_threads,
                minloglevel=2,
            )  # fmt: skip
        except RuntimeError as exc:
            too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", str(exc))
            if too_small and byte_fallback:
                raise NLMError(
                    f"vocab_size={too_small[1]}: too small for a {cls.kind} tokenizer with byte "
                    f"fallback, which needs the 7 special tokens, 256 byte pieces and the text's "
                    f"common characters ({too_small[2]} in all); ask for a larger vocabulary "
                    "(--vocab-size), or from Python train with byte_fallback=False (a closed "
                    "vocabulary: rare characters become <unk>)"
                ) from None
            raise NLMError(f"cannot train a {cls.kind} tokenizer: {exc}") from None
        tokenizer = cls(model.getvalue())
        if not byte_fallback:  # characters without a piece become <unk>: price their spelling
            chars = Counter(c for text in sample for c in text if not c.isspace())
            kept = {c for c in chars if UNK_ID not in tokenizer.sp.encode(c)}
            tokenizer.spelling = spelling.estimate_left_out(chars, kept)
        return tokenizer

    def unknown_spans(self, texts: Sequence[str]) -> list[list[str]]:
        out = []
        for text in texts:
            spans = []
            for part in split_specials(text):
                if part not in SPECIAL_IDS:
                    proto = self.sp.encode(part, return_type="proto")
                    spans += [p.surface for p in proto.pieces if p.id == UNK_ID]
            out.append(spans)
        return out

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """One batched SentencePiece call; num_threads=1 by default because the corpus pipeline
        already runs one tokenizer per Ray actor (SentencePiece would otherwise take every core)."""
        cut = cut_specials(texts)
        if cut is None:  # no literal special token: the texts go to SentencePiece whole
            return self.sp.encode(list(texts), num_threads=num_threads)
        pieces, counts, special_ids = cut
        encoded = iter(self.sp.encode(pieces, num_threads=num_threads))
        specials = iter(special_ids)
        out = []
        for n in counts:
            ids = next(encoded)
            for _ in range(n - 1):
                ids.append(next(specials))
                ids.extend(next(encoded))
            out.append(ids)
        return out

    def encode_flat(
        self, texts: Sequence[str], num_threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """`encode_batch` as (ids int32, lengths int64): the special ids go back in with numpy,
        and Python touches each id once (flattening SentencePiece's lists)."""
        cut = cut_specials(texts)
        if cut is None:
            return flatten_ids(self.sp.encode(list(texts), num_threads=num_threads))
        pieces, counts, special_ids = cut
        flat, piece_lengths = flatten_ids(self.sp.encode(pieces, num_threads=num_threads))
        return join_specials(flat, piece_lengths, counts, special_ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        # Runs of ordinary pieces decode with SentencePiece; special ids are shown by name
        # (SentencePiece itself would drop control symbols and show <unk> as " ⁇ ").
        words: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i >= len(SPECIAL_TOKENS):
                run.append(i)
                continue
            if run:
                words.append(self.sp.decode(run).strip())
                run = []
            if keep_in_decode(i, skip_special):
                words.append(SPECIAL_TOKENS[i])
        if run:
            words.append(self.sp.decode(run).strip())
        return " ".join(w for w in words if w)

    def id_to_token(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        token_id = self.sp.piece_to_id(token)
        # SentencePiece answers <unk>'s id for any unknown piece.
        return None if token_id == SPECIAL_IDS["<unk>"] and token != "<unk>" else token_id

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / META_FILE, {"kind": self.kind, "version": VERSION})
        (directory / "spm.model").write_bytes(self.model_proto)
        if self.spelling is not None:
            self.spelling.save(directory)

    @classmethod
    def load(cls, directory: str | Path) -> SentencePieceTokenizer:
        path = Path(directory) / "spm.model"
        if not path.is_file():
            raise NLMError(f"{path}: missing (not a saved {cls.kind} tokenizer?)")
        tokenizer = cls(path.read_bytes(), source=str(path))
        tokenizer.spelling = spelling.SpellingModel.load(directory)
        return tokenizer


class BPETokenizer(SentencePieceTokenizer):
    kind = "spm-bpe"
    model_type = "bpe"


class UnigramTokenizer(SentencePieceTokenizer):
    kind = "spm-unigram"
    model_type = "unigram"
