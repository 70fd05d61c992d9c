"""Issue 14: security and input-fault hardening. One section per numbered item."""

from __future__ import annotations

import torch

from nlm.sampling import filter_logits, sample_next

# --- 10. a tiny top_p is greedy ----------------------------------------------------------------


def test_tiny_top_p_keeps_the_most_likely_token():
    """1e-300 is 0 in float32: the old filter dropped every token and sampled the last id."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    greedy = logits.argmax(dim=-1)
    for top_p in (1e-300, 1e-46, 5e-45, 1e-6):
        kept = filter_logits(logits, 1.0, None, top_p)
        assert torch.isfinite(kept).sum(dim=-1).tolist() == [1] * 6
        ids, logprobs = sample_next(logits, 1.0, None, top_p, generator=gen)
        assert torch.equal(ids, greedy), top_p
        assert torch.isfinite(logprobs).all()


def test_tiny_top_p_generate_equals_greedy():
    from nlm.models import build_model

    torch.manual_seed(0)
    model = build_model("gpt", "tiny", vocab_size=40).eval()
    prompt = torch.randint(7, 40, (2, 5))
    greedy = model.generate(prompt, 6, temperature=0)
    tiny = model.generate(prompt, 6, top_p=1e-300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny[0], greedy[0])

