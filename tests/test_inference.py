"""nlm.inference: batched score / generate / embed / fill-mask give the answers of one input at a
time, and bad input is refused with a code. Plain PyTorch, tiny models, no Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nlm.checkpoint import load_checkpoint, save_checkpoint
from nlm.inference import Engine, Limits, RequestError, next_slice
from nlm.models import build_model
from nlm.tokenizers import train_tokenizer
from nlm.tokenizers.base import EOS_ID, MASK_ID, SPECIAL_TOKENS

FAMILIES = ("fnn", "rnn", "lstm", "gpt", "bert")
CAUSAL = ("fnn", "rnn", "lstm", "gpt")
TEXTS = [
    "the lobster is blue",
    "It is closely related to the American lobster , H. americanus .",
    "In life , the lobsters are blue",
]


def build_tiny_checkpoints(root: Path, data_mirror: Path) -> dict[str, Path]:
    """One untrained tiny checkpoint per family, sharing a word tokenizer (test fixture)."""
    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer("word", lines[:400], vocab_size=256)
    paths = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        model = build_model(family, "tiny", vocab_size=256)
        metrics = {"test_ppl": 250.0 + i, "test_bits_per_byte": 2.0 + i}
        paths[family] = save_checkpoint(root / family, model, tokenizer, metrics=metrics)
    return paths


@pytest.fixture(scope="module")
def engines(tiny_checkpoints) -> dict[str, Engine]:
    return {f: Engine(load_checkpoint(p)) for f, p in tiny_checkpoints.items()}


def close(a: list[float], b: list[float], tol: float = 1e-4) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_score_batched_equals_one_at_a_time(engines, family):
    engine = engines[family]
    jobs = [engine.score_job(t) for t in TEXTS]
    together = engine.score(jobs)
    alone = [engine.score([j])[0] for j in jobs]
    for a, b in zip(together, alone, strict=True):
        assert a["num_tokens"] == b["num_tokens"] > 0
        assert abs(a["logprob"] - b["logprob"]) < 1e-3
        assert a["ppl"] == pytest.approx(math.exp(-a["logprob"] / a["num_tokens"]))
        if family == "bert":  # a pseudo-log-likelihood is no probability of the text
            assert a["bits_per_byte"] is None and a["bits_per_byte_closed_vocab"] is None
            continue
        closed = -a["logprob"] / math.log(2) / a["num_bytes"]
        assert a["bits_per_byte_closed_vocab"] == pytest.approx(closed)
        assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"])
    expected = "pseudo-log-likelihood" if family == "bert" else "log-likelihood"
    assert {r["measure"] for r in together} == {expected}


def test_score_charges_each_unk_its_spelling(engines):
    """A word outside the 256-word vocabulary is one <unk> for the model; the open-vocabulary
    bits/byte adds its spelling under the tokenizer's character model, the closed one not."""
    engine = engines["gpt"]
    tokenizer = engine.tokenizer
    text = "the lobster is blue"
    unknown = [w for w in text.split() if tokenizer.token_to_id(w) is None]
    assert unknown and "the" not in unknown
    job = engine.score_job(text)
    answer = engine.score([job])[0]
    assert answer["unk_tokens"] == len(unknown)
    assert answer["unk_bytes"] == sum(len(w.encode()) for w in unknown)
    spelling = sum(tokenizer.spelling.bits(w) for w in unknown)
    assert spelling > 8 * len(unknown)  # several letters each: bits, not a token's price
    assert answer["bits_per_byte"] == pytest.approx(
        answer["bits_per_byte_closed_vocab"] + spelling / answer["num_bytes"]
    )


def test_causal_score_is_the_models_own_log_likelihood(engines):
    engine = engines["gpt"]
    job = engine.score_job(TEXTS[1])
    with torch.no_grad():
        logits = engine.model(torch.tensor([job.ids])).logits[0]
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(job.ids[1:])[:, None])
    assert engine.score([job])[0]["logprob"] == pytest.approx(float(logp.sum()), abs=1e-4)
    assert job.ids[0] == EOS_ID  # the text is read as the start of a document


def test_bert_pseudo_log_likelihood_masks_one_token_at_a_time(engines):
    engine = engines["bert"]
    job = engine.score_job(TEXTS[0])
    expected = 0.0
    with torch.no_grad():
        for pos in range(1, len(job.ids) - 1):
            masked = list(job.ids)
            masked[pos] = MASK_ID
            logits = engine.model(torch.tensor([masked])).logits[0, pos]
            expected += float(torch.log_softmax(logits, -1)[job.ids[pos]])
    assert engine.score([job])[0]["logprob"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_batched_equals_one_at_a_time(engines, family):
    engine = engines[family]
    jobs = [engine.embed_job(t) for t in TEXTS]
    together = engine.embed(jobs)
    for vector, job in zip(together, jobs, strict=True):
        assert close(vector, engine.embed([job])[0], 1e-5)
    assert len({len(v) for v in together}) == 1
    assert together[0] != together[1]


@pytest.mark.parametrize("family", CAUSAL)
def test_generation_is_per_request_whatever_the_batch(engines, family):
    engine = engines[family]
    jobs = [
        engine.generation_job("the lobster", 6, temperature=1.0, seed=11),
        engine.generation_job(TEXTS[1], 9, temperature=0.7, top_k=20, seed=12),
        engine.generation_job("In life", 4, temperature=0.0),
        engine.generation_job("blue", 7, temperature=1.3, top_p=0.9, seed=13, stop_at_eos=False),
    ]
    together = engine.generate(jobs)
    for job, answer in zip(jobs, together, strict=True):
        alone = engine.generate([job])[0]
        assert answer["token_ids"] == alone["token_ids"]
        assert close(answer["logprobs"], alone["logprobs"])
        assert all(lp <= 0 for lp in answer["logprobs"])
        if answer["finish_reason"] == "length":
            assert len(answer["token_ids"]) == job.max_new_tokens
        # ... and what the model's own generate() gives for that prompt and seed alone
        new_ids, logprobs = engine.model.generate(
            torch.tensor([job.ids]),
            len(answer["token_ids"]),
            temperature=job.temperature,
            top_k=job.top_k,
            top_p=job.top_p,
            generator=torch.Generator().manual_seed(job.seed),
        )
        assert new_ids[0].tolist() == answer["token_ids"]
        assert close(logprobs[0].tolist(), answer["logprobs"])


@pytest.mark.parametrize("family", CAUSAL)
def test_rows_joining_and_leaving_a_running_generation_answer_as_alone(engines, family):
    """Continuous batching: jobs join between steps (left-padded to the running cache) and
    finished rows leave it; every answer is still the one the job gets alone."""
    engine = engines[family]
    jobs = [
        engine.generation_job("the lobster", 5, temperature=1.0, seed=1),
        engine.generation_job(TEXTS[1], 12, temperature=0.8, top_k=30, seed=2),
        engine.generation_job("In", 9, temperature=0.0),
        engine.generation_job(TEXTS[2], 7, temperature=1.2, top_p=0.9, seed=3, stop_at_eos=False),
        engine.generation_job("blue", 3, temperature=1.0, seed=4, stop_at_eos=False),
        engine.generation_job("It is", 6, temperature=1.0, seed=5),
    ]
    generation = engine.continuous_generation()
    results, sizes = {}, []
    joins = {0: [0, 1], 2: [2], 4: [3, 4], 9: [5]}  # step -> jobs joining before it
    step = 0
    while generation or step <= max(joins):
        if step in joins:
            generation.add([jobs[i] for i in joins[step]], joins[step])
        sizes.append(len(generation))
        results.update(generation.step())
        step += 1
    assert sorted(results) == list(range(len(jobs)))
    assert max(sizes) >= 4  # rows really ran together
    for i, job in enumerate(jobs):
        alone = engine.generate([job])[0]
        answer = engine.generation_answer(job, results[i])
        assert answer["token_ids"] == alone["token_ids"], f"job {i}"
        assert close(answer["logprobs"], alone["logprobs"])
        assert answer["finish_reason"] == alone["finish_reason"]


def test_dropped_rows_leave_the_others_untouched(engines):
    engine = engines["gpt"]
    jobs = [engine.generation_job(t, 8, seed=i, stop_at_eos=False) for i, t in enumerate(TEXTS)]
    generation = engine.continuous_generation()
    generation.add(jobs, ["a", "b", "c"])
    generation.step()
    generation.drop({"b"})
    results = {}
    while generation:
        results.update(generation.step())
    assert sorted(results) == ["a", "c"]
    for key, job in (("a", jobs[0]), ("c", jobs[2])):
        assert results[key][0] == engine.generate([job])[0]["token_ids"]


def test_admission_respects_row_and_memory_limits(engines):
    engine = engines["gpt"]
    jobs = [engine.generation_job("the lobster", 8) for _ in range(5)]
    assert engine.admissible(0, jobs) == 5
    assert engine.admissible(engine.limits.max_rows - 2, jobs) == 2
    assert engine.admissible(engine.limits.max_rows, jobs) == 0
    width = len(jobs[0].ids) + 8
    tight = Engine(engine.checkpoint, Limits(max_logit_elements=3 * width * 256))
    assert tight.admissible(0, jobs) == 3
    big = Limits(max_logit_elements=1)  # one job alone is always admitted into an empty batch
    assert Engine(engine.checkpoint, big).admissible(0, jobs) == 1


def test_compute_cost_counts_passes_and_the_budget_refuses(engines):
    bert, gpt = engines["bert"], engines["gpt"]
    job = bert.score_job(TEXTS[1])  # [CLS] + 12 tokens + [SEP]: 12 masked copies of 14
    assert bert.cost(job) == 12 * 14 and bert.cost(bert.embed_job(TEXTS[1])) == 14
    assert gpt.cost(gpt.score_job(TEXTS[1])) == 13
    assert gpt.cost(gpt.generation_job("the lobster", 8)) == 3 + 8
    tight = Engine(bert.checkpoint, Limits(max_request_cost=2 * 12 * 14))
    tight.check_budget([job, job])  # at the limit: fine
    with pytest.raises(RequestError) as err:
        tight.check_budget([job, job, job])
    assert err.value.code == "over_budget" and err.value.status == 400
    assert str(3 * 12 * 14) in str(err.value) and str(2 * 12 * 14) in str(err.value)


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_sliced_work_stays_within_the_slice_and_answers_the_same(engines, family):
    engine = engines[family]
    sliced = Engine(engine.checkpoint, Limits(max_slice_cost=32))
    jobs = [engine.score_job(t) for t in TEXTS]
    work, costs = sliced.score_slices(jobs), []
    while True:
        done, value = next_slice(work)
        if done:
            break
        costs.append(value)
    longest = max(len(j.ids) for j in jobs)
    assert len(costs) > 1 and all(c <= max(32, longest) for c in costs)
    if family == "bert":  # one masked copy per text token
        assert len(costs) >= sum(len(j.ids) - 2 for j in jobs) // (32 // longest or 1) // 2
    for a, b in zip(value, engine.score(jobs), strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


def test_cache_bytes_are_measured_per_family(engines):
    gpt, lstm = engines["gpt"], engines["lstm"]
    config = gpt.model.config
    per_position = config.n_layer * 2 * config.n_embd * 4  # keys and values, float32
    assert gpt.cache_bytes(1, 11) - gpt.cache_bytes(1, 10) == per_position
    assert gpt.cache_bytes(3, 10) == 3 * gpt.cache_bytes(1, 10)
    assert lstm.cache_bytes(1, 500) == lstm.cache_bytes(1, 5) > 0  # a state, whatever the length


def test_admission_respects_the_cache_budget(engines):
    engine = engines["gpt"]
    jobs = [engine.generation_job("the lobster", 8) for _ in range(5)]
    width = len(jobs[0].ids) + 8
    tight = Engine(engine.checkpoint, Limits(max_cache_bytes=engine.cache_bytes(3, width)))
    assert tight.admissible(0, jobs) == 3
    assert tight.admissible(2, jobs, jobs[:2]) == 1
    assert tight.admissible(3, jobs, jobs[:3]) == 0
    longer = engine.generation_job("the lobster", 40)
    with pytest.raises(RequestError) as err:  # it alone needs more than the budget
        tight.check_budget([longer])
    assert err.value.code == "over_budget" and "cache" in str(err.value)


def test_seed_reproduces_and_differs(engines):
    engine = engines["lstm"]
    first = engine.generate([engine.generation_job("the lobster", 12, seed=5)])[0]
    again = engine.generate([engine.generation_job("the lobster", 12, seed=5)])[0]
    other = engine.generate([engine.generation_job("the lobster", 12, seed=6)])[0]
    unseeded = engine.generation_job("the lobster", 12)
    assert first["token_ids"] == again["token_ids"]
    assert first["token_ids"] != other["token_ids"]
    assert first["seed"] == 5 and isinstance(unseeded.seed, int)


def test_chunking_changes_nothing(engines):
    engine = engines["gpt"]
    small = Engine(engine.checkpoint, Limits(max_rows=2, max_logit_elements=1))
    jobs = [engine.score_job(t) for t in TEXTS * 2]
    for a, b in zip(engine.score(jobs), small.score(jobs), strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


def test_fill_mask_candidates(engines):
    engine = engines["bert"]
    answer = engine.fill_mask([engine.fill_mask_job("the [MASK] is [MASK] .", 4)])[0]
    assert [m["position"] for m in answer["masks"]] == [0, 1]
    for mask in answer["masks"]:
        probs = [c["prob"] for c in mask["candidates"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True)
        assert all(c["token_id"] >= len(SPECIAL_TOKENS) for c in mask["candidates"])
        assert all(
            c["token"] == engine.tokenizer.id_to_token(c["token_id"]) for c in mask["candidates"]
        )


def test_neighbors_use_the_study_helpers(engines):
    found = engines["fnn"].neighbors("lobster", 3)
    assert len(found) == 3 and all(-1 <= n["cosine"] <= 1 for n in found)
    assert "lobster" not in [n["token"] for n in found]


def test_neighbors_build_the_unit_table_once_per_engine(engines):
    from nlm.wordvectors import neighbors

    engine = engines["lstm"]
    first = engine.neighbors("lobster", 4)
    table = engine._unit_vectors
    assert table is not None and table.dtype == torch.float32
    assert engine.neighbors("the", 4) and engine._unit_vectors is table  # not rebuilt
    expected = neighbors(engine.model, engine.tokenizer, "lobster", k=4)
    assert [n["token"] for n in first] == [t for t, _ in expected]
    assert [n["cosine"] for n in first] == pytest.approx([c for _, c in expected], abs=1e-5)


@pytest.mark.parametrize(
    ("family", "call", "code"),
    [
        ("gpt", lambda e: e.score_job(""), "empty_input"),
        ("gpt", lambda e: e.score_job("   "), "empty_input"),
        ("gpt", lambda e: e.score_job("lobster " * 100), "input_too_long"),  # block size 64
        ("bert", lambda e: e.embed_job("x " * 10_000), "input_too_long"),
        ("gpt", lambda e: e.generation_job("a", 10_000), "too_many_tokens"),
        ("gpt", lambda e: e.generation_job("the lobster", 63), "too_many_tokens"),  # + prompt > 64
        ("lstm", lambda e: e.generation_job("a", 5, temperature=-1), "invalid_request"),
        ("bert", lambda e: e.generation_job("a", 5), "wrong_family"),
        ("gpt", lambda e: e.fill_mask_job("a [MASK]", 5), "wrong_family"),
        ("bert", lambda e: e.fill_mask_job("no mask here", 5), "no_mask"),
        ("fnn", lambda e: e.neighbors("qwertyuiop", 3), "unknown_word"),
        ("fnn", lambda e: e.neighbors("lobster", 100_000), "bad_request"),
    ],
)
def test_bad_input_has_a_code(engines, family, call, code):
    with pytest.raises(RequestError) as err:
        call(engines[family])
    assert err.value.code == code and 400 <= err.value.status < 500 and str(err.value)


def test_tiny_temperature_is_greedy(engines):
    engine = engines["rnn"]
    cold = engine.generate([engine.generation_job("the lobster", 5, temperature=1e-30, seed=1)])[0]
    greedy = engine.generate([engine.generation_job("the lobster", 5, temperature=0.0)])[0]
    assert cold["token_ids"] == greedy["token_ids"]
