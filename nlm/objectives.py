"""Training objectives in plain torch/python: causal LM loss, BERT masking, NSP sentence pairs.

Special ids are fixed for every tokenizer (nlm/tokenizers/base.py):
<pad>=0 <unk>=1 <s>=2 </s>=3 [CLS]=4 [SEP]=5 [MASK]=6. Ids 0..6 are never masked or drawn as
random replacements (<unk> included: it is a placeholder, not a word to predict).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nlm.errors import NLMError
from nlm.models.base import IGNORE_INDEX

CLS_ID, SEP_ID, MASK_ID = 4, 5, 6
NUM_SPECIAL = 7  # ids 0..6


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (B, T, V) logits against (B, T) next tokens; -100 is ignored."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    special_mask: torch.Tensor | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption (Devlin et al. 2019, section 3.1) -> (masked_ids, mlm_labels).

    Each maskable token is chosen with probability `mask_prob`; a chosen token becomes [MASK]
    80% of the time, a random non-special token 10%, and stays unchanged 10%. Labels hold the
    original id at chosen positions and -100 elsewhere. Never chosen: ids 0..6 (pad and the
    other specials) and, if given, positions where `special_mask` is true or ids in the
    `special_mask` id list.
    """
    if vocab_size <= NUM_SPECIAL:
        raise NLMError(f"field 'vocab_size': {vocab_size} leaves no ordinary tokens to mask")
    protected = input_ids < NUM_SPECIAL
    if isinstance(special_mask, torch.Tensor):
        protected |= special_mask.to(torch.bool)
    elif special_mask is not None:
        protected |= torch.isin(
            input_ids, torch.tensor(list(special_mask), device=input_ids.device)
        )
    device = input_ids.device

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device)

    chosen = (uniform() < mask_prob) & ~protected
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # One draw splits the chosen tokens 80 / 10 / 10.
    split = uniform()
    to_mask = chosen & (split < 0.8)
    to_random = chosen & (split >= 0.8) & (split < 0.9)
    random_ids = torch.randint(
        NUM_SPECIAL,
        vocab_size,
        input_ids.shape,
        generator=generator,
        device=device,
        dtype=input_ids.dtype,
    )
    masked = torch.where(to_mask, torch.full_like(input_ids, MASK_ID), input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def make_nsp_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    rng: random.Random,
    max_length: int = 128,
    random_prob: float = 0.5,
) -> list[dict[str, list[int] | int]]:
    """Next-sentence-prediction rows from documents (-> sentences -> token ids).

    For every sentence A that has a successor in its document: with probability 1 - random_prob
    B is that successor (nsp_label 0 = IsNext), otherwise B is a random sentence of another
    document (nsp_label 1 = NotNext). Each row is
        {"input_ids": [CLS] A [SEP] B [SEP], "token_type_ids": 0 for [CLS] A [SEP], 1 for B [SEP],
         "nsp_label": 0 | 1}
    with the longer of A and B trimmed from its end until the row fits `max_length` (as BERT's
    `truncate_seq_pair`). Deterministic given the seeded `rng`; empty sentences are skipped.
    """
    if max_length < 5:
        raise NLMError(
            f"field 'max_length': must be >= 5 to hold [CLS] A [SEP] B [SEP], got {max_length}"
        )
    docs = [[list(s) for s in doc if len(s) > 0] for doc in documents]
    owners = [d for d, doc in enumerate(docs) if doc]  # documents that can supply a random B
    rows: list[dict[str, list[int] | int]] = []
    for d, doc in enumerate(docs):
        others = len(owners) - (1 if doc else 0)
        for i in range(len(doc) - 1):
            a = doc[i]
            if others > 0 and rng.random() < random_prob:
                other = d
                while other == d:
                    other = owners[rng.randrange(len(owners))]
                b, label = docs[other][rng.randrange(len(docs[other]))], 1
            else:
                b, label = doc[i + 1], 0
            a, b = _truncate_pair(a, b, max_length - 3)
            rows.append(
                {
                    "input_ids": [CLS_ID, *a, SEP_ID, *b, SEP_ID],
                    "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                    "nsp_label": label,
                }
            )
    return rows


def _truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    la, lb = len(a), len(b)
    while la + lb > budget:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return a[:la], b[:lb]


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: random.Random
) -> list[bool]:
    """T5's noise mask (Raffel et al. 2020, section 3.1.4; t5.data.preprocessors'
    `random_spans_noise_mask`): round(length · noise_density) noise tokens in
    round(noise / mean_span_length) spans, noise and kept segments of random lengths
    alternating, a kept segment first. `length` >= 2; True = dropped into the targets."""
    if length < 2:
        raise NLMError(f"span corruption needs at least 2 tokens, got {length}")
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_kept = length - num_noise
    num_spans = min(max(round(num_noise / mean_span_length), 1), num_noise, num_kept)

    def segments(total: int) -> list[int]:  # `total` items cut into num_spans non-empty runs
        cuts = sorted(rng.sample(range(1, total), num_spans - 1))
        bounds = [0, *cuts, total]
        return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]

    mask: list[bool] = []
    for kept, noise in zip(segments(num_kept), segments(num_noise), strict=True):
        mask += [False] * kept + [True] * noise
    return mask


def max_spans(length: int, noise_density: float, mean_span_length: float) -> int:
    """The most spans (so sentinels) `random_spans_noise_mask` cuts `length` tokens into."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    return min(max(round(num_noise / mean_span_length), 1), num_noise, length - num_noise)


def span_corrupt(
    ids: Sequence[int],
    first_sentinel: int,
    rng: random.Random,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    eos_id: int = 3,
) -> tuple[list[int], list[int]]:
    """T5's span corruption of one row -> (encoder input ids, decoder target ids).

    Each noise span (random_spans_noise_mask) is replaced in the input by one sentinel, the
    k-th span's being `first_sentinel + k`; the targets are each sentinel followed by the
    tokens it replaced. Both end with </s>:
        ids  a b c d e f g            input   a <S0> d e <S1> g </s>
        mask . x x . . x .            target  <S0> b c <S1> f </s>
    """
    mask = random_spans_noise_mask(len(ids), noise_density, mean_span_length, rng)
    inputs: list[int] = []
    targets: list[int] = []
    sentinel = first_sentinel - 1
    for i, (token, noise) in enumerate(zip(ids, mask, strict=True)):
        if noise and (i == 0 or not mask[i - 1]):  # a span starts: a new sentinel
            sentinel += 1
            inputs.append(sentinel)
            targets.append(sentinel)
        (targets if noise else inputs).append(int(token))
    return [*inputs, eos_id], [*targets, eos_id]
