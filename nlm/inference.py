"""Batched inference on a loaded checkpoint: score, generate, embed, fill-mask (plain PyTorch).

Serving (nlm.serve) merges concurrent requests into one call of these functions; they are also
usable on their own. Two layers:

- `Engine` works on text: it tokenizes and checks each input against `Limits` (raising
  `RequestError` with a machine-readable code), then runs many inputs as few padded forward
  passes and decodes the answers.
- the module-level functions work on token ids and do the padding and batching.

Batching never changes an answer: causal families are right-padded for scoring and embedding
(a causal model never looks at the padding after a token), bert and elmo (bidirectional) get an
attention mask (elmo is scored by its forward direction, which the padding after it does not
reach), and
generation left-pads prompts as the models' contract asks (`attention_mask` marks real tokens)
while every row samples with its own `torch.Generator`, temperature, top-k and top-p. A seeded
request therefore gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

import torch

from nlm.checkpoint import Checkpoint
from nlm.config import Config
from nlm.device import describe, model_device
from nlm.errors import NLMError
from nlm.evaluation import unknown_text
from nlm.models.base import IncrementalDecoder, LanguageModel
from nlm.sampling import check_sampling_args, sample_next
from nlm.tokenizers.base import (
    BOS_ID,
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
)

NUM_SPECIAL = len(SPECIAL_TOKENS)
MIN_TEMPERATURE = 1e-4  # colder than this samples greedily
MASK_TEXT = SPECIAL_TOKENS[MASK_ID]  # "[MASK]"
SHARED_ENDPOINTS = ("score", "embed", "neighbors")
GRANULARITIES = ("pooled", "token")  # /v1/embed: one vector per text, or one per token


# Objectives whose models read a source and write a target (the encoder-decoder): they generate
# from the source as the prompt, and score a text given a source.
SEQ2SEQ_OBJECTIVES = ("span",)


def is_seq2seq(model: LanguageModel | type[LanguageModel]) -> bool:
    """Whether `model` is an encoder-decoder (by its objective, nlm/models/base.py)."""
    return model.objective in SEQ2SEQ_OBJECTIVES


def serving_endpoints(model: LanguageModel | type[LanguageModel]) -> tuple[str, ...]:
    """The /v1 endpoints a model (or model class) answers, from its family facts: generate for
    causal models, fill-mask for masked-LM ones, then score, embed and neighbors for all."""
    own = ("generate",) if model.causal or is_seq2seq(model) else ()
    if model.objective == "mlm":
        own += ("fill-mask",)
    return (*own, *SHARED_ENDPOINTS)


@dataclasses.dataclass
class Limits(Config):
    """What one request may ask for. Configurable per deployment (serve/config.yaml args)."""

    max_input_tokens: int = 512  # per input text (also capped by the model's max_positions)
    max_new_tokens: int = 256  # per generated sequence
    max_items: int = 64  # inputs (prompts, texts) per request
    max_rows: int = 64  # rows in one forward pass when merged requests are run
    max_logit_elements: int = 2**25  # rows * positions * vocab per forward pass (memory cap)
    # Compute budgets in token positions run through the model (`Engine.cost`): bert's
    # pseudo-log-likelihood runs one masked copy of a text per token, so its cost is tokens x
    # length. A request over max_request_cost is refused; merged work is run in slices of at most
    # max_slice_cost positions, so no engine call holds the replica's worker thread for long.
    max_request_cost: int = 2**17
    max_slice_cost: int = 2**14
    # Generation: bytes of model state (gpt's keys and values, rnn/lstm hidden state) that the
    # running rows may hold together; rows that would exceed it wait to join.
    max_cache_bytes: int = 2**31


T = TypeVar("T")
# Work run in slices: a generator that runs one slice per `next()`, yields its cost (token
# positions) and returns the answers (see `next_slice`).
Sliced = Generator[int, None, list[Any]]


def max_text_chars(max_tokens: int) -> int:
    """A bound on the characters of a text of at most `max_tokens` tokens (no tokenizer makes
    a token of more than 64 characters here): longer texts are refused before tokenizing."""
    return 64 * max_tokens + 1024


class RequestError(NLMError):
    """Bad input to an inference call; `code` and `status` become the HTTP error."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


# ---------------------------------------------------------------- jobs (one input each)


@dataclasses.dataclass
class ScoreJob:
    ids: list[int]  # causal: [</s>] + text tokens; bert: [CLS] + text tokens + [SEP]
    num_bytes: int
    unk_bytes: int | None = None  # bytes of the text the tokenizer maps to <unk>
    spelling_bits: float | None = None  # their spelling cost (nlm.tokenizers.spelling)
    source: list[int] | None = None  # seq2seq: source tokens + [</s>]; ids: text tokens + [</s>]


@dataclasses.dataclass
class GenerationJob:
    ids: list[int]  # [</s>] + prompt tokens (seq2seq: the source, prompt tokens + [</s>])
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_at_eos: bool = True  # end at </s> (the end of the document) instead of max_new_tokens


@dataclasses.dataclass
class EmbedJob:
    ids: list[int]
    start: int  # the text's tokens are ids[start:end]; only they are pooled
    end: int
    granularity: str = "pooled"  # or "token": one vector per text token (GRANULARITIES)


@dataclasses.dataclass
class FillMaskJob:
    ids: list[int]  # [CLS] ... [SEP] with MASK_ID where the text had [MASK]
    top_k: int


# ---------------------------------------------------------------- padding and chunking


def pad_right(
    seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, sequences at the left, padding after them."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def pad_left(
    seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, sequences at the right (the models' generation layout)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            ids[row, width - len(seq) :] = torch.as_tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def chunks(
    lengths: Sequence[int],
    max_rows: int,
    max_elements: int,
    per_position: int,
    max_positions: int | None = None,
) -> Iterator[list[int]]:
    """Groups of indices (sorted by length, so padding is small) that fit one forward pass.

    A group holds at most max_rows rows, rows * longest * per_position (e.g. vocab size, for the
    logits) stays under max_elements and rows * longest (the positions the pass computes) under
    max_positions, unless a single row alone exceeds them.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    group: list[int] = []
    for i in order:
        rows, width = len(group) + 1, max(lengths[i], 1)  # sorted: the newest is the longest
        if group and (
            rows > max_rows
            or rows * width * per_position > max_elements
            or (max_positions is not None and rows * width > max_positions)
        ):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _sliced_chunks(
    items: Sequence[Any],
    lengths: Sequence[int],
    limits: Limits,
    per_position: int,
    run: Callable[[list[Any]], list[Any]],
) -> Sliced:
    """Apply `run` to length-sorted groups of items, one group per slice (yielding its cost in
    positions, at most limits.max_slice_cost unless one item alone is larger); returns the
    answers in input order."""
    out: list[Any] = [None] * len(items)
    for group in chunks(
        lengths, limits.max_rows, limits.max_logit_elements, per_position, limits.max_slice_cost
    ):
        for i, answer in zip(group, run([items[i] for i in group]), strict=True):
            out[i] = answer
        yield len(group) * max(max(lengths[i] for i in group), 1)
    return out


def _run_chunked(
    items: Sequence[Any],
    lengths: Sequence[int],
    limits: Limits,
    per_position: int,
    run: Callable[[list[Any]], list[Any]],
) -> list[Any]:
    """`_sliced_chunks` run to the end."""
    return run_all(_sliced_chunks(items, lengths, limits, per_position, run))


def next_slice(work: Generator[int, None, T]) -> tuple[bool, int | T]:
    """Run one slice of `work`: (False, its cost in positions), or (True, the answers) once the
    work is done. A server calls this on its worker thread, one slice per call."""
    try:
        return False, next(work)
    except StopIteration as stop:
        return True, stop.value


def run_all(work: Generator[int, None, T]) -> T:
    """Run every slice of `work`; its answers."""
    while True:
        done, value = next_slice(work)
        if done:
            return value  # type: ignore[return-value]


# ---------------------------------------------------------------- batched model calls (ids)


@torch.inference_mode()
def causal_token_logprobs(
    model: LanguageModel, seqs: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """For each sequence, log p(seq[t] | seq[:t]) for t >= 1 (a float tensor of len(seq) - 1).

    Right padding: a causal model's outputs at real positions never see the padding after them.
    """
    ids, _ = pad_right(seqs)
    ids = ids.to(model_device(model))
    logits = model(ids).logits.float()  # fp32 before the softmax, whatever the weights' dtype
    out = []
    for row, seq in enumerate(seqs):
        n = len(seq) - 1
        logp = torch.log_softmax(logits[row, :n], dim=-1)
        out.append(logp.gather(-1, ids[row, 1 : n + 1, None]).squeeze(-1))
    return out


@torch.inference_mode()
def seq2seq_token_logprobs(
    model: LanguageModel, sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """For each (source, target) pair, log p(target[t] | source, target[:t]) for every t (a
    float tensor of len(target)): teacher forcing, sources right-padded under a mask."""
    device = model_device(model)
    src, mask = (t.to(device) for t in pad_right(sources))
    tgt, _ = pad_right(targets)
    tgt = tgt.to(device)
    logits = model(src, targets=None, attention_mask=mask, decoder_input_ids=shift_right(tgt))
    logits = logits.logits.float()
    out = []
    for row, seq in enumerate(targets):
        n = len(seq)
        logp = torch.log_softmax(logits[row, :n], dim=-1)
        out.append(logp.gather(-1, tgt[row, :n, None]).squeeze(-1))
    return out


def shift_right(targets: torch.Tensor) -> torch.Tensor:
    """A seq2seq decoder's input for teacher forcing: <s> then targets[:, :-1]."""
    shifted = torch.full_like(targets, BOS_ID)
    shifted[:, 1:] = targets[:, :-1]
    return shifted


@torch.inference_mode()
def bert_logits(model: LanguageModel, seqs: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """(len(seq), V) MLM logits per sequence; right-padded with an attention mask."""
    device = model_device(model)
    ids, mask = (t.to(device) for t in pad_right(seqs))
    logits = model(ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask).logits.float()
    return [logits[row, : len(seq)] for row, seq in enumerate(seqs)]


@torch.inference_mode()
def token_hidden(
    model: LanguageModel, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """(end - start, H) final hidden states (`ModelOutput.hidden`: elmo's layer mix) of each span
    [start, end) of its sequence, right-padded: causal models need no mask, bidirectional
    ones (bert, elmo) get one."""
    device = model_device(model)
    ids, mask = (t.to(device) for t in pad_right(seqs))
    if model.causal:
        hidden = model(ids).hidden
    elif model.objective == "mlm":
        hidden = model(ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask).hidden
    else:
        hidden = model(ids, attention_mask=mask).hidden
    hidden = hidden.float().cpu()
    return [hidden[row, a:b] for row, (a, b) in enumerate(spans)]


def pooled_hidden(
    model: LanguageModel, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """(B, H) mean of the final hidden states over each span [start, end) of its sequence."""
    return torch.stack([h.mean(dim=0) for h in token_hidden(model, seqs, spans)])


def pseudo_log_likelihoods(
    model: LanguageModel, seqs: Sequence[Sequence[int]], limits: Limits
) -> list[torch.Tensor]:
    """bert: for [CLS] x1..xn [SEP], log p(x_i | x with x_i masked) for every i (n values).

    Salazar et al. 2020: one masked copy of the sentence per token, run as few padded batches.
    """
    return run_all(sliced_pseudo_log_likelihoods(model, seqs, limits))


def sliced_pseudo_log_likelihoods(
    model: LanguageModel, seqs: Sequence[Sequence[int]], limits: Limits
) -> Generator[int, None, list[torch.Tensor]]:
    """`pseudo_log_likelihoods` in slices of at most limits.max_slice_cost positions each."""
    copies: list[list[int]] = []
    owner: list[tuple[int, int]] = []  # (sequence, masked position)
    for s, seq in enumerate(seqs):
        for pos in range(1, len(seq) - 1):
            masked = list(seq)
            masked[pos] = MASK_ID
            copies.append(masked)
            owner.append((s, pos))
    vocab = model.config.vocab_size

    def run(group: list[tuple[list[int], tuple[int, int]]]) -> list[float]:
        logits = bert_logits(model, [c for c, _ in group])
        out = []
        for row, (_, (s, pos)) in enumerate(group):
            logp = torch.log_softmax(logits[row][pos], dim=-1)
            out.append(float(logp[seqs[s][pos]]))
        return out

    values = yield from _sliced_chunks(
        list(zip(copies, owner, strict=True)), [len(c) for c in copies], limits, vocab, run
    )
    per_seq: list[list[float]] = [[] for _ in seqs]
    for (s, _), v in zip(owner, values, strict=True):
        per_seq[s].append(v)
    return [torch.tensor(v, dtype=torch.float64) for v in per_seq]


# ---------------------------------------------------------------- generation


@dataclasses.dataclass
class _Row:
    """One sequence being generated: its job, its own random stream and what it has so far."""

    key: Any
    job: GenerationJob
    generator: torch.Generator
    new_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    ended: bool = False  # sampled </s> with stop_at_eos

    @property
    def done(self) -> bool:
        return self.ended or len(self.new_ids) >= self.job.max_new_tokens


Generated = tuple[list[int], list[float], bool]  # new ids, their log-probs, ended at </s>


class ContinuousGeneration:
    """Rows at different points of their generation, decoded together one token per step.

    Continuous batching (Yu et al., Orca, OSDI 2022): `add` runs new prompts (`prefill` of the
    model's `IncrementalDecoder` protocol, nlm/models/base.py) and joins their cache to the
    running one between two steps, `step` samples one token for every
    row, hands back the rows that are done and drops them from the cache. A request therefore
    never waits for the longest generation of the batch before it, and a server keeps its
    batch full while clients come and go.

    Every row samples on its own, as `model.generate` would for its prompt alone: its own
    seeded generator (one uniform per step), temperature, top-k and top-p. A seeded request gets
    the same tokens whichever rows share its steps.
    """

    def __init__(self, model: IncrementalDecoder) -> None:
        self.model = model
        self.rows: list[_Row] = []
        self.logits: torch.Tensor | None = None  # (rows, V): the next token's, per row
        self.cache: Any = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, jobs: Sequence[GenerationJob], keys: Sequence[Any] | None = None) -> None:
        """Start generating for `jobs` (one prefill, left-padded); `keys` name them in `step`."""
        if not jobs:
            return
        keys = list(range(len(jobs))) if keys is None else list(keys)
        device = model_device(self.model)
        ids, mask = (t.to(device) for t in pad_left([j.ids for j in jobs]))
        steps = max(j.max_new_tokens for j in jobs)
        logits, cache = self.model.prefill(ids, None if bool(mask.all()) else mask, steps)
        if self.rows:
            logits = torch.cat([self.logits, logits])
            cache = self.model.join_caches([self.cache, cache])
        self.logits, self.cache = logits, cache
        for key, job in zip(keys, jobs, strict=True):
            self.rows.append(_Row(key, job, torch.Generator().manual_seed(job.seed)))

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, Generated]]:
        """One token for every row -> the (key, result) of each row that finished with it."""
        if not self.rows:
            return []
        device = self.logits.device
        chosen = torch.empty(len(self.rows), dtype=torch.long, device=device)
        # Grouped by sampling settings: one sample_next call per group, each row's uniform from
        # its own generator.
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault((row.job.temperature, row.job.top_k, row.job.top_p), []).append(i)
        for (temperature, top_k, top_p), members in groups.items():
            uniforms = None
            if temperature != 0:
                uniforms = torch.cat(
                    [torch.rand(1, generator=self.rows[i].generator) for i in members]
                )
            index = torch.tensor(members, device=device)
            tokens, lps = sample_next(
                self.logits[index], temperature, top_k, top_p, uniforms=uniforms
            )
            chosen[index] = tokens
            for i, token, logprob in zip(members, tokens.tolist(), lps.tolist(), strict=True):
                row = self.rows[i]
                if row.job.stop_at_eos and token == EOS_ID:
                    row.ended = True  # the </s> is not returned
                else:
                    row.new_ids.append(token)
                    row.logprobs.append(logprob)
        finished = [(r.key, (r.new_ids, r.logprobs, r.ended)) for r in self.rows if r.done]
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        self._keep(keep)
        if self.rows:
            self.logits, self.cache = self.model.decode_step(chosen[keep], self.cache)
        return finished

    def drop(self, keys: set[Any]) -> None:
        """Stop generating for `keys` (e.g. their clients went away)."""
        self._keep([i for i, r in enumerate(self.rows) if r.key not in keys])

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.logits = self.cache = None
            return
        index = torch.tensor(keep, device=self.logits.device)
        self.logits = self.logits[index]
        self.cache = self.model.select_cache(self.cache, index)


def generate_batch(model: IncrementalDecoder, jobs: Sequence[GenerationJob]) -> list[Generated]:
    """Continue every job's prompt, all in one batch -> (new ids, their log-probs, ended at </s>).

    A row is done when it has its max_new_tokens, or sampled </s> with stop_at_eos (the </s> is
    not returned); done rows leave the batch, the others go on.
    """
    generation = ContinuousGeneration(model)
    generation.add(jobs)
    out: list[Any] = [None] * len(jobs)
    while generation:
        for key, result in generation.step():
            out[key] = result
    return out


# ---------------------------------------------------------------- the text layer


def _metric(metrics: dict[str, Any], *names: str) -> float | None:
    """The first of `names` found in metrics.json, top level or under "test"/"eval"/"final"."""
    scopes = [metrics] + [
        metrics[k] for k in ("test", "eval", "final") if isinstance(metrics.get(k), dict)
    ]
    for scope in scopes:
        for name in names:
            value = scope.get(name)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                return float(value)
    return None


def _score_answer(job: ScoreJob, logp: torch.Tensor, measure: str) -> dict[str, Any]:
    """One /v1/score result. bits/byte only for a (conditional) log-likelihood (a
    pseudo-log-likelihood is no probability of the text): `bits_per_byte` open-vocabulary (each <unk> also pays its
    spelling, nlm/evaluation.py), `bits_per_byte_closed_vocab` without that; the open figure is
    null when the tokenizer has no spelling model and the text has <unk>."""
    total, n = float(logp.double().sum()), int(logp.numel())
    num_bytes = max(job.num_bytes, 1)
    unk = sum(1 for i in job.ids if i == UNK_ID)
    answer = {
        "measure": measure,
        "num_tokens": n,
        "num_bytes": job.num_bytes,
        "logprob": total,
        "ppl": math.exp(min(-total / n, 700.0)),
        "unk_tokens": unk,
        "unk_bytes": job.unk_bytes,
        "bits_per_byte": None,
        "bits_per_byte_closed_vocab": None,
    }
    if measure == "pseudo-log-likelihood":
        return answer
    closed = -total / math.log(2) / num_bytes
    answer["bits_per_byte_closed_vocab"] = closed
    if job.spelling_bits is not None:
        answer["bits_per_byte"] = closed + job.spelling_bits / num_bytes
    elif unk == 0:
        answer["bits_per_byte"] = closed
    return answer


class Engine:
    """A loaded checkpoint answering batches of text requests (what a serving replica holds)."""

    def __init__(self, checkpoint: Checkpoint, limits: Limits | None = None) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model.eval()
        self.tokenizer = checkpoint.tokenizer
        self.family = checkpoint.family
        self.limits = limits or Limits()
        self.max_positions = self.model.max_positions
        self.endpoints = serving_endpoints(self.model)
        # bert adds [CLS] and [SEP]; causal families read the text after a </s> boundary.
        extra = 1 if self.model.causal else 2
        cap = self.limits.max_input_tokens
        self.max_text_tokens = min(cap, self.max_positions - extra) if self.max_positions else cap
        # cache_bytes' (per row, per position), measured now: a server asks for it on its event
        # loop, where running the model would compete with its worker thread.
        self._cache_line: tuple[int, int] | None = (
            self._measure_cache() if "generate" in self.endpoints else None
        )
        self._unit_vectors: torch.Tensor | None = None  # neighbors: built on first use

    def info(self) -> dict[str, Any]:
        metrics = self.checkpoint.metrics
        return {
            "family": self.family,
            "endpoints": list(self.endpoints),
            "parameters": self.model.num_parameters(),
            "vocab_size": self.tokenizer.vocab_size,
            "tokenizer": self.tokenizer.kind,
            "max_positions": self.max_positions,
            **describe(self.model),  # device and dtype of the weights
            # Test figures only when a test was scored (`nlm eval --record`); the validation
            # perplexity of training is reported as what it is.
            "test_ppl": _metric(metrics, "test_ppl", "test_perplexity"),
            "test_pseudo_ppl": _metric(metrics, "test_pseudo_ppl"),
            "val_ppl": _metric(metrics, "val_ppl"),
            "bits_per_byte": _metric(metrics, "test_bits_per_byte", "bits_per_byte"),
            "metrics": metrics,
        }

    # ---- checking and encoding one input

    def _require(self, endpoint: str) -> None:
        if endpoint not in self.endpoints:
            raise RequestError(
                "wrong_family",
                f"/v1/{endpoint} does not apply to a {self.family} model "
                f"(it serves: {', '.join('/v1/' + e for e in self.endpoints)})",
            )

    def _encode(self, text: str, what: str = "text") -> list[int]:
        if not isinstance(text, str):
            raise RequestError("invalid_request", f"field '{what}': expected a string", 422)
        if not text.strip():
            raise RequestError("empty_input", f"field '{what}': empty input")
        # A cheap bound first, so a megabyte of text is refused before it is tokenized.
        if len(text) > max_text_chars(self.max_text_tokens):
            raise RequestError("input_too_long", self._too_long(what, f"{len(text)} characters"))
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RequestError("empty_input", f"field '{what}': the text has no tokens")
        if len(ids) > self.max_text_tokens:
            raise RequestError("input_too_long", self._too_long(what, f"{len(ids)} tokens"))
        return ids

    def _too_long(self, what: str, size: str) -> str:
        return f"field '{what}': input too long ({size}; this model takes at most {self.max_text_tokens} tokens)"

    def score_job(self, text: str, source: str | None = None) -> ScoreJob:
        """A text to score: log p(text) (bert: its pseudo-log-likelihood); for a seq2seq model
        log p(text | source), and `source` is required. RequestError naming the field."""
        self._require("score")
        if is_seq2seq(self.model):
            if source is None:
                raise RequestError(
                    "invalid_request",
                    f"field 'source': required by a {self.family} model, which scores "
                    "log p(text | source)",
                    422,
                )
            source_ids = [*self._encode(source, "source"), EOS_ID]
            ids = [*self._encode(text), EOS_ID]
        elif source is not None:
            raise RequestError(
                "invalid_request",
                f"field 'source': a {self.family} model scores a text alone (only seq2seq "
                "models take a source)",
                422,
            )
        else:
            source_ids = None
            ids = self._encode(text)
            # clm families (elmo too: its forward direction) score the text after a </s> boundary
            ids = [EOS_ID, *ids] if self.model.objective == "clm" else [CLS_ID, *ids, SEP_ID]
        num_bytes = len(text.encode("utf-8"))
        if UNK_ID not in ids:  # nothing to spell (the common case): no second pass over the text
            return ScoreJob(ids, num_bytes, 0, 0.0, source_ids)
        unknown = unknown_text(self.tokenizer, [text])
        return ScoreJob(ids, num_bytes, unknown["unk_bytes"], unknown["spelling_bits"], source_ids)

    def prompt_ids(self, ids: list[int]) -> list[int]:
        """A prompt's tokens as a generation job holds them: after the </s> document boundary
        (causal), or closed by </s> as the encoder's source (seq2seq, as in its training)."""
        return [*ids, EOS_ID] if is_seq2seq(self.model) else [EOS_ID, *ids]

    def generation_job(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_at_eos: bool = True,
    ) -> GenerationJob:
        self._require("generate")
        try:
            check_sampling_args(temperature, top_k, top_p)
        except NLMError as exc:
            raise RequestError("invalid_request", str(exc), 422) from None
        if max_tokens < 1:
            raise RequestError("invalid_request", "field 'max_tokens': must be >= 1", 422)
        if max_tokens > self.limits.max_new_tokens:
            raise RequestError(
                "too_many_tokens",
                f"field 'max_tokens': {max_tokens} new tokens requested, the limit is {self.limits.max_new_tokens}",
            )
        ids = self.prompt_ids(self._encode(prompt, "prompt"))
        if self.max_positions and len(ids) + max_tokens > self.max_positions:
            raise RequestError(
                "too_many_tokens",
                f"field 'max_tokens': prompt ({len(ids)} tokens with the document boundary) plus "
                f"{max_tokens} new tokens exceeds this model's {self.max_positions} positions",
            )
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
        if temperature < MIN_TEMPERATURE:
            temperature = 0.0  # logits / 1e-30 overflow to inf; anything this cold is greedy
        return GenerationJob(ids, max_tokens, temperature, top_k, top_p, seed, stop_at_eos)

    def embed_job(self, text: str, granularity: str = "pooled") -> EmbedJob:
        """`granularity` "pooled" (the mean over the text's tokens) or "token" (each token's
        vector, with the tokens); RequestError 422 naming the field otherwise."""
        self._require("embed")
        if granularity not in GRANULARITIES:
            raise RequestError(
                "invalid_request",
                f"field 'granularity': must be one of {', '.join(GRANULARITIES)}, got {granularity!r}",
                422,
            )
        ids = self._encode(text)
        if self.model.causal:
            return EmbedJob(ids, 0, len(ids), granularity)
        if is_seq2seq(self.model):  # read as a source: closed by </s>, which is not pooled
            return EmbedJob([*ids, EOS_ID], 0, len(ids), granularity)
        # bidirectional: the text between bert's [CLS] .. [SEP], or elmo's document boundaries
        edge = (EOS_ID, EOS_ID) if self.model.objective == "clm" else (CLS_ID, SEP_ID)
        return EmbedJob([edge[0], *ids, edge[1]], 1, len(ids) + 1, granularity)

    def fill_mask_job(self, text: str, top_k: int) -> FillMaskJob:
        self._require("fill-mask")
        pieces = text.split(MASK_TEXT)
        if len(pieces) == 1:
            raise RequestError("no_mask", f"field 'text': no {MASK_TEXT} in the text")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if i:
                ids.append(MASK_ID)
            if piece.strip():
                ids.extend(self.tokenizer.encode(piece))
        if len(ids) > self.max_text_tokens:
            raise RequestError("input_too_long", self._too_long("text", f"{len(ids)} tokens"))
        return FillMaskJob(
            [CLS_ID, *ids, SEP_ID], min(top_k, self.tokenizer.vocab_size - NUM_SPECIAL)
        )

    # ---- running many inputs at once

    def _vocab(self) -> int:
        return self.model.config.vocab_size

    def score(self, jobs: Sequence[ScoreJob]) -> list[dict[str, Any]]:
        return run_all(self.score_slices(jobs))

    def score_slices(self, jobs: Sequence[ScoreJob]) -> Sliced:
        """`score` in slices (`next_slice`)."""
        if is_seq2seq(self.model):
            per_token = yield from _sliced_chunks(
                jobs,
                [len(j.ids) + len(j.source) for j in jobs],
                self.limits,
                self._vocab(),
                lambda group: seq2seq_token_logprobs(
                    self.model, [j.source for j in group], [j.ids for j in group]
                ),
            )
            measure = "conditional log-likelihood"
        elif self.model.objective == "clm":
            per_token = yield from _sliced_chunks(
                [j.ids for j in jobs],
                [len(j.ids) for j in jobs],
                self.limits,
                self._vocab(),
                lambda group: causal_token_logprobs(self.model, group),
            )
            measure = "log-likelihood"
        else:
            per_token = yield from sliced_pseudo_log_likelihoods(
                self.model, [j.ids for j in jobs], self.limits
            )
            measure = "pseudo-log-likelihood"
        return [
            _score_answer(job, logp, measure) for job, logp in zip(jobs, per_token, strict=True)
        ]

    def embed(self, jobs: Sequence[EmbedJob]) -> list[Any]:
        """Per job: its pooled vector (a list of H floats), or for granularity "token"
        {"tokens": the text's tokens, "embeddings": one H-vector per token}."""
        return run_all(self.embed_slices(jobs))

    def embed_slices(self, jobs: Sequence[EmbedJob]) -> Sliced:
        """`embed` in slices (`next_slice`)."""

        def run(group: list[EmbedJob]) -> list[torch.Tensor]:
            return token_hidden(
                self.model, [j.ids for j in group], [(j.start, j.end) for j in group]
            )

        states = yield from _sliced_chunks(
            jobs, [len(j.ids) for j in jobs], self.limits, self._vocab(), run
        )
        out: list[Any] = []
        for job, h in zip(jobs, states, strict=True):
            if job.granularity == "token":
                tokens = [self.tokenizer.id_to_token(i) for i in job.ids[job.start : job.end]]
                out.append({"tokens": tokens, "embeddings": h.tolist()})
            else:
                out.append(h.mean(dim=0).tolist())
        return out

    def fill_mask(self, jobs: Sequence[FillMaskJob]) -> list[dict[str, Any]]:
        return run_all(self.fill_mask_slices(jobs))

    def fill_mask_slices(self, jobs: Sequence[FillMaskJob]) -> Sliced:
        """`fill_mask` in slices (`next_slice`)."""

        def run(group: list[FillMaskJob]) -> list[dict[str, Any]]:
            answers = []
            for job, logits in zip(
                group, bert_logits(self.model, [j.ids for j in group]), strict=True
            ):
                positions = [i for i, t in enumerate(job.ids) if t == MASK_ID]
                scores = logits[positions]
                scores[:, :NUM_SPECIAL] = float("-inf")  # never propose [MASK], <pad>, ...
                probs, ids = scores.softmax(dim=-1).topk(job.top_k, dim=-1)
                answers.append(
                    {
                        "masks": [
                            {
                                "position": m,
                                "candidates": [
                                    {
                                        "token": self.tokenizer.id_to_token(int(t)),
                                        "token_id": int(t),
                                        "prob": float(p),
                                    }
                                    for t, p in zip(ids[m], probs[m], strict=True)
                                ],
                            }
                            for m in range(len(positions))
                        ]
                    }
                )
            return answers

        return (
            yield from _sliced_chunks(
                jobs, [len(j.ids) for j in jobs], self.limits, self._vocab(), run
            )
        )

    def generate(self, jobs: Sequence[GenerationJob]) -> list[dict[str, Any]]:
        results = _run_chunked(
            jobs,
            [len(j.ids) + j.max_new_tokens for j in jobs],
            self.limits,
            self._vocab(),
            lambda group: generate_batch(self.model, group),
        )
        return [self.generation_answer(j, r) for j, r in zip(jobs, results, strict=True)]

    def continuous_generation(self) -> ContinuousGeneration:
        """A running batch that generation jobs join and leave between steps (serving)."""
        self._require("generate")
        return ContinuousGeneration(self.model)

    def admissible(
        self,
        running: int,
        jobs: Sequence[GenerationJob],
        running_jobs: Sequence[GenerationJob] = (),
    ) -> int:
        """How many of `jobs` (in order) may join a continuous generation of `running` rows
        (`running_jobs`, when known, are theirs): at most max_rows rows; their prefill's logits
        within max_logit_elements and its positions within max_slice_cost; and the cache of all
        the rows within max_cache_bytes. One job always joins an empty generation."""
        room = self.limits.max_rows - running
        n, width, positions = 0, 0, 0
        prompt = max((len(j.ids) for j in running_jobs), default=0)
        new = max((j.max_new_tokens for j in running_jobs), default=0)
        for job in jobs[: max(room, 0)]:
            width = max(width, len(job.ids) + job.max_new_tokens)
            positions += len(job.ids)
            prompt, new = max(prompt, len(job.ids)), max(new, job.max_new_tokens)
            if n and (
                (n + 1) * width * self._vocab() > self.limits.max_logit_elements
                or positions > self.limits.max_slice_cost
            ):
                break
            if (n or running) and (
                self.cache_bytes(running + n + 1, prompt + new) > self.limits.max_cache_bytes
            ):
                break
            n += 1
        return n

    def cache_bytes(self, rows: int, positions: int) -> int:
        """Upper bound on the bytes of generation state for `rows` rows of up to `positions`
        tokens (prompt + new): gpt keeps n_layer x 2 x n_embd values per position and row, an
        rnn/lstm a fixed state per row. Measured on the model itself (a one-row prefill of two
        lengths, fitted as a line), so it holds for any family and dtype."""
        if self._cache_line is None:
            self._cache_line = self._measure_cache()
        per_row, per_position = self._cache_line
        return rows * (per_row + per_position * positions)

    def _measure_cache(self) -> tuple[int, int]:
        sizes = []
        for new in (1, 2):
            generation = ContinuousGeneration(self.model)
            generation.add([GenerationJob([EOS_ID], new, temperature=0.0)])
            sizes.append(_tensor_bytes(generation.cache))
        per_position = max(sizes[1] - sizes[0], 0)
        return max(sizes[0] - 2 * per_position, 0), per_position

    def cost(self, job: ScoreJob | EmbedJob | FillMaskJob | GenerationJob) -> int:
        """Token positions the model computes for `job` (the unit of the compute budgets):
        one pass over its ids; bert scoring runs one masked copy per text token; generation
        processes its prompt and then one position per new token."""
        if isinstance(job, GenerationJob):
            return len(job.ids) + job.max_new_tokens
        if isinstance(job, ScoreJob) and job.source is not None:  # seq2seq: one teacher-forced pass
            return len(job.ids) + len(job.source)
        if isinstance(job, ScoreJob) and self.model.objective == "mlm":
            return (len(job.ids) - 2) * len(job.ids)
        return len(job.ids)

    def check_budget(self, jobs: Sequence[Any]) -> None:
        """RequestError (400, over_budget) when `jobs` together cost more than
        limits.max_request_cost positions, or a generation row alone needs more cache than
        limits.max_cache_bytes (it could never be admitted)."""
        total = sum(self.cost(j) for j in jobs)
        if total > self.limits.max_request_cost:
            raise RequestError(
                "over_budget",
                f"this request costs {total} token positions of model compute; the limit per "
                f"request is {self.limits.max_request_cost} (send fewer or shorter inputs"
                + (
                    "; bert scoring costs tokens x length per text)"
                    if self.model.objective == "mlm"
                    else ")"
                ),
            )
        for i, job in enumerate(jobs):
            if isinstance(job, GenerationJob):
                need = self.cache_bytes(1, len(job.ids) + job.max_new_tokens)
                if need > self.limits.max_cache_bytes:
                    raise RequestError(
                        "over_budget",
                        f"item {i}: prompt plus max_tokens needs {need} bytes of generation "
                        f"cache; the limit is {self.limits.max_cache_bytes}",
                    )

    def generation_answer(self, job: GenerationJob, result: Generated) -> dict[str, Any]:
        ids, logprobs, ended = result
        return {
            "text": self.decode(ids),
            "tokens": [self.token_text(i) for i in ids],
            "token_ids": ids,
            "logprobs": logprobs,
            "prompt_tokens": len(job.ids) - 1,
            "seed": job.seed,
            "finish_reason": "end_of_document" if ended else "length",
        }

    def token_text(self, token_id: int) -> str:
        """A token's text; a span model's sentinels read `<extra_id_k>` as in T5 (they are the
        tokenizer's own tokens, nlm/tokenizers/sentinels.py)."""
        return self.tokenizer.id_to_token(token_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Generated ids as text, without special tokens; sentinels as `<extra_id_k>`."""
        return self.tokenizer.decode(ids, skip_special=True)

    def neighbors(self, word: str, k: int) -> list[dict[str, Any]]:
        from nlm.wordvectors import nearest, unit_vectors

        self._require("neighbors")
        if self._unit_vectors is None:  # once per engine, not per request
            self._unit_vectors = unit_vectors(self.model, self.tokenizer)
        try:
            pairs = nearest(self._unit_vectors, self.tokenizer, word, k=k)
        except NLMError as exc:
            code = (
                "unknown_word"
                if "unknown word" in str(exc) or "special token" in str(exc)
                else "bad_request"
            )
            raise RequestError(code, str(exc), 404 if code == "unknown_word" else 400) from None
        return [{"token": t, "cosine": c} for t, c in pairs]


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor reachable from `value` (tensors, sequences, dicts, objects)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(_tensor_bytes(v) for v in vars(value).values())
    return 0
