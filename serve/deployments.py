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
   requests joins the running generation (`nlm.inference.ContinuousGeneration`) at its next
   decode step, and each row leaves it, answered, as soon as it is done. Batching whole
   generations instead left closed-loop clients in cohorts (those answered by one call send
   their next requests while the next call already runs, so they wait for the call after it)
   and batches small: 32 clients got 2.2 x the unbatched throughput, against 6.9 x now
   (docs/BENCHMARKS.md). `stats["generate"]` counts joins as `batches` (`largest_batch`: the
   most prompts joining at once) and decode `steps` (`largest_step`: the most rows in one step).
A request may carry a list of inputs: batching is across requests and within them.

Answers are plain dicts. Errors are returned as {"error": {...}, "status": n} values rather
than raised, so they cross the Ray boundary as data and the gateway turns them into HTTP.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve

from nlm.device import load_for_inference
from nlm.inference import ContinuousGeneration, Engine, Limits, RequestError
from nlm.serve.openai_server import OpenAIServing
from nlm.serve.placement import replica_placement

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01
# A batch that runs longer than this means the worker thread is wedged: fail the health check
# so Serve replaces the replica.
STUCK_AFTER_S = 600.0
# How long an engine call that is not full waits for more requests (module docstring, step 3).
LINGER_FRACTION = 0.1
MAX_LINGER_S = 0.1

_batched = serve.batch(
    max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S
)
# Generation hands each batch to the running continuous generation and awaits its rows, so
# batches must not wait for each other: the next one joins the running rows at the next step.
_batched_generation = serve.batch(
    max_batch_size=DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s=DEFAULT_BATCH_WAIT_TIMEOUT_S,
    max_concurrent_batches=64,
)


def error(code: str, message: str, status: int = 400) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}, "status": status}


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


@serve.deployment(
    # Local sizes; serve/config.yaml carries the cluster's. max_ongoing_requests must stay
    # >= max_batch_size or batches can never fill (ray-project/ray#43288).
    ray_actor_options={"num_cpus": 0.25},
    max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
    health_check_period_s=5,
    health_check_timeout_s=30,
)
class ModelServer(OpenAIServing):
    def __init__(
        self,
        name: str,
        path: str,
        limits: dict[str, Any] | None = None,
        torch_threads: int | None = None,
        device: str = "cpu",
        dtype: str = "float32",
    ) -> None:
        # Default: as many torch threads as whole CPUs this replica reserved (at least one).
        # Ray sets OMP_NUM_THREADS=1 for fractional actors, so say it explicitly either way.
        if torch_threads is None:
            reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch_threads = max(1, int(reserved))
        torch.set_num_threads(torch_threads)
        self.name = name
        # On the replica's GPU when it has one (nlm.serve.placement); checked before loading.
        checkpoint = load_for_inference(path, *replica_placement(device, dtype))
        self.engine = Engine(checkpoint, Limits.from_dict(limits or {}, source="limits"))
        # One worker thread runs every forward pass: the event loop stays free to accept (and
        # batch) requests meanwhile, and two endpoints never fight over the cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nlm-{name}")
        self.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        self.batch_wait_timeout_s = DEFAULT_BATCH_WAIT_TIMEOUT_S
        self.stats = {
            e: {"requests": 0, "items": 0, "batches": 0, "largest_batch": 0}
            for e in self.engine.endpoints
        }
        # Requests waiting for an engine call, per endpoint: (jobs, future of their answers).
        self.waiting: dict[str, list[tuple[list[Any], asyncio.Future]]] = {
            e: [] for e in self.engine.endpoints
        }
        self.engine_lock = asyncio.Lock()  # one engine call at a time (one worker thread)
        self.arrived = {e: asyncio.Event() for e in self.engine.endpoints}
        self.last_call_s = dict.fromkeys(self.engine.endpoints, 0.0)
        self.busy_since: float | None = None
        # Continuous generation (module docstring, step 4): jobs waiting to join, the running
        # rows' (job, future) by key, and the task that steps them.
        self.joining: list[tuple[Any, asyncio.Future]] = []
        self.running: dict[int, tuple[Any, asyncio.Future]] = {}
        self.next_key = 0
        self.generation_task: asyncio.Task | None = None
        if "generate" in self.stats:
            self.stats["generate"].update(steps=0, largest_step=0)
        self._init_openai()  # /v1/completions, metrics (serve/openai_server.py)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s}; max_batch_size 1 = no batching."""
        unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"user_config: unknown field(s) {sorted(unknown)}")
        self.max_batch_size = int(config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(
            config.get("batch_wait_timeout_s", self.batch_wait_timeout_s)
        )
        for method in (
            self._generate_batch,
            self._score_batch,
            self._embed_batch,
            self._fill_mask_batch,
        ):
            method.set_max_batch_size(self.max_batch_size)
            method.set_batch_wait_timeout_s(self.batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.busy_since is not None and time.monotonic() - self.busy_since > STUCK_AFTER_S:
            raise RuntimeError(f"a batch has been running for over {STUCK_AFTER_S:.0f} s")

    async def info(self) -> dict[str, Any]:
        context = serve.get_replica_context()
        return {
            "name": self.name,
            **self.engine.info(),
            "replica": {
                "pid": os.getpid(),
                "replica_id": context.replica_id.unique_id,
                "max_batch_size": self.max_batch_size,
                "batch_wait_timeout_s": self.batch_wait_timeout_s,
                "stats": self.stats,
            },
        }

    # ---- the endpoints (one call per HTTP request)

    async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        params = {k: body[k] for k in ("temperature", "top_k", "top_p", "seed", "stop_at_eos")}
        return await self._serve(
            body["prompt"],
            lambda p: self.engine.generation_job(p, body["max_tokens"], **params),
            self._generate_batch,
        )

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._serve(body["text"], self.engine.score_job, self._score_batch)

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._serve(body["texts"], self.engine.embed_job, self._embed_batch)

    async def fill_mask(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self._serve(
            body["text"],
            lambda t: self.engine.fill_mask_job(t, body["top_k"]),
            self._fill_mask_batch,
        )

    async def neighbors(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            found = await self._compute(self.engine.neighbors, body["word"], body["k"])
        except RequestError as exc:
            return error(exc.code, str(exc), exc.status)
        return {"neighbors": found}

    async def _serve(
        self, inputs: str | list[str], prepare: Callable[[str], Any], batched: Callable
    ) -> dict[str, Any]:
        texts = as_list(inputs)
        limit = self.engine.limits.max_items
        if len(texts) > limit:
            return error(
                "too_many_inputs", f"{len(texts)} inputs in one request; the limit is {limit}"
            )
        try:
            jobs = [prepare(t) for t in texts]
        except RequestError as exc:
            return error(exc.code, str(exc), exc.status)
        return {"results": await batched(jobs)}

    # ---- the batched halves: a list of requests (each a list of jobs) -> a list of answers

    async def _run_batch(
        self, endpoint: str, requests: list[list[Any]], run: Callable[[list[Any]], list[Any]]
    ) -> list[list[Any]]:
        stats = self._count_arrivals(endpoint, requests)
        if self.max_batch_size > 1:
            return await self._merged(endpoint, requests, run)
        # Batching off: one input per forward pass, like a server without batching.
        out = []
        for jobs in requests:
            stats["batches"] += 1
            stats["largest_batch"] = max(stats["largest_batch"], 1)
            answers = []
            for job in jobs:
                answers.extend(await self._compute(run, [job]))
            out.append(answers)
        return out

    def _count_arrivals(self, endpoint: str, requests: list[list[Any]]) -> dict[str, int]:
        stats = self.stats[endpoint]
        stats["requests"] += len(requests)
        stats["items"] += sum(len(jobs) for jobs in requests)
        return stats

    async def _merged(
        self, endpoint: str, requests: list[list[Any]], run: Callable[[list[Any]], list[Any]]
    ) -> list[list[Any]]:
        """Run `requests` together with every request of `endpoint` still waiting (step 3 of
        the module docstring); the first batch to get the engine answers the others' too."""
        loop = asyncio.get_running_loop()
        mine = [(jobs, loop.create_future()) for jobs in requests]
        self.waiting[endpoint].extend(mine)
        self.arrived[endpoint].set()
        stats = self.stats[endpoint]

        def answered() -> bool:
            return all(future.done() for _, future in mine)

        while not answered():
            async with self.engine_lock:
                if answered():  # the lock's previous holder took ours along
                    break
                await self._linger(endpoint)
                queue = self.waiting[endpoint]
                taken, self.waiting[endpoint] = (
                    queue[: self.max_batch_size],
                    queue[self.max_batch_size :],
                )
                if not taken:  # ours are pending, so they are queued; never spin on it
                    raise RuntimeError(f"{endpoint}: a request was lost from the batch queue")
                stats["batches"] += 1
                stats["largest_batch"] = max(stats["largest_batch"], len(taken))
                flat = [job for jobs, _ in taken for job in jobs]
                started = time.monotonic()
                try:
                    answers = await self._compute(run, flat)  # the engine pads and chunks
                except asyncio.CancelledError:
                    # This request was cancelled (its client left): the others it took go back
                    # to the front of the queue for the next engine call.
                    self.waiting[endpoint][:0] = [t for t in taken if not t[1].done()]
                    raise
                except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                    _fail(taken, exc)
                    continue
                self.last_call_s[endpoint] = time.monotonic() - started
                start = 0
                for jobs, future in taken:
                    if not future.done():
                        future.set_result(answers[start : start + len(jobs)])
                    start += len(jobs)
        return [future.result() for _, future in mine]

    async def _linger(self, endpoint: str) -> None:
        """Wait for more requests before an engine call that is not full (module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(MAX_LINGER_S, LINGER_FRACTION * self.last_call_s[endpoint])
        while len(self.waiting[endpoint]) < self.max_batch_size:
            left = deadline - loop.time()
            if left <= 0:
                return
            self.arrived[endpoint].clear()
            try:
                await asyncio.wait_for(self.arrived[endpoint].wait(), left)
            except TimeoutError:
                return

    async def _compute(self, fn: Callable, *args: Any) -> Any:
        def timed() -> Any:
            self.busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self.busy_since = None

        return await asyncio.get_running_loop().run_in_executor(self.executor, timed)

    @_batched_generation
    async def _generate_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        if self.max_batch_size == 1:  # batching off: one prompt at a time, start to end
            return await self._run_batch("generate", requests, self.engine.generate)
        return await self._join_generation(requests)

    async def _join_generation(self, requests: list[list[Any]]) -> list[list[Any]]:
        """Add the requests' jobs to the continuous generation; their answers when done."""
        self._count_arrivals("generate", requests)
        loop = asyncio.get_running_loop()
        mine = [[(job, loop.create_future()) for job in jobs] for jobs in requests]
        self.joining.extend(pair for pairs in mine for pair in pairs)
        if self.generation_task is None or self.generation_task.done():
            self.generation_task = asyncio.create_task(self._generation_loop())
        try:
            return [[await future for _, future in pairs] for pairs in mine]
        except asyncio.CancelledError:  # the callers left: their rows stop at the next step
            for pairs in mine:
                for _, future in pairs:
                    future.cancel()
            raise

    async def _generation_loop(self) -> None:
        """Step the continuous generation while it has rows or jobs waiting to join."""
        try:
            await self._step_generation()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            _fail([*self.running.values(), *self.joining], exc)
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
            n = self.engine.admissible(staying, [job for job, _ in self.joining])
            n = self._admission_cap(staying, n)  # batching off: one row at a time
            admitted, self.joining = self.joining[:n], self.joining[n:]
            keys = list(range(self.next_key, self.next_key + n))
            self.next_key += n
            self.running.update(zip(keys, admitted, strict=True))
            if admitted:
                stats["batches"] += 1
                stats["largest_batch"] = max(stats["largest_batch"], n)
            stats["steps"] += 1
            stats["largest_step"] = max(stats["largest_step"], staying + n)
            try:
                finished = await self._compute(
                    _advance, generation, [job for job, _ in admitted], keys, gone
                )
            except Exception as exc:  # noqa: BLE001 - every running request must hear of it
                _fail(self.running.values(), exc)
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
        return await self._run_batch("score", requests, self.engine.score)

    @_batched
    async def _embed_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("embed", requests, self.engine.embed)

    @_batched
    async def _fill_mask_batch(self, requests: list[list[Any]]) -> list[list[Any]]:
        return await self._run_batch("fill-mask", requests, self.engine.fill_mask)


def _fail(waiting: Iterable[tuple[Any, asyncio.Future]], exc: BaseException) -> None:
    """Hand `exc` to every (job, future) pair still waiting for its answer."""
    for _, future in waiting:
        if not future.done():
            future.set_exception(exc)


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


__all__: Sequence[str] = ["ModelServer", "endpoint_method", "error"]
