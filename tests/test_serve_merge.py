"""The replica's batch merging (serve/deployments.py, `_merged`), driven directly.

Three groups of requests queue behind a running engine call, as Serve's batcher leaves them
during a long generation: the second group's call answers the third group too, and the third
must then return its answers rather than look for work that is gone.
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
