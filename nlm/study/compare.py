"""Compare the word vectors of several checkpoints that share one vocabulary.

`compare(models, words, k)` returns the report data (plain JSON types): each word's neighbours
under each model, and per pair of models overlap@k (over the chosen words and over the whole
vocabulary), the Spearman correlation of pairwise similarities, linear CKA and the Procrustes
residual. Also per model the same CKA / Procrustes against a random Gaussian table of the same
shape, and the overlap two unrelated tables would have by chance, so the numbers have a floor.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nlm.checkpoint import load_checkpoint
from nlm.errors import NLMError
from nlm.study import metrics
from nlm.tokenizers.base import Tokenizer
from nlm.wordvectors import (
    NUM_SPECIAL,
    Which,
    normalized,
    sample_words,
    token_counts,
    word_id,
    word_vectors,
)


@dataclasses.dataclass
class StudyModel:
    name: str
    path: str
    family: str
    vectors: torch.Tensor  # (V, D) float32, rows cut to the tokenizer's vocabulary
    tokenizer: Tokenizer
    fingerprint: str
    parameters: int
    metrics: dict[str, Any]


def load_models(paths: Sequence[str | Path], which: Which = "input") -> list[StudyModel]:
    """Load checkpoints (or run dirs) and check they share a tokenizer (same fingerprint)."""
    if len(paths) < 2:
        raise NLMError("compare needs at least two checkpoints")
    models = []
    for path in paths:
        ckpt = load_checkpoint(path)
        vocab = ckpt.tokenizer.vocab_size
        vectors = word_vectors(ckpt.model, which)
        if vectors.shape[0] < vocab:
            raise NLMError(f"{path}: embedding has {vectors.shape[0]} rows < vocabulary {vocab}")
        models.append(
            StudyModel(
                name=ckpt.family,
                path=str(path),
                family=ckpt.family,
                vectors=vectors[:vocab],
                tokenizer=ckpt.tokenizer,
                fingerprint=ckpt.config.get("tokenizer", {}).get("fingerprint", ""),
                parameters=ckpt.model.num_parameters(),
                metrics=ckpt.metrics,
            )
        )
    first = models[0]
    for m in models[1:]:
        if m.fingerprint != first.fingerprint:
            raise NLMError(
                f"{m.path}: tokenizer fingerprint {m.fingerprint[:12]} differs from {first.path}'s "
                f"{first.fingerprint[:12]} (models must share a vocabulary to be compared)"
            )
    # names: the family, or the directory name when two models are of the same family
    families = [m.family for m in models]
    for m in models:
        if families.count(m.family) > 1:
            m.name = Path(m.path).resolve().name
    names = [m.name for m in models]
    for i, m in enumerate(models):
        if names.count(m.name) > 1:
            m.name = f"{m.name}-{i + 1}"
    return models


def compare(
    models: Sequence[StudyModel],
    words: Sequence[str],
    k: int = 10,
    seed: int = 0,
    which: Which = "input",
) -> dict[str, Any]:
    tokenizer = models[0].tokenizer
    ids = [word_id(tokenizer, w) for w in words]
    words = [tokenizer.id_to_token(i) for i in ids]  # canonical spelling (e.g. "▁word")
    vocab_ids = list(range(NUM_SPECIAL, tokenizer.vocab_size))

    word_tables, vocab_tables, neighbors = {}, {}, {w: {} for w in words}
    for m in models:
        unit = normalized(m.vectors.double())
        table = metrics.neighbor_table(m.vectors, ids, k, NUM_SPECIAL)
        word_tables[m.name] = table
        vocab_tables[m.name] = metrics.neighbor_table(m.vectors, vocab_ids, k, NUM_SPECIAL)
        for w, i, row in zip(words, ids, table.tolist(), strict=True):
            sims = (unit[row] @ unit[i]).clamp(-1, 1).tolist()
            neighbors[w][m.name] = [
                [tokenizer.id_to_token(j), round(s, 4)] for j, s in zip(row, sims, strict=True)
            ]

    rows = slice(NUM_SPECIAL, None)  # the special tokens' rows are never trained like words
    bands = frequency_bands(tokenizer, len(vocab_ids))
    pairs = []
    for a, b in itertools.combinations(models, 2):
        per_word = metrics.overlap_at_k(vocab_tables[a.name], vocab_tables[b.name])
        pairs.append(
            {
                "a": a.name,
                "b": b.name,
                "overlap_words": _mean(
                    metrics.overlap_at_k(word_tables[a.name], word_tables[b.name])
                ),
                "overlap_vocab": _mean(per_word),
                # the same, per quarter of the vocabulary from most to least frequent
                "overlap_vocab_by_frequency": [_mean(per_word[band]) for band in bands],
                "spearman": round(
                    metrics.similarity_spearman(a.vectors[rows], b.vectors[rows], seed=seed), 4
                ),
                "cka": round(metrics.linear_cka(a.vectors[rows], b.vectors[rows]), 4),
                "procrustes": round(
                    metrics.procrustes_residual(a.vectors[rows], b.vectors[rows]), 4
                ),
            }
        )

    gen = torch.Generator().manual_seed(seed)
    model_info = []
    for m in models:
        noise = torch.randn(m.vectors[rows].shape, generator=gen, dtype=torch.float64)
        model_info.append(
            {
                "name": m.name,
                "family": m.family,
                "path": m.path,
                "parameters": m.parameters,
                "embedding_dim": m.vectors.shape[1],
                "metrics": m.metrics,
                "mean_cosine": round(metrics.mean_cosine(m.vectors[rows], seed=seed), 4),
                "cka_vs_random": round(metrics.linear_cka(m.vectors[rows], noise), 4),
                "procrustes_vs_random": round(
                    metrics.procrustes_residual(m.vectors[rows], noise), 4
                ),
            }
        )
    return {
        "k": k,
        "seed": seed,
        "which": which,
        "tokenizer": {
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": models[0].fingerprint,
        },
        "models": model_info,
        "words": words,
        "neighbors": neighbors,
        "pairs": pairs,
        "chance_overlap": round(k / (len(vocab_ids) - 1), 4),
    }


def frequency_bands(tokenizer: Tokenizer, n: int, parts: int = 4) -> list[torch.Tensor]:
    """Positions 0..n-1 of the non-special words, split into `parts` equal bands from the most
    to the least frequent (by the tokenizer's counts, else by id: word vocabularies are sorted)."""
    order = torch.arange(n)
    counts = token_counts(tokenizer)
    if counts is not None:
        freq = torch.tensor(
            [counts.get(tokenizer.id_to_token(NUM_SPECIAL + i), 0) for i in range(n)],
            dtype=torch.float64,
        )
        order = torch.sort(-freq, stable=True).indices
    return list(torch.tensor_split(order, parts))


def _mean(values: torch.Tensor) -> float:
    return round(float(values.mean()), 4) if len(values) else 0.0


def choose_words(
    tokenizer: Tokenizer,
    words: Sequence[str] | None,
    n_random: int,
    seed: int,
    min_count: int = 5,
) -> list[str]:
    """The given words (checked against the vocabulary), or `n_random` drawn with `seed`."""
    if words:
        return [tokenizer.id_to_token(word_id(tokenizer, w)) for w in words]
    return sample_words(tokenizer, n_random, seed, min_count=min_count)


def compare_checkpoints(
    paths: Sequence[str | Path],
    out: str | Path,
    words: Sequence[str] | None = None,
    n_random: int = 20,
    k: int = 10,
    seed: int = 0,
    which: Which = "input",
    min_count: int = 5,
    title: str = "Word-vector comparison",
) -> dict[str, Any]:
    """Load, compare and write OUT/report.{md,json} + figures; returns the report data."""
    from nlm.study.report import write_report

    models = load_models(paths, which)
    tokenizer = models[0].tokenizer
    chosen = choose_words(tokenizer, words, n_random, seed, min_count)
    data = compare(models, chosen, k=k, seed=seed, which=which)
    ids = {tokenizer.id_to_token(i): i for i in range(tokenizer.vocab_size)}
    write_report(data, {m.name: m.vectors for m in models}, ids, out, title=title)
    return data
