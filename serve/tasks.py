"""Serving fine-tuned checkpoints (`nlm finetune`): POST /v1/classify and POST /v1/tag.

A checkpoint whose config.json names a `task` gets a `TaskServer` deployment instead of a
`ModelServer`; it answers the one endpoint of its task with the same machinery (`Replica`,
serve/replica.py: one worker thread, `@serve.batch` across requests merged per engine call, a
list of inputs within one, the stuck-thread health check, reconfigure and stats) and the same
error convention (errors are returned as {"error": ..., "status": n} values; the gateway turns
them into HTTP). The request and response bodies are in serve/schemas.py.

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

from typing import Any

from ray import serve

from nlm.device import check_request, place
from nlm.finetune.heads import load_task_checkpoint
from nlm.finetune.predict import Predictor
from nlm.inference import Limits, max_text_chars
from nlm.serve.placement import replica_placement
from nlm.serve.replica import (
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEPLOYMENT_OPTIONS,
    Replica,
    error,
    unsliced,
)

TASK_ENDPOINTS = {"classify": ("classify",), "tag": ("tag",)}
TAG_WINDOWS = 4  # a tag input may be this many times max_input_tokens long (it is windowed)


def task_endpoints(task: str) -> list[str]:
    """The endpoints of a fine-tuned checkpoint's task."""
    return list(TASK_ENDPOINTS[task])


_batched = serve.batch(
    max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S
)


@serve.deployment(**DEPLOYMENT_OPTIONS)
class TaskServer(Replica):
    """A fine-tuned checkpoint's replica: /v1/classify or /v1/tag (module docstring).
    `limits`: nlm.inference.Limits fields (max_input_tokens, max_items, max_rows apply)."""

    BATCHED = ("_classify_batch", "_tag_batch")

    def __init__(
        self,
        name: str,
        path: str,
        limits: dict[str, Any] | None = None,
        torch_threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        # On the replica's GPU when it has one (nlm.serve.placement); checked before loading.
        where, torch_dtype = check_request(*replica_placement(device, dtype))
        checkpoint = load_task_checkpoint(path, device=where)
        place(checkpoint.model, where, torch_dtype)
        super().__init__(name, task_endpoints(checkpoint.task), torch_threads)
        self.checkpoint = checkpoint
        self.limits = Limits.from_dict(limits or {}, source="limits")
        self.predictor = Predictor(self.checkpoint, batch_size=self.limits.max_rows)
        self.endpoints = task_endpoints(self.checkpoint.task)
        self.max_tokens = min(self.limits.max_input_tokens, self.predictor.max_length - 3)

    async def info(self) -> dict[str, Any]:
        model, tokenizer = self.checkpoint.model, self.checkpoint.tokenizer
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
            "replica": self.replica_info(),
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
        if problem := self._too_many(len(texts)):
            return problem
        jobs = []
        for i, (a, b) in enumerate(zip(texts, seconds, strict=True)):
            problem = self._check_text(a, "text", i, self.max_tokens) or (
                b is not None and self._check_text(b, "text_b", i, self.max_tokens)
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
        return {"results": await self._classify_batch(jobs)}

    async def tag(self, body: dict[str, Any]) -> dict[str, Any]:
        raw = body.get("text") is not None
        inputs = body["text"] if raw else body["tokens"]
        many = isinstance(inputs, list) if raw else isinstance(inputs[0], list)
        inputs = inputs if many else [inputs]
        if problem := self._too_many(len(inputs)):
            return problem
        limit = TAG_WINDOWS * self.limits.max_input_tokens
        jobs = []
        for i, item in enumerate(inputs):
            if raw:
                problem = self._check_text(item, "text", i, limit)
                if problem:
                    return problem
            size = len(item)
            if size > limit:
                return error(
                    "input_too_long",
                    f"item {i}: {size} {'characters' if raw else 'tokens'}; the limit is {limit}",
                )
            jobs.append((raw, item))
        return {"results": await self._tag_batch(jobs)}

    def _too_many(self, items: int) -> dict[str, Any] | None:
        if items > self.limits.max_items:
            return error(
                "too_many_inputs",
                f"{items} inputs in one request; the limit is {self.limits.max_items}",
            )
        return None

    def _check_text(
        self, text: str, field: str, index: int, max_tokens: int
    ) -> dict[str, Any] | None:
        if not text.strip():
            return error("empty_input", f"field '{field}' item {index}: empty input")
        # A cheap bound first, so a megabyte of text is refused before it is tokenized.
        if len(text) > max_text_chars(max_tokens):
            return error(
                "input_too_long",
                f"field '{field}' item {index}: input too long ({len(text)} characters; this "
                f"model takes at most {max_tokens} tokens)",
            )
        return None

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
        return await self._run_batch("classify", requests, unsliced(self._classify))

    @_batched
    async def _tag_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("tag", requests, unsliced(self._tag))
