"""Word vectors and their nearest neighbours (the course exercise, chapter 5 习题).

A model's word vectors are the rows of its input embedding table. Optionally the rows of the
output (softmax) embedding, or the average of both when the two are untied and have the same
width. Neighbours are ranked by cosine similarity. Plain PyTorch: serving (/v1/neighbors),
`nlm neighbors`, `nlm compare` and the study report all use these functions.
"""

from __future__ import annotations

import difflib
import random
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from nlm.errors import NLMError
from nlm.models.base import LanguageModel
from nlm.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from nlm.tokenizers.sentinels import first_sentinel_id

Which = Literal["input", "output", "average"]
WHICH: tuple[str, ...] = ("input", "output", "average")
NUM_SPECIAL = len(SPECIAL_TOKENS)


def word_vectors(model: LanguageModel, which: Which = "input") -> torch.Tensor:
    """(V, D) float32 word vectors of `model` (V may exceed the tokenizer's vocab when padded)."""
    if which not in WHICH:
        raise NLMError(f"unknown embedding '{which}' (known: {', '.join(WHICH)})")
    with torch.no_grad():
        inp = model.input_embeddings().weight.detach().float().cpu()
        if which == "input":
            return inp
        out = model.output_embeddings().detach().float().cpu()
        if which == "output":
            return out
        if out.shape != inp.shape:
            raise NLMError(
                f"{model.family}: cannot average input {tuple(inp.shape)} and output "
                f"{tuple(out.shape)} embeddings of different shapes (use --which input or output)"
            )
        return (inp + out) / 2


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    """Every token, by id."""
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def normalized(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (all-zero rows stay zero, so their cosine is 0, not NaN)."""
    return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)


def word_id(tokenizer: Tokenizer, word: str) -> int:
    """The id of an ordinary vocabulary word; NLMError with close matches otherwise."""
    token_id = tokenizer.token_to_id(word)
    if token_id is None and not word.startswith("▁"):
        token_id = tokenizer.token_to_id("▁" + word)  # SentencePiece word-initial pieces
    if token_id is not None and not tokenizer.is_special(token_id):
        return token_id
    if token_id is not None:
        raise NLMError(f"'{word}' is a special token, not a word")
    words = [w for i, w in enumerate(vocabulary(tokenizer)) if not tokenizer.is_special(i)]
    close = difflib.get_close_matches(word, words, n=5, cutoff=0.5)
    if not close:  # short (e.g. two-character Chinese) words rarely pass the ratio: share a char
        close = [w for w in words if set(w) & set(word)][:5]
    hint = ", ".join(close) if close else "none"
    raise NLMError(f"unknown word '{word}' (close matches: {hint})")


def rank_neighbors(
    unit: torch.Tensor, ids: Sequence[int], k: int, exclude_below: int = NUM_SPECIAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(ids), k) neighbour ids and cosines for rows `ids` of the unit-length matrix `unit`.

    Excludes each query itself and the ids below `exclude_below` (the special tokens). Ties keep
    the lower id first (a stable sort), so the output is the same on every run.
    """
    vocab = unit.shape[0]
    if k < 1 or k > vocab - exclude_below - 1:
        raise NLMError(
            f"k={k} must be between 1 and {vocab - exclude_below - 1} for this vocabulary"
        )
    query = torch.as_tensor(list(ids), dtype=torch.long)
    sims = unit[query] @ unit.T  # (Q, V)
    sims[:, :exclude_below] = -float("inf")
    sims[torch.arange(len(query)), query] = -float("inf")
    values, order = torch.sort(sims, dim=1, descending=True, stable=True)
    return order[:, :k], values[:, :k].clamp(-1.0, 1.0)


def neighbors(
    model: LanguageModel, tokenizer: Tokenizer, word: str, k: int = 10, which: Which = "input"
) -> list[tuple[str, float]]:
    """The `k` words closest to `word` by cosine similarity, most similar first.

    Never includes `word` itself or special tokens; similarities are in [-1, 1].
    An unknown word raises NLMError("unknown word 'xyz' (close matches: ...)").
    """
    return nearest(unit_vectors(model, tokenizer, which, torch.float64), tokenizer, word, k)


def unit_vectors(
    model: LanguageModel,
    tokenizer: Tokenizer,
    which: Which = "input",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(words, D) unit-length word vectors in `dtype`: the table `nearest` searches. A server
    builds it once and keeps it (it is as large as the embedding). `words` is the tokenizer's
    vocab_size without its span sentinels (nlm.tokenizers.sentinels, the last ids): they are
    special tokens, never anyone's neighbours."""
    return normalized(word_vectors(model, which)[: first_sentinel_id(tokenizer)].to(dtype))


def nearest(
    unit: torch.Tensor, tokenizer: Tokenizer, word: str, k: int = 10
) -> list[tuple[str, float]]:
    """`neighbors` on a table from `unit_vectors`."""
    query = word_id(tokenizer, word)
    ids, sims = rank_neighbors(unit, [query], k)
    return [(tokenizer.id_to_token(int(i)), float(s)) for i, s in zip(ids[0], sims[0], strict=True)]


def is_wordlike(token: str) -> bool:
    """True when the token contains a letter (so not punctuation, symbols or bare numbers)."""
    return any(unicodedata.category(ch).startswith("L") for ch in token.lstrip("▁"))


def token_counts(tokenizer: Tokenizer) -> Mapping[str, int] | None:
    """Training-corpus counts kept by the tokenizer, when it keeps them (the word tokenizer)."""
    counts = getattr(tokenizer, "counts", None)
    if counts is None:
        return None
    if isinstance(counts, Mapping):
        return counts
    # a sequence indexed by id
    return {tokenizer.id_to_token(i): int(c) for i, c in enumerate(counts)}


def sample_words(
    tokenizer: Tokenizer,
    n: int,
    seed: int,
    counts: Mapping[str, int] | None = None,
    min_count: int = 5,
) -> list[str]:
    """`n` distinct words drawn reproducibly: no specials, <unk> or punctuation, and frequent.

    The frequency floor is `counts[word] >= min_count` with counts given or kept by the tokenizer.
    Without counts, the vocabulary order stands in for frequency (word vocabularies are sorted
    most frequent first): the draw is from the more frequent half of the candidate words.
    """
    counts = counts if counts is not None else token_counts(tokenizer)
    pool = [
        w
        for i, w in enumerate(vocabulary(tokenizer))
        if not tokenizer.is_special(i) and is_wordlike(w)
    ]
    if counts is not None:
        pool = [w for w in pool if counts.get(w, 0) >= min_count]
    else:
        pool = pool[: max(n, len(pool) // 2)]
    if len(pool) < n:
        floor = f" with count >= {min_count}" if counts is not None else ""
        raise NLMError(f"cannot draw {n} words: the vocabulary has only {len(pool)} words{floor}")
    return random.Random(seed).sample(pool, n)
