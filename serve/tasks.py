"""Serving fine-tuned checkpoints (`nlm finetune`): POST /v1/classify and POST /v1/tag.

A checkpoint whose config.json names a `task` gets a `TaskServer` deployment instead of a
`ModelServer`; it answers the one endpoint of its task, with the same batching (`@serve.batch`
across requests, a list of inputs within one) and the same error convention (errors are
returned as {"error": ..., "status": n} values; the gateway turns them into HTTP).

    /v1/classify  {"model", "text": str | [str], "text_b"?: str | [str]}
                  -> {"label", "score", "probs": {label: p}} (or {"results": [...]} for a list)
    /v1/tag       {"model", "text": str | [str]}        raw text: characters are the tokens,
                                                         a B/M/E/S model also returns "words"
                  {"model", "tokens": [str] | [[str]]}  pre-split tokens
                  -> {"tokens", "tags", "words"?}

Inference is nlm.finetune.predict (plain torch): long tag inputs are cut into windows and a
segmenter's tags are Viterbi-decoded, so "words" is always a valid segmentation.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import ray
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from nlm.device import check_request, place
from nlm.finetune.heads import load_task_checkpoint
from nlm.finetune.predict import Predictor
from nlm.inference import Limits
from nlm.serve.deployments import DEFAULT_BATCH_WAIT_TIMEOUT_S, DEFAULT_MAX_BATCH_SIZE, error
from nlm.serve.placement import replica_placement

TASK_ENDPOINTS = {"classify": ("classify",), "tag": ("tag",)}
TAG_WINDOWS = 4  # a tag input may be this many times max_input_tokens long (it is windowed)

# ---------------------------------------------------------------- request and response bodies

Text = Annotated[str, Field(max_length=100_000)]
OneOrMany = Text | Annotated[list[Text], Field(min_length=1, max_length=1024)]
Token = Annotated[str, Field(min_length=1, max_length=100)]
Tokens = Annotated[list[Token], Field(min_length=1, max_length=100_000)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ClassifyRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=128)]
    text: OneOrMany = Field(description="a text, or a list answered together")
    text_b: OneOrMany | None = Field(
        None,
        description="second texts of pairs (joined with the separator token): same shape as text",
    )

    @model_validator(mode="after")
    def _pairs_match(self) -> ClassifyRequest:
        if self.text_b is not None and isinstance(self.text, str) != isinstance(self.text_b, str):
            raise ValueError("text_b must have the shape of text (both strings or both lists)")
        if isinstance(self.text_b, list) and len(self.text_b) != len(self.text):
            raise ValueError("text_b must have as many items as text")
        return self


class Classification(BaseModel):
    label: str | int
    score: float = Field(description="the probability of the label")
    probs: dict[str, float] = Field(description="every label's probability")


class ClassifyResponse(Classification):
    model: str


class ClassifyBatchResponse(BaseModel):
    model: str
    results: list[Classification]


class TagRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=128)]
    text: OneOrMany | None = Field(None, description="raw text: each character is a token")
    tokens: Tokens | Annotated[list[Tokens], Field(min_length=1, max_length=1024)] | None = Field(
        None, description="pre-split tokens, or a list of such sequences"
    )

    @model_validator(mode="after")
    def _one_input(self) -> TagRequest:
        if (self.text is None) == (self.tokens is None):
            raise ValueError("give exactly one of text and tokens")
        return self

    @property
    def inputs(self) -> str | list:
        return self.text if self.text is not None else self.tokens  # type: ignore[return-value]

    @property
    def batched(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return isinstance(self.tokens[0], list)  # type: ignore[index]


class Tagging(BaseModel):
    tokens: list[str]
    tags: list[str]
    words: list[str] | None = Field(
        None, description="the segmentation (B/M/E/S models, text input)"
    )


class TagResponse(Tagging):
    model: str


class TagBatchResponse(BaseModel):
    model: str
    results: list[Tagging]


# ---------------------------------------------------------------- the deployment


def task_endpoints(task: str) -> list[str]:
    return list(TASK_ENDPOINTS[task])


_batched = serve.batch(
    max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S
)


@serve.deployment(
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
    health_check_period_s=5,
    health_check_timeout_s=30,
)
class TaskServer:
    def __init__(
        self,
        name: str,
        path: str,
        limits: dict[str, Any] | None = None,
        torch_threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        if torch_threads is None:
            reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch_threads = max(1, int(reserved))
        torch.set_num_threads(torch_threads)
        self.name = name
        # On the replica's GPU when it has one (nlm.serve.placement); checked before loading.
        where, torch_dtype = check_request(*replica_placement(device, dtype))
        self.checkpoint = load_task_checkpoint(path, device=where)
        place(self.checkpoint.model, where, torch_dtype)
        self.limits = Limits.from_dict(limits or {}, source="limits")
        self.predictor = Predictor(self.checkpoint, batch_size=self.limits.max_rows)
        self.endpoints = task_endpoints(self.checkpoint.task)
        self.max_tokens = min(self.limits.max_input_tokens, self.predictor.max_length - 3)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nlm-{name}")
        self.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        self.batch_wait_timeout_s = DEFAULT_BATCH_WAIT_TIMEOUT_S
        self.stats = {
            e: {"requests": 0, "items": 0, "batches": 0, "largest_batch": 0} for e in self.endpoints
        }

    def reconfigure(self, config: dict[str, Any]) -> None:
        unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"user_config: unknown field(s) {sorted(unknown)}")
        self.max_batch_size = int(config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(
            config.get("batch_wait_timeout_s", self.batch_wait_timeout_s)
        )
        for method in (self._classify_batch, self._tag_batch):
            method.set_max_batch_size(self.max_batch_size)
            method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    async def info(self) -> dict[str, Any]:
        model, tokenizer = self.checkpoint.model, self.checkpoint.tokenizer
        context = serve.get_replica_context()
        return {
            "name": self.name,
            "family": model.family,
            "task": self.checkpoint.task,
            "labels": self.checkpoint.labels,
            "endpoints": self.endpoints,
            "parameters": model.backbone.num_parameters(),
            "vocab_size": tokenizer.vocab_size,
            "tokenizer": tokenizer.kind,
            "max_positions": model.max_positions,
            "test_ppl": None,
            "val_ppl": None,
            "bits_per_byte": None,
            "metrics": self.checkpoint.metrics,
            "replica": {
                "pid": os.getpid(),
                "replica_id": context.replica_id.unique_id,
                "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "stats": self.stats,
            },
        }

    # ---- the endpoints: check each input here, so a bad one never fails a batch

    async def classify(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = body["text"] if isinstance(body["text"], list) else [body["text"]]
        seconds = body.get("text_b")
        seconds = (
            [None] * len(texts)
            if seconds is None
            else (seconds if isinstance(seconds, list) else [seconds])
        )
        jobs = []
        for i, (a, b) in enumerate(zip(texts, seconds, strict=True)):
            problem = self._check_text(a, "text", i) or (
                b is not None and self._check_text(b, "text_b", i)
            )
            if problem:
                return problem
            tokens = len(self.predictor.tokenizer.encode(a)) + (
                len(self.predictor.tokenizer.encode(b)) if b else 0
            )
            if tokens > self.max_tokens:
                return error(
                    "input_too_long",
                    f"item {i}: {tokens} tokens; this model takes at most {self.max_tokens}",
                )
            jobs.append((a, b))
        return await self._serve("classify", jobs, self._classify_batch)

    async def tag(self, body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("text") is not None
        inputs = body["text"] if raw else body["tokens"]
        many = isinstance(inputs, list) if raw else isinstance(inputs[0], list)
        inputs = inputs if many else [inputs]
        limit = TAG_WINDOWS * self.limits.max_input_tokens
        jobs = []
        for i, item in enumerate(inputs):
            if raw:
                problem = self._check_text(item, "text", i)
                if problem:
                    return problem
            size = len(item)
            if size > limit:
                return error(
                    "input_too_long",
                    f"item {i}: {size} {'characters' if raw else 'tokens'}; the limit is {limit}",
                )
            jobs.append((raw, item))
        return await self._serve("tag", jobs, self._tag_batch)

    def _check_text(self, text: str, field: str, index: int) -> dict[str, Any] | None:
        if not text.strip():
            return error("empty_input", f"field '{field}' item {index}: empty input")
        return None

    async def _serve(self, endpoint: str, jobs: list[Any], batched: Any) -> dict[str, Any]:
        if len(jobs) > self.limits.max_items:
            return error(
                "too_many_inputs",
                f"{len(jobs)} inputs in one request; the limit is {self.limits.max_items}",
            )
        stats = self.stats[endpoint]
        stats["requests"] += 1
        stats["items"] += len(jobs)
        return {"results": await batched(jobs)}

    async def _run_batch(
        self, endpoint: str, requests: list[list[Any]], run: Any
    ) -> list[list[Any]]:
        stats = self.stats[endpoint]
        stats["batches"] += 1
        stats["largest_batch"] = max(stats["largest_batch"], len(requests))
        flat = [job for jobs in requests for job in jobs]
        answers = await asyncio.get_running_loop().run_in_executor(self.executor, run, flat)
        out, start = [], 0
        for jobs in requests:
            out.append(answers[start : start + len(jobs)])
            start += len(jobs)
        return out

    def _classify(self, jobs: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
        return self.predictor.classify([a for a, _ in jobs], [b for _, b in jobs])

    def _tag(self, jobs: list[tuple[bool, Any]]) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = [{} for _ in jobs]
        segmenter = self.predictor.scheme == "bmes"
        texts = [(i, item) for i, (raw, item) in enumerate(jobs) if raw and segmenter]
        if texts:
            for (i, text), seg in zip(
                texts, self.predictor.segment([t for _, t in texts]), strict=True
            ):
                tokens = [c for c in text if not c.isspace()]
                answers[i] = {"tokens": tokens, "tags": seg["tags"], "words": seg["words"]}
        rest = [
            (i, [c for c in item if not c.isspace()] if raw else list(item))
            for i, (raw, item) in enumerate(jobs)
            if not (raw and segmenter)
        ]
        if rest:
            for (i, tokens), tags in zip(
                rest, self.predictor.tag([t for _, t in rest]), strict=True
            ):
                answers[i] = {"tokens": tokens, "tags": tags}
        return answers

    @_batched
    async def _classify_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("classify", requests, self._classify)

    @_batched
    async def _tag_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("tag", requests, self._tag)
