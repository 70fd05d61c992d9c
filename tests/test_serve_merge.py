"""The replica's batching (serve/deployments.py), driven directly on the plain class.

- `_merged`: three groups of requests queue behind a running engine call, as Serve's batcher
  leaves them: the second group's call answers the third group too, and the third must then
  return its answers rather than look for work that is gone.
- continuous generation: a request joins a running generation and leaves it when done.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from nlm.serve.deployments import ModelServer, _Caller
from nlm.serve.replica import unsliced


def test_groups_queued_behind_a_call_are_merged_and_all_answered(tiny_checkpoints):
    path = tiny_checkpoints["lstm"]
    server = ModelServer.func_or_class("lstm", str(path), None, 1)  # the plain class
    release = threading.Event()
    calls: list[list[str]] = []

    def run(jobs: list[str]) -> list[str]:
        calls.append(list(jobs))
        if len(calls) == 1:
            release.wait(timeout=30)  # the first call runs until the others have queued
        return [job.upper() for job in jobs]

    async def scenario() -> list[list[list[str]]]:
        run_sliced = unsliced(run)
        first = asyncio.create_task(server._merged("score", [["a"]], run_sliced))
        while not calls:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(server._merged("score", [["b"], ["c"]], run_sliced))
        third = asyncio.create_task(server._merged("score", [["d"]], run_sliced))
        await asyncio.sleep(0.05)  # both are waiting for the engine
        release.set()
        return await asyncio.wait_for(asyncio.gather(first, second, third), timeout=60)

    first, second, third = asyncio.run(scenario())
    assert (first, second, third) == ([["A"]], [["B"], ["C"]], [["D"]])
    assert calls == [["a"], ["b", "c", "d"]]  # the queued groups ran as one call
    stats = server.stats["score"]
    assert stats["batches"] == 2 and stats["largest_batch"] == 3


def test_a_generation_joins_a_running_one_and_leaves_first(tiny_checkpoints):
    """Continuous batching in the replica: a short request sent while a long generation runs
    joins it at the next step and is answered long before it, and both answers are the ones
    each prompt gets alone."""
    path = tiny_checkpoints["gpt"]
    server = ModelServer.func_or_class("gpt", str(path), None, 1)
    engine = server.engine
    long_job = engine.generation_job("the lobster", 50, seed=1, stop_at_eos=False)
    short_job = engine.generation_job("It is closely related", 2, seed=2, stop_at_eos=False)
    gate = threading.Event()

    async def scenario():
        long = asyncio.create_task(server._join_generation([(_Caller(), [long_job])]))
        while server.stats["generate"]["steps"] < 2:
            await asyncio.sleep(0.001)
        # Hold the worker thread so the short request is surely waiting before the next step.
        held = asyncio.get_running_loop().run_in_executor(server.executor, gate.wait, 30)
        short = asyncio.create_task(server._join_generation([(_Caller(), [short_job])]))
        while server.stats["generate"]["requests"] < 2:
            await asyncio.sleep(0.001)
        gate.set()
        await held
        short_answer = await asyncio.wait_for(short, timeout=60)
        long_was_running = not long.done()
        return short_answer, await asyncio.wait_for(long, timeout=60), long_was_running

    [[short_answer]], [[long_answer]], long_was_running = asyncio.run(scenario())
    assert long_was_running
    alone = engine.generate([short_job])[0]
    # The same tokens and text; the log-probs to float32 rounding: the joined row's attention
    # sums over a left-padded cache of another shape, and PyTorch's kernels do not promise
    # bit-identical reductions across shapes (seen: 1 ulp, ~5e-7, on this machine kind).
    assert {k: v for k, v in short_answer.items() if k != "logprobs"} == {
        k: v for k, v in alone.items() if k != "logprobs"
    }
    assert short_answer["logprobs"] == pytest.approx(alone["logprobs"], abs=1e-5)
    assert long_answer["token_ids"] == engine.generate([long_job])[0]["token_ids"]
    stats = server.stats["generate"]
    assert stats["requests"] == 2 and stats["batches"] == 2  # two joins ...
    assert stats["largest_step"] == 2  # ... decoded together
    assert stats["steps"] == 50


def test_a_cancelled_generate_request_leaves_at_the_next_step(tiny_checkpoints):
    """Serve cancels a request's handler when its client leaves, never the running batch: the
    handler cancels its rows (`_Caller.cancel`, what `generate` does on CancelledError) and
    they leave the generation at the next step (issue 14, item 5)."""
    path = tiny_checkpoints["lstm"]
    server = ModelServer.func_or_class("lstm", str(path), None, 1)
    engine = server.engine
    jobs = [engine.generation_job(p, 256, seed=1, stop_at_eos=False) for p in ("the", "blue")]
    stats = server.stats["generate"]
    caller, other = _Caller(), _Caller()
    short = engine.generation_job("a lobster", 20, seed=2, stop_at_eos=False)

    async def scenario() -> tuple[int, int, list]:
        request = asyncio.create_task(server._join_generation([(caller, jobs)]))
        while stats["steps"] < 3:
            await asyncio.sleep(0.001)
        caller.cancel()
        at_cancel = stats["steps"]
        # A request that joins after the cancelled one is still answered in full.
        kept = await server._join_generation([(other, [short])])
        await asyncio.wait_for(asyncio.shield(server.generation_task), timeout=60)
        assert await request == [None]  # its caller is gone: nothing to answer
        return at_cancel, stats["steps"], kept

    at_cancel, final, kept = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert final - at_cancel <= 2 + 20, (at_cancel, final)  # not the 256 steps it asked for
    assert kept == [[engine.generate([short])[0]]]
    assert not server.running and not server.joining


def test_the_task_server_has_the_stuck_check(tmp_path, tiny_checkpoints):
    """The fine-tuned-model server shares the replica machinery, health check included."""
    import time

    import torch

    from nlm.checkpoint import load_checkpoint
    from nlm.finetune.heads import TaskModel, save_task_checkpoint
    from nlm.models import build_model
    from nlm.serve.replica import STUCK_AFTER_S
    from nlm.serve.tasks import TaskServer

    tokenizer = load_checkpoint(tiny_checkpoints["gpt"]).tokenizer
    torch.manual_seed(0)
    model = TaskModel(build_model("gpt", "tiny", vocab_size=256), "classify", ["a", "b"], 0.0)
    path = save_task_checkpoint(tmp_path / "cls", model.eval(), tokenizer)
    server = TaskServer.func_or_class("cls", str(path), None, 1)
    server.check_health()  # idle: healthy
    server.busy_since = time.monotonic() - STUCK_AFTER_S - 1
    with pytest.raises(RuntimeError, match="running for over"):
        server.check_health()
    server.reconfigure({"max_batch_size": 3})
    assert server.max_batch_size == 3 and server._classify_batch._get_max_batch_size() == 3


def test_a_short_request_runs_between_the_slices_of_a_long_one(tiny_checkpoints):
    """Long work is sliced and each slice queues for the worker thread: a fill-mask sent while
    a long bert scoring runs is answered before it (issue 14, item 6)."""
    path = tiny_checkpoints["bert"]
    limits = {"max_slice_cost": 64, "max_request_cost": 10**6}
    server = ModelServer.func_or_class("bert", str(path), limits, 1)
    engine = server.engine
    text = " ".join(["the lobster is blue"] * 10)
    scores = [engine.score_job(text) for _ in range(3)]
    mask = engine.fill_mask_job("the [MASK] is blue", 2)
    finished: list[str] = []

    async def timed(name: str, call) -> None:
        await call
        finished.append(name)

    async def scenario() -> None:
        long = asyncio.create_task(
            timed("score", server._run_batch("score", [scores], engine.score_slices))
        )
        while server.stats["score"]["slices"] < 2:
            await asyncio.sleep(0.001)
        short = server._run_batch("fill-mask", [[mask]], engine.fill_mask_slices)
        await asyncio.gather(long, timed("fill-mask", short))

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert finished == ["fill-mask", "score"]
    stats = server.stats["score"]
    assert stats["slices"] >= 3 * 40 // (64 // 42) // 2 and stats["largest_slice"] <= 64
