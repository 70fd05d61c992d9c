"""nlm.completions on tiny checkpoints, without Ray: prompts as text or ids, choices with a
seed each, alternatives recorded during streaming generation, echo scoring and stop strings."""

from __future__ import annotations

import pytest
import torch
from test_inference import TEXTS

from nlm.checkpoint import load_checkpoint
from nlm.completions import (
    ChoiceText,
    ChunkBatcher,
    StreamingGeneration,
    choice_jobs,
    continuation_text,
    encode_prompt,
    prompt_logprobs,
)
from nlm.inference import Engine, RequestError, causal_token_logprobs
from nlm.tokenizers.base import EOS_ID


@pytest.fixture(scope="module")
def engine(tiny_checkpoints) -> Engine:
    return Engine(load_checkpoint(tiny_checkpoints["gpt"]))


def run(engine: Engine, jobs: list) -> tuple[dict, StreamingGeneration, list[dict]]:
    generation = StreamingGeneration(engine.model)
    generation.add(jobs, list(range(len(jobs))))
    results, snapshots = {}, []
    while generation:
        for key, result in generation.step():
            results[key] = (result, generation.forget(key)[0])
        snapshots.append({k: list(v[0]) for k, v in generation.progress().items()})
    return results, generation, snapshots


def test_prompts_as_text_or_ids(engine):
    ids = encode_prompt(engine, TEXTS[1])
    assert ids == engine.tokenizer.encode(TEXTS[1])
    assert encode_prompt(engine, ids) == ids
    assert encode_prompt(engine, [EOS_ID, *ids]) == ids  # the boundary is not doubled
    assert encode_prompt(engine, "</s> " + TEXTS[1]) == ids
    with pytest.raises(RequestError, match="token id 999999 is outside"):
        encode_prompt(engine, [1, 999999])
    with pytest.raises(RequestError, match="empty prompt"):
        encode_prompt(engine, "   ")


def test_choices_seeded_alternatives_and_progress(engine):
    ids = encode_prompt(engine, TEXTS[0])
    jobs = choice_jobs(engine, ids, 3, 12, 1.0, None, None, 7, 5, [])
    assert [j.seed for j in jobs] == [7, 8, 9]
    results, _, snapshots = run(engine, jobs)
    again, _, _ = run(engine, choice_jobs(engine, ids, 3, 12, 1.0, None, None, 7, 5, []))
    for key, ((new_ids, lps, _), alts) in results.items():
        assert again[key][0][0] == new_ids  # seeded: reproducible
        assert len(alts) == len(new_ids) and all(len(a) == 5 for a in alts)
        for token, lp, top in zip(new_ids, lps, alts, strict=True):
            assert top[0][1] >= lp - 1e-5  # the best alternative is at least as likely
            found = dict(top).get(token)
            assert found is None or abs(found - lp) < 1e-4
    # Progress between steps is a growing prefix of the final answer.
    for snap in snapshots:
        for key, got in snap.items():
            assert results[key][0][0][: len(got)] == got


def test_greedy_alternatives_are_the_chosen_token(engine):
    ids = encode_prompt(engine, TEXTS[2])
    jobs = choice_jobs(engine, ids, 1, 8, 0.0, None, None, 1, 1, [])
    results, _, _ = run(engine, jobs)
    (new_ids, lps, _), alts = results[0]
    assert [a[0][0] for a in alts] == new_ids
    assert all(abs(a[0][1] - lp) < 1e-4 for a, lp in zip(alts, lps, strict=True))


def test_echo_logprobs_are_the_models_own(engine):
    prompts = [encode_prompt(engine, t) for t in TEXTS[:3]]
    scored = prompt_logprobs(engine, prompts, 2)
    reference = causal_token_logprobs(engine.model, [[EOS_ID, *p] for p in prompts])
    for (chosen, top), ref, p in zip(scored, reference, prompts, strict=True):
        assert len(chosen) == len(top) == len(p)
        assert torch.allclose(torch.tensor(chosen), ref, atol=1e-4)
        assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)


def test_stop_strings_cut_and_stream_equals_final(engine):
    ids = encode_prompt(engine, TEXTS[0])
    (job,) = choice_jobs(engine, ids, 1, 30, 1.0, None, None, 3, None, [])
    results, _, _ = run(engine, [job])
    new_ids = results[0][0][0]
    full = continuation_text(engine, ids[-8:], new_ids)
    words = full.split()
    assert len(words) >= 4
    stop = " " + words[3]
    text = ChoiceText(engine, [stop])
    streamed = "".join(text.update(new_ids[:n], False, ids[-8:]) for n in range(1, len(new_ids)))
    streamed += text.update(new_ids, True, ids[-8:])
    assert text.stopped
    assert streamed == text.text == full[: full.index(stop)]
    assert stop not in streamed
    assert continuation_text(engine, ids[-8:], new_ids[: text.tokens]) == text.text
    plain = ChoiceText(engine, [])
    pieces = [plain.update(new_ids[:n], False, ids[-8:]) for n in range(1, len(new_ids) + 1)]
    assert "".join(pieces) + plain.update(new_ids, True, ids[-8:]) == full


def test_chunk_batcher_groups_in_time_and_loses_nothing():
    """First and last chunks go out at once, those between at most every interval, merged
    exactly (texts joined, logprobs lists extended); interval 0 sends every step."""
    now = [0.0]
    batcher = ChunkBatcher(0.05, clock=lambda: now[0])

    def lp(i: int) -> dict[str, list]:
        return {
            "tokens": [f"t{i}"],
            "token_logprobs": [-i],
            "top_logprobs": [None],
            "text_offset": [i],
        }

    sent = []
    for step in range(10):  # two choices, one token each per 10 ms step
        now[0] = step * 0.01
        for choice in (0, 1):
            finish = "length" if step == 9 else None
            due = batcher.add(choice, f"{step} ", lp(step), finish)
            if due is not None:
                sent.append((choice, now[0], *due))
    for choice in (0, 1):
        mine = [s for s in sent if s[0] == choice]
        assert "".join(s[2] for s in mine) == "".join(f"{i} " for i in range(10))
        assert [t for s in mine for t in s[3]["tokens"]] == [f"t{i}" for i in range(10)]
        assert [t for s in mine for t in s[3]["token_logprobs"]] == [-i for i in range(10)]
        assert mine[0][1] == 0.0 and mine[0][2] == "0 "  # the first token at once
        assert mine[-1][4] == "length" and mine[-1][1] == pytest.approx(0.09)  # the last at once
        times = [s[1] for s in mine[1:-1]]
        assert all(b - a >= 0.05 - 1e-9 for a, b in zip([0.0, *times], times, strict=False))
        assert len(mine) < 10  # grouped
    every = ChunkBatcher(0.0, clock=lambda: 0.0)
    assert all(every.add(0, "x", None, None) == ("x", None, None) for _ in range(5))
