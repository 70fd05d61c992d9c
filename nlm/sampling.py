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
        # ...also when top_p underflows to 0 in the logits' dtype (1e-300 is 0 in float32, so
        # "0 >= top_p" would drop every token and sampling would fall to the last id): the
        # most likely token is kept whatever top_p is, which makes a tiny top_p greedy.
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of (B, V) `logits` -> (ids (B,) long, logprobs (B,) float).

    temperature=0 is greedy (argmax; top-k/top-p do not matter then). Otherwise row b takes the
    token where the cumulative probability passes uniforms[b] (inverse-CDF sampling). The
    uniforms come from `generator`, one per row in order, unless given: serving draws each
    row's from that request's own generator, then samples the whole batch in one call, and
    gets what `generate` gives that request alone with the same seed.
    """
    logits = logits.float()
    if temperature == 0:
        ids = logits.argmax(dim=-1)
    else:
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
        if uniforms is None:
            uniforms = torch.rand(len(probs), generator=generator, device=_device(generator))
        ids = inverse_cdf(probs, uniforms.to(probs.device))
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, None]).squeeze(-1)
    return ids, logprobs


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The first token of each row whose cumulative probability exceeds uniforms * row total
    (never a zero-probability token: its cumulative value equals its predecessor's)."""
    cdf = probs.cumsum(dim=-1)
    targets = (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    return ids.clamp_(max=probs.size(-1) - 1)


def _device(generator: torch.Generator | None) -> torch.device | None:
    return generator.device if generator is not None else None
