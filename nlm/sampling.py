"""Choosing the next token from a model's logits: greedy, temperature, top-k, top-p (nucleus).

Shared by every causal model's `generate` (nlm/models/base.py). The log-probability reported for
a chosen token is always the model's own: log-softmax of the raw logits at temperature 1, so it
does not depend on how the token was sampled (serving reports it; tests compare it with a full
forward pass).
"""

from __future__ import annotations

import torch

from nlm.errors import NLMError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise NLMError(f"field 'temperature': must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise NLMError(f"field 'top_k': must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise NLMError(f"field 'top_p': must be in (0, 1], got {top_p}")


def filter_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """(B, V) logits scaled by 1/temperature with everything outside top-k / top-p set to -inf."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) `logits` -> (ids (B,) long, logprobs (B,) float).

    temperature=0 is greedy (argmax; top-k/top-p do not matter then).
    """
    logits = logits.float()
    if temperature == 0:
        ids = logits.argmax(dim=-1)
    else:
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        if generator is not None and generator.device != probs.device:
            # A CPU generator (serving seeds one per request) with a GPU model: draw on the CPU.
            ids = torch.multinomial(probs.cpu(), 1, generator=generator).to(probs.device)
        else:
            ids = torch.multinomial(probs, 1, generator=generator)
        ids = ids.squeeze(-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    return ids, logprobs
