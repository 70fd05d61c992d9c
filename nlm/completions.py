"""OpenAI-style completions on top of nlm.inference (plain PyTorch): prompts as text or token
ids, `n` choices with a seed each, stop strings, echo with the prompt's own log-probs, top-k
alternatives per position, and per-token streaming out of the continuous generation.

Serving (nlm.serve.openai_api, nlm.serve.deployments) uses these pieces; nothing here knows
about HTTP. The layout follows OpenAI's legacy Completions API
(https://platform.openai.com/docs/api-reference/completions): `logprobs` is
{tokens, token_logprobs, top_logprobs, text_offset}, one entry per token of the answer's text
(the prompt's tokens first when `echo`).

Batching never changes an answer here either: a choice is one `GenerationJob` row of the
continuous generation with its own seed, and its alternatives are read from its own row of the
logits before each step.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from nlm.errors import NLMError
from nlm.inference import (
    MIN_TEMPERATURE,
    ContinuousGeneration,
    Engine,
    Generated,
    GenerationJob,
    RequestError,
    pad_right,
)
from nlm.sampling import check_sampling_args
from nlm.tokenizers.base import EOS_ID

MAX_TOP_LOGPROBS = 20  # OpenAI's own cap on `logprobs`
Alternatives = list[tuple[int, float]]  # (token id, log-prob) best first


@dataclasses.dataclass
class ChoiceJob(GenerationJob):
    """One choice of a completion: a generation row plus what its answer needs.

    `ids` is [</s>] + prompt tokens as for every generation; `prompt_ids` are the prompt's own
    tokens (what echo returns). `stop` strings end the choice before them (finish "stop").
    """

    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: bool = False  # the answer lists log-probs (then also the </s> that ends it)
    top_logprobs: int = 0  # alternatives per generated position (0: none)
    stop: tuple[str, ...] = ()
    sink: Any = None  # serving: where each step's progress goes (an asyncio.Queue)
    queued_at: float = 0.0  # serving: when the row was queued to join (time.monotonic)
    admitted_at: float | None = None  # when it joined the decode batch
    final_alternatives: list[Alternatives] = dataclasses.field(default_factory=list)
    final_eos: tuple[float, Alternatives] | None = None


def encode_prompt(engine: Engine, prompt: str | list[int], field: str = "prompt") -> list[int]:
    """A prompt's token ids: text is tokenized (checked as every nlm input is), ids are checked
    against the vocabulary. A leading </s> (text or id) is the document boundary every causal
    prompt gets anyway, so it is dropped here rather than doubled.

    Raises RequestError (400 input_too_long / empty_input / invalid_token) naming `field`.
    """
    if isinstance(prompt, str):
        if len(prompt) > 64 * engine.max_text_tokens + 1024:  # refused before tokenizing it
            raise RequestError(
                "input_too_long",
                f"field '{field}': input too long ({len(prompt)} characters; this model takes "
                f"at most {engine.max_text_tokens} tokens)",
            )
        ids = engine.tokenizer.encode(prompt) if prompt.strip() else []
        if not ids:
            raise RequestError("empty_input", f"field '{field}': empty prompt")
    else:
        ids = list(prompt)
        vocab = engine.tokenizer.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise RequestError(
                "invalid_token",
                f"field '{field}': token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})",
            )
    if ids and ids[0] == EOS_ID:
        ids = ids[1:]
    if len(ids) > engine.max_text_tokens:
        raise RequestError(
            "input_too_long",
            f"field '{field}': input too long ({len(ids)} tokens; this model takes at most "
            f"{engine.max_text_tokens} tokens)",
        )
    return ids


def choice_jobs(
    engine: Engine,
    prompt_ids: list[int],
    n: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    logprobs: int | None,
    stop: Sequence[str],
    stop_at_eos: bool = True,
) -> list[ChoiceJob]:
    """The `n` choices of one prompt. Choice i samples with seed + i (so a seeded request is
    reproducible and its choices differ); without a seed each draws its own.

    max_tokens 0 is allowed (echo-only scoring); the jobs then never join a generation.
    """
    limit = engine.limits.max_new_tokens
    if max_tokens > limit:
        raise RequestError(
            "too_many_tokens",
            f"field 'max_tokens': {max_tokens} new tokens requested, the limit is {limit}",
        )
    if engine.max_positions and 1 + len(prompt_ids) + max_tokens > engine.max_positions:
        raise RequestError(
            "too_many_tokens",
            f"field 'max_tokens': prompt ({len(prompt_ids) + 1} tokens with the document "
            f"boundary) plus {max_tokens} new tokens exceeds this model's "
            f"{engine.max_positions} positions",
        )
    try:
        check_sampling_args(temperature, top_k, top_p)
    except NLMError as exc:
        raise RequestError("invalid_request", str(exc)) from None
    if temperature < MIN_TEMPERATURE:
        temperature = 0.0  # as Engine.generation_job: anything this cold is greedy
    jobs = []
    for i in range(n):
        own = seed + i if seed is not None else random.SystemRandom().randrange(2**63)
        jobs.append(
            ChoiceJob(
                ids=engine.prompt_ids(list(prompt_ids)),
                max_new_tokens=max_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=None if top_p is None or top_p >= 1.0 else top_p,
                seed=own % 2**63,
                stop_at_eos=stop_at_eos,
                prompt_ids=list(prompt_ids),
                logprobs=logprobs is not None,
                top_logprobs=logprobs or 0,
                stop=tuple(s for s in stop if s),
            )
        )
    return jobs


def alternatives(logits: torch.Tensor, k: int) -> list[Alternatives]:
    """(B, V) next-token logits -> per row the k most likely (id, log-prob) at temperature 1."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)
    return [
        list(zip(r_ids, r_vals, strict=True))
        for r_ids, r_vals in zip(ids.tolist(), values.tolist(), strict=True)
    ]


@torch.inference_mode()
def prompt_logprobs(
    engine: Engine, prompts: Sequence[list[int]], k: int
) -> list[tuple[list[float], list[Alternatives]]]:
    """For each prompt (its own tokens), log p(token | </s>, tokens before) of every token and
    the k best alternatives at each position: one right-padded forward pass per chunk."""
    out = []
    step = max(1, engine.limits.max_rows)
    for start in range(0, len(prompts), step):
        group = [[EOS_ID, *p] for p in prompts[start : start + step]]
        ids, _ = pad_right(group)
        logits = engine.model(ids).logits.float()
        for row, seq in enumerate(group):
            n = len(seq) - 1
            logp = torch.log_softmax(logits[row, :n], dim=-1)
            chosen = logp.gather(-1, ids[row, 1 : n + 1, None]).squeeze(-1).tolist()
            top = alternatives(logits[row, :n], k) if k else [[] for _ in range(n)]
            out.append((chosen, top))
    return out


class StreamingGeneration(ContinuousGeneration):
    """A `ContinuousGeneration` that also records, per row, the top-k alternatives of every
    token it samples (rows whose job asks for them) and exposes each row's progress between
    steps, so a server can stream tokens as they are decoded."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.alternatives: dict[Any, list[Alternatives]] = {}
        # Rows that ended at </s>: its log-prob and alternatives (OpenAI-style logprobs list
        # the end token, as vLLM's do; lm-evaluation-harness counts on one token after echo).
        self.ended_at_eos: dict[Any, tuple[float, Alternatives]] = {}

    def add(self, jobs: Sequence[GenerationJob], keys: Sequence[Any] | None = None) -> None:
        super().add(jobs, keys)
        now = time.monotonic()
        for job in jobs:
            if isinstance(job, ChoiceJob):
                job.admitted_at = now

    def drop(self, keys: set[Any]) -> None:
        super().drop(keys)
        for key in keys:
            self.alternatives.pop(key, None)

    def step(self) -> list[tuple[Any, Generated]]:
        wanted = [(i, r) for i, r in enumerate(self.rows) if getattr(r.job, "logprobs", False)]
        before = {r.key: len(r.new_ids) for r in self.rows}
        pending: dict[Any, tuple[float, Alternatives]] = {}
        if wanted:
            index = torch.tensor([i for i, _ in wanted])
            logits = self.logits[index].float()
            eos = (logits[:, EOS_ID] - torch.logsumexp(logits, dim=-1)).tolist()
            k = max(r.job.top_logprobs for _, r in wanted)
            alts = alternatives(logits, k) if k else [[] for _ in wanted]
            for (_, row), lp, top in zip(wanted, eos, alts, strict=True):
                pending[row.key] = (lp, top[: row.job.top_logprobs])
        finished = super().step()
        grown = {r.key: len(r.new_ids) for r in self.rows}
        grown.update({key: len(result[0]) for key, result in finished})
        ended = {key for key, result in finished if result[2]}
        for key, (eos_lp, alts) in pending.items():
            if grown.get(key, 0) > before.get(key, 0):
                self.alternatives.setdefault(key, []).append(alts)
            elif key in ended:  # </s> ended the row: not returned, but its log-prob is kept
                self.ended_at_eos[key] = (eos_lp, alts)
        return finished

    def progress(self) -> dict[Any, tuple[list[int], list[float]]]:
        """Key -> (new ids, their log-probs) of every row still running."""
        return {r.key: (r.new_ids, r.logprobs) for r in self.rows}

    def forget(self, key: Any) -> tuple[list[Alternatives], tuple[float, Alternatives] | None]:
        """A finished row's alternatives and, when </s> ended it, that token's (log-prob,
        alternatives); neither is kept any longer."""
        return self.alternatives.pop(key, []), self.ended_at_eos.pop(key, None)


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


class ChoiceText:
    """Text of one choice as its tokens arrive: what may be sent now, and whether a stop
    string ended it. Text that could still become the start of a stop string is held back."""

    def __init__(self, engine: Engine, stop: Sequence[str]) -> None:
        self.engine = engine
        self.stop = [s for s in stop if s]
        self.sent = 0  # characters of `text` already handed out
        self.text = ""
        self.tokens = 0  # tokens whose text is final (all of them unless a stop cut them)
        self.stopped = False

    def update(self, ids: list[int], final: bool, prefix: Sequence[int] = ()) -> str:
        """All new ids so far -> the new text that can be handed out now. `prefix` (the end
        of the prompt) is decoded before them and cut off again, so the first word gets the
        space that separates it from the prompt."""
        if self.stopped:
            return ""
        text = continuation_text(self.engine, prefix, ids)
        cut = cut_at_stop(text, self.stop)
        self.tokens = len(ids)
        if cut is not None:
            self.stopped, final = True, True
            text = text[:cut]
            # Keep the tokens whose text lies before the stop string.
            while (
                self.tokens
                and len(continuation_text(self.engine, prefix, ids[: self.tokens])) > cut
            ):
                self.tokens -= 1
        self.text = text
        ready = len(text) if final else len(text) - self._held(text)
        delta = text[self.sent : ready] if ready > self.sent else ""
        self.sent += len(delta)
        return delta

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that may be the start of a stop string."""
        held = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    held = max(held, n)
                    break
        return held


def continuation_text(engine: Engine, prefix: Sequence[int], ids: Sequence[int]) -> str:
    """The text `ids` add after `prefix` (special tokens left out)."""
    decode = engine.tokenizer.decode
    if not prefix:
        return decode(list(ids), skip_special=True)
    head = decode(list(prefix), skip_special=True)
    return decode([*prefix, *ids], skip_special=True)[len(head) :]


def offsets(
    engine: Engine,
    prefix: Sequence[int],
    ids: Sequence[int],
    start: int,
    end: int,
    base: int,
    special: bool = False,
) -> list[int]:
    """OpenAI's `text_offset` of ids[start:end]: where each token's text starts, counted in
    characters from the choice text's start (`base` characters precede the continuation)."""
    if special:  # echoed prompts keep their special tokens in the text
        decode = engine.tokenizer.decode
        return [base + len(decode(list(ids[:j]), skip_special=False)) for j in range(start, end)]
    return [base + len(continuation_text(engine, prefix, ids[:j])) for j in range(start, end)]


class ChunkBatcher:
    """Streamed chunks grouped in time: each choice's first chunk and its last go out at once,
    the ones between at most every `interval_s` seconds, merged (Ray Serve LLM's
    `stream_batching_interval_ms`; per-token Ray objects are what makes Serve streaming slow
    at high concurrency, ray-project/ray#52745). Merging is exact: the texts are concatenated
    and the `logprobs` lists extended, so the client reads the same answer in fewer events.

    `add(choice, text, logprobs, finish)` takes one step's delta and returns the (text,
    logprobs, finish) to send now, or None while it waits. `clock`: seconds, monotonic.
    """

    def __init__(self, interval_s: float, clock: Any = time.monotonic) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s {interval_s}: must be >= 0")
        self.interval_s = interval_s
        self.clock = clock
        self.pending: dict[int, tuple[str, dict[str, list] | None]] = {}
        self.last_sent: dict[int, float] = {}

    def add(
        self, choice: int, text: str, logprobs: dict[str, list] | None, finish: str | None
    ) -> tuple[str, dict[str, list] | None, str | None] | None:
        held_text, held_lp = self.pending.pop(choice, ("", None))
        text = held_text + text
        if held_lp is not None and logprobs is not None:
            logprobs = {key: held_lp[key] + logprobs[key] for key in held_lp}
        elif held_lp is not None:
            logprobs = held_lp
        now = self.clock()
        first = choice not in self.last_sent
        if finish is None and not first and now - self.last_sent[choice] < self.interval_s:
            self.pending[choice] = (text, logprobs)
            return None
        self.last_sent[choice] = now
        return text, logprobs, finish
