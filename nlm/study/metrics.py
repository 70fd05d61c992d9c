"""How much two embedding tables of the same vocabulary agree.

All functions take (N, D) matrices whose row i is the same word in both (D may differ).
- overlap@k: the fraction of the k nearest neighbours (cosine) two tables share for a word.
- Spearman: rank correlation of the cosine similarities of the same word pairs.
- linear CKA (Kornblith et al. 2019): similarity of the two representations' Gram structure,
  invariant to rotations and isotropic scaling; 1 for identical geometry.
- Procrustes residual: centre and scale both to unit Frobenius norm, rotate X onto Y with the
  best orthogonal map, and report half the squared residual, 1 - ||X^T Y||_* (0 = the same up to
  a rotation and scale, larger = more different; at most 1).
Computed in float64 so figures are reproducible to the printed digits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nlm.wordvectors import normalized, rank_neighbors


def neighbor_table(
    vectors: torch.Tensor, ids: Sequence[int], k: int, exclude_below: int, chunk: int = 2048
) -> torch.Tensor:
    """(len(ids), k) neighbour ids of rows `ids` (chunked so a big vocabulary fits in memory)."""
    unit = normalized(vectors.double())
    parts = [
        rank_neighbors(unit, ids[i : i + chunk], k, exclude_below)[0]
        for i in range(0, len(ids), chunk)
    ]
    return torch.cat(parts) if parts else torch.empty(0, k, dtype=torch.long)


def overlap_at_k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, |a_row ∩ b_row| / k for two (N, k) neighbour-id tables."""
    k = a.shape[1]
    shared = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)
    return shared.double() / k


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), as Spearman needs."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    # tie groups: average the ranks inside each run of equal values
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    if len(counts) < len(x):
        starts = torch.cumsum(counts, 0) - counts
        mean_rank = starts.double() + (counts.double() - 1) / 2
        ranks[order] = mean_rank[inverse]
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean()
    y = y.double() - y.double().mean()
    denom = x.norm() * y.norm()
    return float((x @ y) / denom) if denom > 0 else 0.0


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x.double()), _ranks(y.double()))


def pair_sample(n: int, max_pairs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs i < j of n rows, or `max_pairs` of them drawn reproducibly when there are more."""
    if n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n, (max_pairs,), generator=g)
    j = (i + torch.randint(1, n, (max_pairs,), generator=g)) % n  # j != i
    return i, j


def similarity_spearman(
    a: torch.Tensor, b: torch.Tensor, max_pairs: int = 1_000_000, seed: int = 0
) -> float:
    """Spearman correlation between the two tables' cosine similarities of the same word pairs."""
    i, j = pair_sample(a.shape[0], max_pairs, seed)
    ua, ub = normalized(a.double()), normalized(b.double())
    return spearman((ua[i] * ua[j]).sum(1), (ub[i] * ub[j]).sum(1))


def mean_cosine(a: torch.Tensor, max_pairs: int = 1_000_000, seed: int = 0) -> float:
    """Mean cosine similarity of distinct word pairs: near 0 for isotropic vectors, near 1 when
    all vectors share one dominant direction (then every cosine is high and neighbours blur)."""
    i, j = pair_sample(a.shape[0], max_pairs, seed)
    unit = normalized(a.double())
    return float((unit[i] * unit[j]).sum(1).mean())


def _centered(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred matrices."""
    x, y = _centered(x), _centered(y)
    cross = (y.T @ x).norm() ** 2
    denom = (x.T @ x).norm() * (y.T @ y).norm()
    return float(cross / denom) if denom > 0 else 0.0


def procrustes_residual(x: torch.Tensor, y: torch.Tensor) -> float:
    """Half the squared residual ||X R - Y||_F^2 / 2 after centring, unit scaling and the best
    orthogonal R (narrower matrices are zero-padded, which leaves the optimum unchanged)."""
    x, y = _centered(x), _centered(y)
    if x.norm() == 0 or y.norm() == 0:
        return 1.0
    x, y = x / x.norm(), y / y.norm()
    # ||X R - Y||^2 = 2 - 2 tr(R^T X^T Y), maximised by R = U V^T: tr = nuclear norm of X^T Y
    nuclear = torch.linalg.svdvals(x.T @ y).sum()
    return float((1.0 - nuclear).clamp_min(0.0))
