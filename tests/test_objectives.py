"""Objectives: causal LM loss, BERT's 15% / 80-10-10 masking, NSP sentence pairs."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from nlm.errors import NLMError
from nlm.objectives import CLS_ID, MASK_ID, SEP_ID, causal_lm_loss, make_nsp_pairs, mask_tokens

V = 5000


def test_causal_lm_loss_ignores_minus_100():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 1] = targets[1, 4] = -100
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(causal_lm_loss(logits, targets), expected)


def sample_batch(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, V, (256, 512), generator=g)
    specials = torch.rand(ids.shape, generator=g) < 0.1  # sprinkle <pad>, [CLS], [SEP], ...
    return torch.where(specials, torch.randint(0, 7, ids.shape, generator=g), ids)


def test_masking_statistics_follow_bert():
    ids = sample_batch()
    masked, labels = mask_tokens(ids, V, generator=torch.Generator().manual_seed(1))
    special = ids < 7
    chosen = labels != -100
    # Specials are never chosen, never changed.
    assert not chosen[special].any()
    assert torch.equal(masked[special], ids[special])
    # Labels are the original tokens at chosen positions; nothing else changes.
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])

    n_ordinary = int((~special).sum())  # ~118k tokens
    rate = chosen.sum().item() / n_ordinary
    assert rate == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()  # ~17.7k chosen
    to_mask = (masked[chosen] == MASK_ID).float().mean().item()
    same = (masked[chosen] == ids[chosen]).float().mean().item()
    replaced = masked[chosen & (masked != MASK_ID) & (masked != ids)]
    assert to_mask == pytest.approx(0.8, abs=0.015)
    # Unchanged: the 10% kept plus the rare random draw of the same token (1 / (V - 7)).
    assert same == pytest.approx(0.1 + 0.1 / (V - 7), abs=0.01)
    assert replaced.numel() / n == pytest.approx(0.1, abs=0.01)
    assert bool((replaced >= 7).all()) and bool((replaced < V).all())  # never a special id


def test_masking_respects_extra_specials_and_is_deterministic():
    ids = sample_batch(seed=3)[:64]
    extra = [100, 101, 102]
    ids[:, ::7] = 100
    _, labels = mask_tokens(ids, V, special_mask=extra, generator=torch.Generator().manual_seed(5))
    assert not (labels[torch.isin(ids, torch.tensor(extra))] != -100).any()
    positions = torch.zeros_like(ids, dtype=torch.bool)
    positions[:, :10] = True
    _, labels = mask_tokens(
        ids, V, special_mask=positions, generator=torch.Generator().manual_seed(5)
    )
    assert (labels[:, :10] == -100).all() and (labels[:, 10:] != -100).any()
    a = mask_tokens(ids, V, generator=torch.Generator().manual_seed(9))
    b = mask_tokens(ids, V, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(NLMError):
        mask_tokens(ids, 7)


def make_documents(n_docs: int = 200, seed: int = 0) -> list[list[list[int]]]:
    """Sentence (d, s) starts with the ids 1000 + d, 7 + s, so a sentence names its place."""
    rng = random.Random(seed)
    return [
        [
            [1000 + d, 7 + s] + [rng.randrange(7, 900) for _ in range(rng.randrange(1, 12))]
            for s in range(rng.randrange(1, 9))
        ]
        for d in range(n_docs)
    ]


def split_row(row):
    ids, types = row["input_ids"], row["token_type_ids"]
    assert ids[0] == CLS_ID and ids[-1] == SEP_ID and len(types) == len(ids)
    first_sep = ids.index(SEP_ID)
    a, b = ids[1:first_sep], ids[first_sep + 1 : -1]
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return a, b


def test_nsp_pairs_are_balanced_and_true_pairs_consecutive():
    docs = make_documents()
    rows = make_nsp_pairs(docs, random.Random(0), max_length=512)
    expected = sum(len(d) - 1 for d in docs)
    assert len(rows) == expected > 500
    labels = [r["nsp_label"] for r in rows]
    assert sum(labels) / len(labels) == pytest.approx(0.5, abs=0.06)
    for row in rows:
        a, b = split_row(row)
        (doc_a, sent_a), (doc_b, sent_b) = (a[0] - 1000, a[1] - 7), (b[0] - 1000, b[1] - 7)
        assert a == docs[doc_a][sent_a] and b == docs[doc_b][sent_b]  # whole, untruncated
        if row["nsp_label"] == 0:
            assert (doc_b, sent_b) == (doc_a, sent_a + 1)
        else:
            assert doc_b != doc_a
    again = make_nsp_pairs(docs, random.Random(0), max_length=512)
    assert again == rows


def test_nsp_rows_are_truncated_to_max_length():
    docs = [[list(range(7, 70)), list(range(100, 130))], [list(range(200, 260))]]
    rows = make_nsp_pairs(docs, random.Random(1), max_length=32)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == 32
    a, b = split_row(rows[0])
    assert a == list(range(7, 7 + len(a)))  # trimmed from the end, the longer side first
    assert b[0] in (100, 200) and b == list(range(b[0], b[0] + len(b)))
    assert abs(len(a) - len(b)) <= 1
    with pytest.raises(NLMError):
        make_nsp_pairs(docs, random.Random(1), max_length=4)


def test_nsp_with_a_single_document_uses_true_pairs_only():
    rows = make_nsp_pairs([[[10, 11], [12], [13, 14]]], random.Random(0))
    assert [r["nsp_label"] for r in rows] == [0, 0]
    assert rows[0]["input_ids"] == [CLS_ID, 10, 11, SEP_ID, 12, SEP_ID]
