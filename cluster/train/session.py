"""Where a rank's rows, checkpoints and reports come from: Ray Train, or nothing but torch.

- `RaySession` inside a Ray Train worker: the train rows through
  `ray.train.get_dataset_shard("train").iter_torch_batches`, checkpoints through
  `ray.train.report(checkpoint=...)` / `ray.train.get_checkpoint()`.
- `LocalSession` without Ray (torchrun): rows straight from the Parquet files, checkpoints
  written to RUN/checkpoints by every rank (a filesystem they all see).

Both give each rank an equal share of the rows, so the ranks run the same number of steps.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from nlm.cluster.train.batches import Chunk, table_to_chunk
from nlm.cluster.train.plan import CHECKPOINT_PREFIX, CHECKPOINTS, RunPlan, list_checkpoints


class RaySession:
    """A Ray Train worker's view: its dataset shards, the run's checkpoints, `report`."""

    def __init__(self, plan: RunPlan) -> None:
        import ray.train

        self.plan = plan
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.local_world_size = context.get_local_world_size()

    def device(self) -> torch.device:
        if self.plan.device == "cuda":
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def chunks(self, split: str, rows: int) -> Iterator[Chunk]:
        import ray.train
        from ray.data.collate_fn import ArrowBatchCollateFn

        if split == "val":
            # The val split is small and read once per attempt (then cached): plain pyarrow
            # spares a second Ray Data execution, which costs seconds to start on a busy node.
            yield from read_share(self.plan, split, self.rank, self.world_size, rows)
            return
        objective = self.plan.objective

        class ToChunk(ArrowBatchCollateFn):
            def __call__(self, table):  # runs in Ray Data's prefetch thread
                return table_to_chunk(table, objective)

        shard = ray.train.get_dataset_shard(split)
        # A fresh iterator per pass: reusing one across epochs yields nothing the second time.
        yield from shard.iter_torch_batches(
            batch_size=rows, collate_fn=ToChunk(), device="cpu", prefetch_batches=1
        )

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def staging_dir(self, step: int) -> Path:
        # Local disk, not a TemporaryDirectory: Ray copies it to storage during report().
        return Path(tempfile.mkdtemp(prefix=f"nlm-ckpt-{step}-r{self.rank}-"))

    def report(self, metrics: dict[str, Any], directory: Path | None, step: int) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{step:08d}" if directory else None,
        )
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)  # uploaded synchronously


class LocalSession:
    """Without Ray: rank r reads an equal contiguous share of each split with pyarrow, and
    checkpoints go straight to RUN/checkpoints (every rank must see the same filesystem)."""

    def __init__(self, plan: RunPlan) -> None:
        self.plan = plan
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
        self.keep = plan.train.keep_checkpoints

    def device(self) -> torch.device:
        if self.plan.device == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def chunks(self, split: str, rows: int) -> Iterator[Chunk]:
        yield from read_share(self.plan, split, self.rank, self.world_size, rows)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        found = list_checkpoints(self.plan.storage)
        yield Path(found[-1]["path"]) if found else None

    def staging_dir(self, step: int) -> Path:
        path = Path(self.plan.storage) / CHECKPOINTS / f"{CHECKPOINT_PREFIX}{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def report(self, metrics: dict[str, Any], directory: Path | None, step: int) -> None:
        if directory is None or self.rank != 0:
            return
        # meta.json (written before this) marks the directory complete; prune the oldest.
        for old in list_checkpoints(self.plan.storage)[: -self.keep]:
            shutil.rmtree(old["path"], ignore_errors=True)


def read_share(plan: RunPlan, split: str, rank: int, world_size: int, rows: int) -> Iterator[Chunk]:
    """Rank `rank`'s equal contiguous share of a split, straight from the Parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nlm.shards import filesystem

    files = plan.train_files if split == "train" else plan.val_files
    total = plan.train_rows if split == "train" else plan.val_rows
    share = total // world_size  # equal shares, like Ray's split(equal=True)
    first, last = rank * share, (rank + 1) * share
    pending: list[pa.Table] = []
    pending_rows = offset = 0
    for path in files:
        if offset >= last:
            break
        fs, fs_path = filesystem(path)
        table = pq.read_table(fs_path, filesystem=fs)
        start = offset
        offset += table.num_rows
        lo, hi = max(first, start), min(last, offset)
        if lo >= hi:
            continue
        pending.append(table.slice(lo - start, hi - lo))
        pending_rows += hi - lo
        while pending_rows >= rows:
            merged = pa.concat_tables(pending)
            yield table_to_chunk(merged.slice(0, rows), plan.objective)
            pending, pending_rows = [merged.slice(rows)], pending_rows - rows
    if pending_rows:
        yield table_to_chunk(pa.concat_tables(pending), plan.objective)
