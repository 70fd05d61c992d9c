"""The replica's half of the OpenAI-compatible API: completions (streamed or not), embeddings
and the tokenizer endpoints, mixed into `ModelServer` (serve/deployments.py).

One generation path. A completion's choices are rows of the replica's running continuous
generation (`ModelServer._step_generation`), the same loop /v1/generate joins; after every
decode step that loop calls `_stepped`, which hands each streaming row its progress through an
asyncio.Queue. `completion_chunks` turns that progress into OpenAI chunks as the tokens leave
the loop; a non-streamed completion is those chunks put together (`completion`), so a streamed
answer and a non-streamed one with the same seed are the same text by construction.

Cancellation: each row's future is its cancelled flag. A stop string, or the caller going away
(the streaming generator is closed or cancelled), cancels the choice's futures; the loop drops
rows whose future is done before its next decode step, so their compute stops there.

Answers are dicts in OpenAI's shape; failures are returned as {"error", "status"} values, as
the rest of ModelServer does, and the gateway (serve/openai_api.py) turns them into HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ray.serve import metrics

from nlm.completions import (
    MAX_TOP_LOGPROBS,
    ChoiceJob,
    ChoiceText,
    ChunkBatcher,
    StreamingGeneration,
    choice_jobs,
    encode_prompt,
    offsets,
    prompt_logprobs,
)
from nlm.inference import RequestError, is_seq2seq
from nlm.tokenizers.base import EOS_ID, PAD_ID, SPECIAL_TOKENS

SEAM_TOKENS = 8  # prompt tokens decoded before a choice's text, so its first word gets its space
TOKEN_BUCKETS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]


def _error(code: str, message: str, status: int = 400, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "param": param}, "status": status}


class OpenAIServing:
    """Mixin for ModelServer: needs `name`, `engine`, `stats`, `joining`, `running`,
    `generation_task`, `_generation_loop`, `_compute`, `_serve`, `_embed_batch`."""

    def _init_openai(self) -> None:
        """Metrics (Prometheus, via ray.serve.metrics; Serve adds deployment/replica tags)."""
        tags = ("model",)
        self.m_ttft = metrics.Histogram(
            "nlm_time_to_first_token_seconds",
            description="From a completion's arrival at the replica to its first token.",
            boundaries=TOKEN_BUCKETS,
            tag_keys=tags,
        )
        self.m_tpot = metrics.Histogram(
            "nlm_time_per_output_token_seconds",
            description="Mean time between a choice's output tokens after the first.",
            boundaries=TOKEN_BUCKETS,
            tag_keys=tags,
        )
        self.m_queue = metrics.Histogram(
            "nlm_queue_wait_seconds",
            description="From a generation row's arrival to its joining the decode batch.",
            boundaries=TOKEN_BUCKETS,
            tag_keys=tags,
        )
        self.m_rows = metrics.Histogram(
            "nlm_decode_step_rows",
            description="Rows decoded together in one continuous-batching step.",
            boundaries=ROW_BUCKETS,
            tag_keys=tags,
        )
        self.m_tokens = metrics.Counter(
            "nlm_output_tokens",
            description="Tokens decoded (rate() of it is the replica's tokens/s).",
            tag_keys=tags,
        )
        self.m_running = metrics.Gauge(
            "nlm_running_rows", description="Rows in the continuous generation.", tag_keys=tags
        )
        for metric in (self.m_ttft, self.m_tpot, self.m_queue, self.m_rows, self.m_tokens):
            metric.set_default_tags({"model": self.name})
        self.m_running.set_default_tags({"model": self.name})
        if "generate" in self.stats:
            self.stats["generate"].setdefault("cancelled", 0)

    # ---- the continuous generation's hooks (called by ModelServer._step_generation)

    def _new_generation(self) -> StreamingGeneration:
        self.engine.continuous_generation()  # raises for a family that does not generate
        return StreamingGeneration(self.engine.model)

    def _admission_cap(self, running: int, admissible: int) -> int:
        """With batching off (max_batch_size 1) a row joins only an empty generation, so
        streamed completions run one at a time like everything else then."""
        if self.max_batch_size > 1:
            return admissible
        return min(admissible, 1) if running == 0 else 0

    def _stepped(self, generation: StreamingGeneration, done: list[tuple[Any, Any]]) -> None:
        """After a decode step: progress to every streaming row, alternatives to finished ones."""
        rows = len(generation) + len(done)
        self.m_rows.observe(rows)
        self.m_tokens.inc(rows)
        self.m_running.set(len(generation))
        for key, job in done:
            alts, eos = generation.forget(key)
            if isinstance(job, ChoiceJob):
                job.final_alternatives, job.final_eos = alts, eos
        progress = generation.progress()
        for key, (job, _) in self.running.items():
            if isinstance(job, ChoiceJob) and job.sink is not None and key in progress:
                ids, lps = progress[key]
                alts = generation.alternatives.get(key, [])
                job.sink.put_nowait(("progress", job, list(ids), list(lps), list(alts)))

    def _start_rows(self, jobs: list[ChoiceJob]) -> list[asyncio.Future]:
        """Queue `jobs` to join the running generation at its next step (as /v1/generate's
        batches do); each future gets the row's answer, or is cancelled to drop the row."""
        loop = asyncio.get_running_loop()
        pairs = [(job, loop.create_future()) for job in jobs]
        self._count_arrivals("generate", [jobs])
        now = time.monotonic()
        for job, future in pairs:
            job.queued_at = now
            sink = job.sink
            future.add_done_callback(lambda f, j=job, s=sink: s.put_nowait(("done", j, f)))
        self.joining.extend(pairs)
        if self.generation_task is None or self.generation_task.done():
            self.generation_task = asyncio.create_task(self._generation_loop())
        return [f for _, f in pairs]

    # ---- requests

    def _prepare(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[ChoiceJob]]:
        """Prompts -> per prompt {ids, lead_eos, text} and the choices' jobs, in choice order."""
        if "generate" not in self.engine.endpoints:
            raise RequestError(
                "wrong_family",
                f"/v1/completions does not apply to '{self.name}', a {self.engine.family} "
                "model (use a causal model: fnn, rnn, lstm, gpt)",
            )
        raw = body["prompt"]
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        limit = self.engine.limits.max_items
        if len(raw) * body["n"] > limit:
            raise RequestError(
                "too_many_inputs",
                f"{len(raw)} prompts x n={body['n']} choices; the limit is {limit} per request",
            )
        logprobs = body.get("logprobs")
        if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
            raise RequestError("invalid_request", f"field 'logprobs': at most {MAX_TOP_LOGPROBS}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        prompts, jobs = [], []
        for i, prompt in enumerate(raw):
            where = "prompt" if len(raw) == 1 else f"prompt[{i}]"
            ids = encode_prompt(self.engine, prompt, where)
            if isinstance(prompt, str):
                lead = prompt.lstrip().startswith(SPECIAL_TOKENS[EOS_ID])
                text = prompt
            else:
                lead = bool(prompt) and prompt[0] == EOS_ID
                text = self.engine.tokenizer.decode(prompt)
            prompts.append({"ids": ids, "lead_eos": lead, "text": text})
            jobs.extend(
                choice_jobs(
                    self.engine,
                    ids,
                    body["n"],
                    body["max_tokens"],
                    body["temperature"],
                    body.get("top_k"),
                    body.get("top_p"),
                    body.get("seed"),
                    logprobs,
                    stop,
                    stop_at_eos=not body.get("ignore_eos", False),
                )
            )
        return prompts, jobs

    async def completion_chunks(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """A completion as OpenAI stream chunks (`object: text_completion`), one per choice and
        step that produced text; first an {"error"} value instead when the request is bad."""
        arrived = time.monotonic()
        try:
            prompts, jobs = self._prepare(body)
        except RequestError as exc:
            param = str(exc).split("'")[1] if str(exc).startswith("field '") else None
            yield _error(exc.code, str(exc), exc.status, param)
            return
        n, k = body["n"], body.get("logprobs")
        echo, max_tokens = body.get("echo", False), body["max_tokens"]
        if echo and k is not None and is_seq2seq(self.engine.model):
            message = (
                f"field 'echo': a {self.engine.family} model's prompt is its source, which it "
                "does not predict: no log-probs to echo"
            )
            yield _error("invalid_request", message, 400, "echo")
            return
        head = {
            "id": body.get("request_id") or f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model_name") or self.name,
        }
        tok = self.engine.tokenizer

        def chunk(index: int, text: str, lp: dict | None, finish: str | None) -> dict:
            choice = {"text": text, "index": index, "logprobs": lp, "finish_reason": finish}
            return {**head, "choices": [choice]}

        # Echo: the prompt's own tokens (and their log-probs) open each choice.
        scored = None
        if echo and k is not None:
            scored = await self._compute(
                prompt_logprobs, self.engine, [p["ids"] for p in prompts], k
            )
        bases = [0] * len(jobs)
        prompt_tokens = sum(len(p["ids"]) + p["lead_eos"] for p in prompts)
        # Each prompt counts once however many choices it has (OpenAI's and vLLM's usage).
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
        openers = []
        for c in range(len(jobs)):
            prompt = prompts[c // n]
            if not echo:
                openers.append(None)
                continue
            ids = [EOS_ID] * prompt["lead_eos"] + prompt["ids"]
            lp = None
            if k is not None:
                chosen, top = scored[c // n]
                first = [None] * prompt["lead_eos"]
                lp = {
                    "tokens": [tok.id_to_token(i) for i in ids],
                    "token_logprobs": first + chosen,
                    "top_logprobs": first + [_top(tok, a) for a in top],
                    "text_offset": offsets(self.engine, [], ids, 0, len(ids), 0, special=True),
                }
            openers.append(chunk(c, prompt["text"], lp, None))
            bases[c] = len(prompt["text"])
        if max_tokens == 0:
            for c, opener in enumerate(openers):
                if opener is None:
                    opener = chunk(c, "", None, None)
                opener["choices"][0]["finish_reason"] = "length"
                yield opener
            yield {**head, "choices": [], "usage": _usage(usage)}
            return
        for opener in openers:
            if opener is not None:
                yield opener

        queue: asyncio.Queue = asyncio.Queue()
        index = {id(job): c for c, job in enumerate(jobs)}
        texts = [ChoiceText(self.engine, job.stop) for job in jobs]
        sent_tokens = [0] * len(jobs)
        first_at: list[float | None] = [None] * len(jobs)
        for job in jobs:
            job.sink = queue
        futures = self._start_rows(jobs)
        open_choices = len(jobs)
        batcher = ChunkBatcher(self.stream_batching_interval_ms / 1000.0)
        try:
            while open_choices:
                kind, job, *rest = await queue.get()
                c = index[id(job)]
                text = texts[c]
                if text.stopped and kind == "progress":
                    continue
                if kind == "progress":
                    ids, lps, alts = rest
                    final, finish = False, None
                else:
                    (future,) = rest
                    if future.cancelled():
                        if text.stopped:
                            continue  # we cancelled it at its stop string; already answered
                        raise asyncio.CancelledError
                    exc = future.exception()
                    if exc is not None:
                        raise exc
                    answer = future.result()
                    ids, lps = answer["token_ids"], answer["logprobs"]
                    alts = job.final_alternatives
                    if job.final_eos is not None:  # the </s> that ended it: logprobs list it
                        ids, lps = [*ids, EOS_ID], [*lps, job.final_eos[0]]
                        alts = [*alts, job.final_eos[1]]
                    final = True
                    finish = "stop" if answer["finish_reason"] == "end_of_document" else "length"
                if ids and first_at[c] is None:
                    first_at[c] = time.monotonic()
                    self.m_ttft.observe(first_at[c] - arrived)
                    admitted = getattr(job, "admitted_at", None)
                    if admitted is not None:
                        self.m_queue.observe(max(0.0, admitted - job.queued_at))
                prefix = jobs[c].prompt_ids[-SEAM_TOKENS:]
                delta = text.update(ids, final, prefix)
                if text.stopped and not final:
                    final, finish = True, "stop"
                    futures[c].cancel()  # the row leaves the batch before the next step
                ready = text.tokens if final or text.sent == len(text.text) else sent_tokens[c]
                lp = None
                if k is not None:
                    lp = {
                        "tokens": [tok.id_to_token(i) for i in ids[sent_tokens[c] : ready]],
                        "token_logprobs": lps[sent_tokens[c] : ready],
                        "top_logprobs": [
                            _top(tok, alts[j]) if j < len(alts) else None
                            for j in range(sent_tokens[c], ready)
                        ],
                        "text_offset": offsets(
                            self.engine, prefix, ids, sent_tokens[c], ready, bases[c]
                        ),
                    }
                sent_tokens[c] = ready
                if final:
                    open_choices -= 1
                    usage["completion_tokens"] += text.tokens
                    if first_at[c] is not None and text.tokens > 1:
                        self.m_tpot.observe((time.monotonic() - first_at[c]) / (text.tokens - 1))
                if delta or final or (lp and lp["tokens"]):
                    due = batcher.add(c, delta, lp, finish)
                    if due is not None:
                        yield chunk(c, *due)
            yield {**head, "choices": [], "usage": _usage(usage)}
        finally:
            left = [f for f in futures if not f.done()]
            for future in left:
                future.cancel()  # the caller went away (or a choice failed): free the rows
            if left and "generate" in self.stats:
                self.stats["generate"]["cancelled"] += len(left)

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed completion: the chunks of `completion_chunks` put together."""
        choices: dict[int, dict[str, Any]] = {}
        answer: dict[str, Any] = {}
        async for piece in self.completion_chunks(body):
            if "error" in piece:
                return piece
            answer = {k: v for k, v in piece.items() if k not in ("choices", "usage")}
            if "usage" in piece:
                answer["usage"] = piece["usage"]
            for part in piece["choices"]:
                mine = choices.setdefault(
                    part["index"],
                    {"text": "", "index": part["index"], "logprobs": None, "finish_reason": None},
                )
                mine["text"] += part["text"]
                mine["finish_reason"] = part["finish_reason"] or mine["finish_reason"]
                if part["logprobs"] is not None:
                    if mine["logprobs"] is None:
                        mine["logprobs"] = {key: [] for key in part["logprobs"]}
                    for key, values in part["logprobs"].items():
                        mine["logprobs"][key].extend(values)
        answer["choices"] = [choices[i] for i in sorted(choices)]
        return answer

    async def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's embeddings: one vector per input text (nlm's /v1/embed underneath)."""
        inputs = body["input"]
        answer = await self._serve(inputs, self.engine.embed_job, self._embed_batch)
        if "error" in answer:
            return answer
        texts = [inputs] if isinstance(inputs, str) else inputs
        tokens = sum(len(self.engine.tokenizer.encode(t)) for t in texts)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body)}
                for i, v in enumerate(answer["results"])
            ],
            "model": body.get("model_name") or self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ---- the tokenizer, in vLLM's shapes (what lm-evaluation-harness probes for)

    async def tokenizer_info(self) -> dict[str, Any]:
        tok = self.engine.tokenizer
        return {
            "eos_token": SPECIAL_TOKENS[EOS_ID],
            "bos_token": None,  # causal prompts start at a </s> document boundary
            "pad_token": SPECIAL_TOKENS[PAD_ID],
            "tokenizer_class": f"nlm:{tok.kind}",
            "vocab_size": tok.vocab_size,
            "model_max_length": self.engine.max_text_tokens,
        }

    async def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        text = body["prompt"]
        ids = self.engine.tokenizer.encode(text) if text else []
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.max_text_tokens}

    async def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        ids = body["tokens"]
        vocab = self.engine.tokenizer.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            return _error(
                "invalid_token",
                f"field 'tokens': token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                param="tokens",
            )
        # Special tokens stay in the text: it must encode back to the same ids.
        return {"prompt": self.engine.tokenizer.decode(ids, skip_special=False)}


def _encode(vector: list[float], body: dict[str, Any]) -> list[float] | str:
    """OpenAI's `encoding_format`: a list of floats, or base64 of little-endian float32s (what
    the openai client asks for by default)."""
    if body.get("encoding_format") == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def _top(tok: Any, alts: list[tuple[int, float]]) -> dict[str, float] | None:
    return {tok.id_to_token(i): lp for i, lp in alts} if alts else None


def _usage(usage: dict[str, int]) -> dict[str, int]:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
