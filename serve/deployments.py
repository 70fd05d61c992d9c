"""One Ray Serve deployment per checkpoint: `ModelServer`, with dynamic batching.

Why one deployment per model rather than a multiplexed one: the five families answer different
endpoints and have very different costs (a 64-token gpt generation against a one-shot fnn
score), so each gets its own replicas, autoscaling and batch size; and multiplexing together
with batching has served the wrong model (ray #56633), which separate deployments rule out.

Every endpoint works the same way:
1. `generate(body)` (one HTTP request) checks and tokenizes its inputs right here, so a bad
   input is answered on its own and never fails a batch it would have joined;
2. it then awaits the `@serve.batch` method, which gathers the inputs of all requests that
   arrived within `batch_wait_timeout_s` (up to `max_batch_size` requests), runs them as a few
   padded forward passes (nlm.inference) on one worker thread, and hands each request its rows.
   A request whose compute (token positions x passes, `Engine.cost`) is over
   `Limits.max_request_cost` is refused first; merged work runs in slices of at most
   `Limits.max_slice_cost` positions (serve/replica.py), so a short request of another endpoint
   waits for one slice, not for the whole call.
3. Scoring, embedding, fill-mask: Serve's batcher forms the next batch while the current one
   runs (ray 2.60 waits for a free `max_concurrent_batches` slot only after forming it), so
   while one pass runs the arrivals pile up as several small batches. Before each engine call
   `_merged` therefore takes every request of that endpoint still waiting (up to
   `max_batch_size`), whichever batch it came in: a burst that Serve cut into 1 + 7 + 24 runs as
   one 1-request call and one 31-request call. A call that is not full first lingers for
   arrivals, at most a tenth of the previous call's duration and 100 ms (a 20 ms scoring pass
   waits up to 2 ms). `stats[endpoint]["batches"]` counts engine calls, `largest_batch` their
   requests.
4. Generation is batched continuously (Orca, OSDI 2022): each `@serve.batch` batch of generate
   requests (formed without waiting: `batch_wait_timeout_s` does not apply) joins the running
   generation (`nlm.inference.ContinuousGeneration`) at its next
   decode step, and each row leaves it, answered, as soon as it is done. Batching whole
   generations instead left closed-loop clients in cohorts (those answered by one call send
   their next requests while the next call already runs, so they wait for the call after it)
   and batches small: 32 clients got 2.2 x the unbatched throughput, against 6.9 x now
   (docs/BENCHMARKS.md). `stats["generate"]` counts joins as `batches` (`largest_batch`: the
   most prompts joining at once) and decode `steps` (`largest_step`: the most rows in one step).
A request may carry a list of inputs: batching is across requests and within them. The
machinery shared with the fine-tuned-model server (worker thread, reconfigure, health check,
merging, slicing, stats) is `Replica` (serve/replica.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray import serve

from nlm.device import load_for_inference
from nlm.inference import ContinuousGeneration, Engine, Limits, RequestError
from nlm.serve.openai_server import OpenAIServing
from nlm.serve.placement import replica_placement
from nlm.serve.replica import (
    DEFAULT_BATCH_WAIT_TIMEOUT_S,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_STREAM_BATCHING_INTERVAL_MS,
    DEPLOYMENT_OPTIONS,
    Replica,
    as_list,
    error,
    fail,
    unsliced,
)

_batched = serve.batch(
    max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S
)
# Generation hands each batch to the running continuous generation and awaits its rows, so
# batches must not wait for each other (the next one joins the running rows at the next step),
# nor for arrivals: those during a decode step join together at the next one, and a lone
# request starts at once (a 10 ms wait was 10 ms of every stream's time to first token).
_batched_generation = serve.batch(
    max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=0.0, max_concurrent_batches=64
)


class _Caller:
    """The row futures of one generate request. Its handler cancels them when Serve cancels it
    (the client left); rows that join later are cancelled as they join."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future] = []
        self.cancelled = False

    def track(self, future: asyncio.Future) -> asyncio.Future:
        self.futures.append(future)
        if self.cancelled:
            future.cancel()
        return future

    def cancel(self) -> None:
        self.cancelled = True
        for future in self.futures:
            future.cancel()


@serve.deployment(**DEPLOYMENT_OPTIONS)
class ModelServer(OpenAIServing, Replica):
    """A language-model checkpoint's replica: /v1/generate, score, embed, fill-mask, neighbors
    (module docstring). `limits`: nlm.inference.Limits fields."""

    BATCHED = ("_generate_batch", "_score_batch", "_embed_batch", "_fill_mask_batch")
    CONTINUOUS = ("_generate_batch",)

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
        checkpoint = load_for_inference(path, *replica_placement(device, dtype))
        engine = Engine(checkpoint, Limits.from_dict(limits or {}, source="limits"))
        super().__init__(name, engine.endpoints, torch_threads)
        self.engine = engine
        # Continuous generation (module docstring, step 4): jobs waiting to join, the running
        # rows' (job, future) by key, and the task that steps them.
        self.joining: list[tuple[Any, asyncio.Future]] = []
        self.running: dict[int, tuple[Any, asyncio.Future]] = {}
        self.next_key = 0
        self.generation_task: asyncio.Task | None = None
        if "generate" in self.stats:
            self.stats["generate"].update(steps=0, largest_step=0)
        self._init_openai()  # /v1/completions, metrics (serve/openai_server.py)

    async def info(self) -> dict[str, Any]:
        return {"name": self.name, **self.engine.info(), "replica": self.replica_info()}

    # ---- the endpoints (one call per HTTP request)

    async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        params = {k: body[k] for k in ("temperature", "top_k", "top_p", "seed", "stop_at_eos")}
        caller = _Caller()
        try:
            answer = await self._serve(
                body["prompt"],
                lambda p: self.engine.generation_job(p, body["max_tokens"], **params),
                lambda jobs: self._generate_batch((caller, jobs)),
                body.get("deadline"),
            )
        except asyncio.CancelledError:  # the client left: its rows stop at the next step
            caller.cancel()
            raise
        if "error" in answer:
            caller.cancel()  # past its deadline: its rows stop at the next step
        return answer

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        texts, sources = as_list(body["text"]), body.get("source")
        sources = [None] * len(texts) if sources is None else as_list(sources)
        return await self._serve(
            list(zip(texts, sources, strict=True)),
            lambda pair: self.engine.score_job(*pair),
            self._score_batch,
            body.get("deadline"),
        )

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        granularity = body.get("granularity", "pooled")
        return await self._serve(
            body["texts"],
            lambda t: self.engine.embed_job(t, granularity),
            self._embed_batch,
            body.get("deadline"),
        )

    async def fill_mask(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._serve(
            body["text"],
            lambda t: self.engine.fill_mask_job(t, body["top_k"]),
            self._fill_mask_batch,
            body.get("deadline"),
        )

    async def neighbors(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            async with self.engine_lock:
                found = await self._compute(self.engine.neighbors, body["word"], body["k"])
        except RequestError as exc:
            return error(exc.code, str(exc), exc.status)
        return {"neighbors": found}

    async def _serve(
        self,
        inputs: str | list[str],
        prepare: Callable[[str], Any],
        batched: Callable,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """Check and prepare every input, then await the batched answers until `deadline`
        (epoch seconds, set by the gateway from its request_timeout_s; None: no limit). The
        replica keeps the deadline itself rather than rely on the gateway's cancellation."""
        texts = as_list(inputs)
        limit = self.engine.limits.max_items
        if len(texts) > limit:
            return error(
                "too_many_inputs", f"{len(texts)} inputs in one request; the limit is {limit}"
            )
        try:
            jobs = [prepare(t) for t in texts]
            self.engine.check_budget(jobs)
        except RequestError as exc:
            return error(exc.code, str(exc), exc.status)
        if deadline is None:
            return {"results": await batched(jobs)}
        try:
            return {"results": await asyncio.wait_for(batched(jobs), deadline - time.time())}
        except TimeoutError:
            return error("timeout", "the request ran past the server's request_timeout_s", 504)

    # ---- the batched halves: a list of requests (each a list of jobs) -> a list of answers

    @_batched_generation
    async def _generate_batch(self, requests: list[tuple[_Caller, list[Any]]]) -> list[list[Any]]:
        if self.max_batch_size == 1:  # batching off: one prompt at a time, start to end
            return await self._run_batch(
                "generate", [jobs for _, jobs in requests], unsliced(self.engine.generate)
            )
        return await self._join_generation(requests)

    async def _join_generation(self, requests: list[tuple[_Caller, list[Any]]]) -> list[list[Any]]:
        """Add the requests' jobs to the continuous generation; their answers when done."""
        self._count_arrivals("generate", [jobs for _, jobs in requests])
        loop = asyncio.get_running_loop()
        mine = [
            [(job, caller.track(loop.create_future())) for job in jobs] for caller, jobs in requests
        ]
        self.joining.extend(pair for pairs in mine for pair in pairs)
        if self.generation_task is None or self.generation_task.done():
            self.generation_task = asyncio.create_task(self._generation_loop())
        # Each request's own answers: a request whose caller left gets its CancelledError
        # without failing the others of this batch.
        answers = await asyncio.gather(
            *(asyncio.gather(*(f for _, f in pairs)) for pairs in mine), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, asyncio.CancelledError):
                raise answer  # a failed step: every request of the batch hears of it
        return [None if isinstance(a, BaseException) else a for a in answers]

    async def _generation_loop(self) -> None:
        """Step the continuous generation while it has rows or jobs waiting to join."""
        try:
            await self._step_generation()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            fail([*self.running.values(), *self.joining], exc)
            self.running.clear()
            self.joining.clear()
            raise

    async def _step_generation(self) -> None:
        generation = self._new_generation()
        stats = self.stats["generate"]
        while self.joining or generation:
            gone = {key for key, (_, f) in self.running.items() if f.done()}
            for key in gone:
                del self.running[key]
            self.joining = [(job, f) for job, f in self.joining if not f.done()]
            staying = len(generation) - len(gone)
            n = self.engine.admissible(
                staying,
                [job for job, _ in self.joining],
                [job for job, _ in self.running.values()],
            )
            n = self._admission_cap(staying, n)  # batching off: one row at a time
            admitted, self.joining = self.joining[:n], self.joining[n:]
            keys = list(range(self.next_key, self.next_key + n))
            self.next_key += n
            self.running.update(zip(keys, admitted, strict=True))
            if admitted:
                stats["batches"] += 1
                stats["largest_batch"] = max(stats["largest_batch"], n)
            if not generation and not admitted:  # every joining row's caller left
                continue
            stats["steps"] += 1
            stats["largest_step"] = max(stats["largest_step"], staying + n)
            try:
                finished = await self._compute(
                    _advance, generation, [job for job, _ in admitted], keys, gone
                )
            except Exception as exc:  # noqa: BLE001 - every running request must hear of it
                fail(self.running.values(), exc)
                self.running.clear()
                generation = self._new_generation()
                continue
            done = []
            for key, result in finished:
                job, future = self.running.pop(key)
                done.append((key, job))
                if not future.done():
                    future.set_result(self.engine.generation_answer(job, result))
            self._stepped(generation, done)  # streaming rows' progress, metrics

    @_batched
    async def _score_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("score", requests, self.engine.score_slices)

    @_batched
    async def _embed_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("embed", requests, self.engine.embed_slices)

    @_batched
    async def _fill_mask_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("fill-mask", requests, self.engine.fill_mask_slices)


def _advance(
    generation: ContinuousGeneration, jobs: list[Any], keys: list[int], gone: set[int]
) -> list[tuple[int, Any]]:
    """One step of the continuous generation (on the worker thread): drop the rows nobody
    waits for, let the new jobs join, decode one token for every row."""
    if gone:
        generation.drop(gone)
    generation.add(jobs, keys)
    return generation.step()


def endpoint_method(endpoint: str) -> str:
    """The ModelServer method behind /v1/<endpoint>."""
    return endpoint.replace("-", "_")


__all__: Sequence[str] = [
    "DEFAULT_BATCH_WAIT_TIMEOUT_S",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_STREAM_BATCHING_INTERVAL_MS",
    "ModelServer",
    "endpoint_method",
    "error",
]
