"""The replica's batching (serve/deployments.py), driven directly on the plain class.

- `_merged`: three groups of requests queue behind a running engine call, as Serve's batcher
  leaves them: the second group's call answers the third group too, and the third must then
  return its answers rather than look for work that is gone.
- continuous generation: a request joins a running generation and leaves it when done.
"""

from __future__ import annotations

import asyncio
import threading

from test_inference import build_tiny_checkpoints

from nlm.serve.deployments import ModelServer


def test_groups_queued_behind_a_call_are_merged_and_all_answered(tmp_path, data_mirror):
    path = build_tiny_checkpoints(tmp_path, data_mirror)["lstm"]
    server = ModelServer.func_or_class("lstm", str(path), None, 1)  # the plain class
    release = threading.Event()
    calls: list[list[str]] = []

    def run(jobs: list[str]) -> list[str]:
        calls.append(list(jobs))
        if len(calls) == 1:
            release.wait(timeout=30)  # the first call runs until the others have queued
        return [job.upper() for job in jobs]

    async def scenario() -> list[list[list[str]]]:
        first = asyncio.create_task(server._merged("score", [["a"]], run))
        while not calls:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(server._merged("score", [["b"], ["c"]], run))
        third = asyncio.create_task(server._merged("score", [["d"]], run))
        await asyncio.sleep(0.05)  # both are waiting for the engine
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, second, third), timeout=60)

    first, second, third = asyncio.run(scenario())
    assert (first, second, third) == ([["A"]], [["B"], ["C"]], [["D"]])
    assert calls == [["a"], ["b", "c", "d"]]  # the queued groups ran as one call
    stats = server.stats["score"]
    assert stats["batches"] == 2 and stats["largest_batch"] == 3


def test_a_generation_joins_a_running_one_and_leaves_first(tmp_path, data_mirror):
    """Continuous batching in the replica: a short request sent while a long generation runs
    joins it at the next step and is answered long before it, and both answers are the ones
    each prompt gets alone."""
    path = build_tiny_checkpoints(tmp_path, data_mirror)["gpt"]
    server = ModelServer.func_or_class("gpt", str(path), None, 1)
    engine = server.engine
    long_job = engine.generation_job("the lobster", 50, seed=1, stop_at_eos=False)
    short_job = engine.generation_job("It is closely related", 2, seed=2, stop_at_eos=False)
    gate = threading.Event()

    async def scenario():
        long = asyncio.create_task(server._join_generation([[long_job]]))
        while server.stats["generate"]["steps"] < 2:
            await asyncio.sleep(0.001)
        # Hold the worker thread so the short request is surely waiting before the next step.
        held = asyncio.get_running_loop().run_in_executor(server.executor, gate.wait, 30)
        short = asyncio.create_task(server._join_generation([[short_job]]))
        while server.stats["generate"]["requests"] < 2:
            await asyncio.sleep(0.001)
        gate.set()
        await held
        short_answer = await asyncio.wait_for(short, timeout=60)
        long_was_running = not long.done()
        return short_answer, await asyncio.wait_for(long, timeout=60), long_was_running

    [[short_answer]], [[long_answer]], long_was_running = asyncio.run(scenario())
    assert long_was_running
    assert short_answer == engine.generate([short_job])[0]
    assert long_answer["token_ids"] == engine.generate([long_job])[0]["token_ids"]
    stats = server.stats["generate"]
    assert stats["requests"] == 2 and stats["batches"] == 2  # two joins ...
    assert stats["largest_step"] == 2  # ... decoded together
    assert stats["steps"] == 50
