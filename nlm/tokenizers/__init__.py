"""Tokenizers by kind: "spm-bpe", "spm-unigram" (SentencePiece), "word", "char", and "hf" (a
Hugging Face tokenizer that `nlm import` brought in; it loads but is never trained here).

    tok = train_tokenizer("word", lines, min_count=2)
    tok.save("runs/x/tokenizer"); tok = load_tokenizer("runs/x/tokenizer")

All kinds share the interface and special ids of `base.Tokenizer`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nlm.errors import NLMError
from nlm.tokenizers.base import Tokenizer, fingerprint, meta_path, normalize_text, read_json
from nlm.tokenizers.hf import HFTokenizer
from nlm.tokenizers.sentinels import read_sentinel_count, with_sentinels
from nlm.tokenizers.spm import BPETokenizer, UnigramTokenizer
from nlm.tokenizers.vocab import CharTokenizer, WordTokenizer

KINDS: dict[str, type[Tokenizer]] = {
    "spm-bpe": BPETokenizer,
    "spm-unigram": UnigramTokenizer,
    "word": WordTokenizer,
    "char": CharTokenizer,
}
# What load_tokenizer reads: the trainable kinds plus imported Hugging Face tokenizers.
LOADABLE: dict[str, type[Tokenizer]] = {**KINDS, "hf": HFTokenizer}


def _check_kind(
    kind: object, source: str, known: dict[str, type[Tokenizer]] = KINDS
) -> type[Tokenizer]:
    if kind not in known:
        raise NLMError(f"{source}: unknown tokenizer kind {kind!r} (known: {', '.join(known)})")
    return known[kind]


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    vocab_size: int | None = None,
    min_count: int | None = None,
    segmented: bool = False,
    seed: int = 0,
    sample_size: int = 100_000,
    **options: Any,
) -> Tokenizer:
    """Train a tokenizer of `kind` on a stream of texts (lines or documents).

    vocab_size: total size including the 7 special tokens (word/char: keep the top words;
        SentencePiece: target size, default 8000). min_count: word/char only. segmented: the
        text is pre-segmented (whitespace marks word boundaries, e.g. PKU Chinese); the char
        tokenizer then drops that whitespace, word and SentencePiece split on it anyway.
    seed, sample_size: SentencePiece trains on a shuffled sample of at most sample_size texts.
    options: SentencePiece only: byte_fallback (default True: characters without a piece
        become byte pieces, never <unk>), character_coverage, num_threads.
    Each text goes through `base.normalize_text` (no BOM, LF line ends) first.
    """
    cls = _check_kind(kind, "train_tokenizer")
    texts = map(normalize_text, texts)  # a BOM or CRLF must not make its own tokens
    if kind.startswith("spm-"):
        if min_count is not None:
            raise NLMError(f"min_count applies to word and char tokenizers, not {kind}")
        return cls.train(
            texts, vocab_size=vocab_size, seed=seed, sample_size=sample_size, **options
        )
    if options:
        raise NLMError(f"options {sorted(options)} apply to SentencePiece tokenizers, not {kind}")
    if kind == "char":
        return cls.train(texts, vocab_size=vocab_size, min_count=min_count, segmented=segmented)
    return cls.train(texts, vocab_size=vocab_size, min_count=min_count)


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """A saved tokenizer: reads DIR/nlm-tokenizer.json {"kind": ...} (DIR/tokenizer.json in a
    directory saved before the rename) and the kind's own files, then DIR/sentinels.json, the
    sentinel tokens a span model's tokenizer ends with (nlm/tokenizers/sentinels.py)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NLMError(f"{directory}: no such tokenizer directory")
    path = meta_path(directory)
    tokenizer = _check_kind(read_json(path).get("kind"), str(path), LOADABLE).load(directory)
    count = read_sentinel_count(directory)  # T5's <extra_id_k> after the vocabulary
    return with_sentinels(tokenizer, count) if count else tokenizer


__all__ = [
    "KINDS",
    "LOADABLE",
    "Tokenizer",
    "fingerprint",
    "load_tokenizer",
    "normalize_text",
    "train_tokenizer",
]
