"""What every model replica shares: `Replica`, the base of `ModelServer` (language models,
serve/deployments.py) and `TaskServer` (fine-tuned checkpoints, serve/tasks.py).

- one worker thread runs every forward pass, so the event loop stays free to accept (and batch)
  requests meanwhile and two endpoints never fight over the cores;
- `reconfigure` (Serve's user_config) resizes the `@serve.batch` methods named in `BATCHED`;
- `check_health` fails when one engine call has held the worker thread for `STUCK_AFTER_S`, so
  Serve replaces a wedged replica;
- `_merged` runs each endpoint's waiting requests together and `_run_sliced` runs that work in
  slices (nlm.inference.next_slice), taking the engine lock per slice: a long request (bert
  scoring of many texts) never holds the thread for more than one slice while a short request
  of another endpoint waits;
- `stats` counts requests, items, engine calls and slices per endpoint (GET /v1/models).

Answers are plain dicts. Errors are returned as {"error": {...}, "status": n} values rather
than raised, so they cross the Ray boundary as data and the gateway turns them into HTTP.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
import torch
from ray import serve

from nlm.inference import Sliced, next_slice

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.01
# A streamed choice's tokens may be grouped, one chunk at most every this many ms after its
# first (Ray Serve LLM's stream_batching_interval_ms): every chunk is a Ray object through two
# hops (replica -> gateway -> proxy), which costs CPU per chunk (ray-project/ray#52745). 0 (the
# default) sends every decode step's tokens at once: on 2 CPU cores grouping at 50 ms gained
# nothing (docs/BENCHMARKS.md, Streaming).
DEFAULT_STREAM_BATCHING_INTERVAL_MS = 0.0
# An engine call that runs longer than this means the worker thread is wedged: fail the health
# check so Serve replaces the replica. Work is sliced (Limits.max_slice_cost), so a healthy
# call is far shorter.
STUCK_AFTER_S = 600.0
# How long an engine call that is not full waits for more requests (ModelServer's docstring).
LINGER_FRACTION = 0.1
MAX_LINGER_S = 0.1

# Every replica deployment's options (local sizes; serve/config.yaml carries the cluster's).
# max_ongoing_requests must stay >= max_batch_size or batches can never fill (ray #43288).
DEPLOYMENT_OPTIONS: dict[str, Any] = {
    "ray_actor_options": {"num_cpus": 0.25},
    "max_ongoing_requests": 2 * DEFAULT_MAX_BATCH_SIZE,
    "health_check_period_s": 5,
    "health_check_timeout_s": 30,
}

Run = Callable[[list[Any]], Sliced]  # merged jobs -> their answers, computed in slices


def error(code: str, message: str, status: int = 400) -> dict[str, Any]:
    """An error answer: the gateway turns it into HTTP `status` with nlm's error shape."""
    return {"error": {"code": code, "message": message}, "status": status}


def as_list(value: Any) -> list[Any]:
    """One input (a string) or a list of inputs, as a list."""
    return [value] if isinstance(value, str) else list(value)


def unsliced(fn: Callable[[list[Any]], list[Any]]) -> Run:
    """A plain batch function as work of one slice (its cost: the number of inputs)."""

    def work(jobs: list[Any]) -> Sliced:
        answers = fn(jobs)
        yield len(jobs)
        return answers

    return work


class Replica:
    """The machinery of a model replica (module docstring); subclasses add the endpoints.

    Args:
        name: the model's name (the deployment's).
        endpoints: the endpoints this replica answers (keys of `stats`).
        torch_threads: torch's intra-op threads; None: the whole CPUs this replica reserved
            (at least one). Ray sets OMP_NUM_THREADS=1 for fractional actors, so it is always
            set explicitly.
    """

    BATCHED: tuple[str, ...] = ()  # the @serve.batch methods that reconfigure resizes
    # Of those, the ones whose batches join a running loop at its next step (continuous
    # generation): the loop's step is their batching window, so Serve's batcher must not add
    # batch_wait_timeout_s of its own to every request's time to first token.
    CONTINUOUS: tuple[str, ...] = ()

    def __init__(self, name: str, endpoints: Sequence[str], torch_threads: int | None) -> None:
        if torch_threads is None:
            reserved = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
            torch_threads = max(1, int(reserved))
        torch.set_num_threads(torch_threads)
        self.name = name
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"nlm-{name}")
        self.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        self.batch_wait_timeout_s = DEFAULT_BATCH_WAIT_TIMEOUT_S
        self.stream_batching_interval_ms = DEFAULT_STREAM_BATCHING_INTERVAL_MS
        self.stats: dict[str, dict[str, int]] = {
            e: {
                "requests": 0,
                "items": 0,
                "batches": 0,
                "largest_batch": 0,
                "slices": 0,
                "largest_slice": 0,
            }
            for e in endpoints
        }
        # Requests waiting for an engine call, per endpoint: (jobs, future of their answers).
        self.waiting: dict[str, list[tuple[list[Any], asyncio.Future]]] = {e: [] for e in endpoints}
        self.engine_lock = asyncio.Lock()  # one slice at a time on the one worker thread
        self.arrived = {e: asyncio.Event() for e in endpoints}
        self.last_call_s = dict.fromkeys(endpoints, 0.0)
        self.busy_since: float | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: {max_batch_size, batch_wait_timeout_s, stream_batching_interval_ms};
        max_batch_size 1 = no batching. batch_wait_timeout_s applies to the methods in BATCHED
        but not CONTINUOUS."""
        unknown = set(config) - {
            "max_batch_size",
            "batch_wait_timeout_s",
            "stream_batching_interval_ms",
        }
        if unknown:
            raise ValueError(f"user_config: unknown field(s) {sorted(unknown)}")
        self.max_batch_size = int(config.get("max_batch_size", self.max_batch_size))
        self.batch_wait_timeout_s = float(
            config.get("batch_wait_timeout_s", self.batch_wait_timeout_s)
        )
        self.stream_batching_interval_ms = float(
            config.get("stream_batching_interval_ms", self.stream_batching_interval_ms)
        )
        for name in self.BATCHED:
            method = getattr(self, name)
            method.set_max_batch_size(self.max_batch_size)
            wait = 0.0 if name in self.CONTINUOUS else self.batch_wait_timeout_s
            method.set_batch_wait_timeout_s(wait)

    def check_health(self) -> None:
        """Serve's health check: raises when the worker thread has been busy for too long."""
        if self.busy_since is not None and time.monotonic() - self.busy_since > STUCK_AFTER_S:
            raise RuntimeError(f"an engine call has been running for over {STUCK_AFTER_S:.0f} s")

    def replica_info(self) -> dict[str, Any]:
        """The `replica` part of GET /v1/models: who answered, its batching and counters."""
        context = serve.get_replica_context()
        return {
            "pid": os.getpid(),
            "replica_id": context.replica_id.unique_id,
            "max_batch_size": self.max_batch_size,
            "batch_wait_timeout_s": self.batch_wait_timeout_s,
            "stream_batching_interval_ms": self.stream_batching_interval_ms,
            "stats": self.stats,
        }

    async def _compute(self, fn: Callable, *args: Any) -> Any:
        """Run fn(*args) on the worker thread, timed for `check_health`."""

        def timed() -> Any:
            self.busy_since = time.monotonic()
            try:
                return fn(*args)
            finally:
                self.busy_since = None

        return await asyncio.get_running_loop().run_in_executor(self.executor, timed)

    def _count_arrivals(self, endpoint: str, requests: list[list[Any]]) -> dict[str, int]:
        stats = self.stats[endpoint]
        stats["requests"] += len(requests)
        stats["items"] += sum(len(jobs) for jobs in requests)
        return stats

    async def _run_sliced(self, endpoint: str, work: Generator[int, None, Any]) -> Any:
        """Run `work` one slice per engine-lock turn: between two slices, calls of the other
        endpoints (queued on the lock, which is first come first served) get the thread."""
        stats = self.stats[endpoint]
        while True:
            async with self.engine_lock:
                done, value = await self._compute(next_slice, work)
            if done:
                return value
            stats["slices"] += 1
            stats["largest_slice"] = max(stats["largest_slice"], value)

    async def _run_batch(
        self, endpoint: str, requests: list[list[Any]], run: Run
    ) -> list[list[Any]]:
        """The answers of a Serve batch of requests (each a list of jobs)."""
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
                answers.extend(await self._run_sliced(endpoint, run([job])))
            out.append(answers)
        return out

    async def _merged(self, endpoint: str, requests: list[list[Any]], run: Run) -> list[list[Any]]:
        """Run `requests` together with every request of `endpoint` still waiting (ModelServer's
        docstring, step 3); the first batch to get the engine answers the others' too."""
        loop = asyncio.get_running_loop()
        mine = [(jobs, loop.create_future()) for jobs in requests]
        self.waiting[endpoint].extend(mine)
        self.arrived[endpoint].set()
        stats = self.stats[endpoint]

        def answered() -> bool:
            return all(future.done() for _, future in mine)

        while not answered():
            async with self.engine_lock:
                if answered():  # an earlier call took ours along
                    break
                await self._linger(endpoint)
                queue = self.waiting[endpoint]
                taken, self.waiting[endpoint] = (
                    queue[: self.max_batch_size],
                    queue[self.max_batch_size :],
                )
            if not taken:  # ours are being run by another call: wait for it (or a requeue)
                self.arrived[endpoint].clear()
                requeued = asyncio.ensure_future(self.arrived[endpoint].wait())
                pending = [f for _, f in mine if not f.done()]
                await asyncio.wait([*pending, requeued], return_when=asyncio.FIRST_COMPLETED)
                requeued.cancel()
                continue
            stats["batches"] += 1
            stats["largest_batch"] = max(stats["largest_batch"], len(taken))
            flat = [job for jobs, _ in taken for job in jobs]
            started = time.monotonic()
            try:
                answers = await self._run_sliced(endpoint, run(flat))  # the engine pads, chunks
            except asyncio.CancelledError:
                # This request was cancelled: the others it took go back to the front of the
                # queue for the next engine call.
                self.waiting[endpoint][:0] = [t for t in taken if not t[1].done()]
                self.arrived[endpoint].set()
                raise
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                fail(taken, exc)
                continue
            self.last_call_s[endpoint] = time.monotonic() - started
            start = 0
            for jobs, future in taken:
                if not future.done():
                    future.set_result(answers[start : start + len(jobs)])
                start += len(jobs)
        return [future.result() for _, future in mine]

    async def _linger(self, endpoint: str) -> None:
        """Wait for more requests before an engine call that is not full."""
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


def fail(waiting: Iterable[tuple[Any, asyncio.Future]], exc: BaseException) -> None:
    """Hand `exc` to every (job, future) pair still waiting for its answer."""
    for _, future in waiting:
        if not future.done():
            future.set_exception(exc)
