"""From a worker's share of the shards to micro-batches (no Ray in here; see train_loop.py).

A worker reads its rows in chunks (Ray Data's `iter_torch_batches(batch_size=chunk_rows)`, or
pyarrow when run without Ray) and this module turns each chunk into micro-batches:

- gpt / fnn (clm): the chunk's rows are shuffled with a generator seeded by (seed, epoch,
  rank, chunk), so the order is reproducible and a resumed run can skip to the same place.
- rnn / lstm (clm): the chunk is laid out as B parallel contiguous streams, as in PyTorch's
  word_language_model example: stream b holds rows [b*K, (b+1)*K) of the chunk, and micro-batch
  k is window k of every stream. Consecutive micro-batches therefore continue each stream, and
  the loop carries the hidden state across them (detached: truncated BPTT). A stream's state is
  reset where its rows are not consecutive in the packed stream (`stream_pos` jumps: a chunk or
  split-boundary), so no state ever crosses unrelated text. Up to B-1 rows per chunk are left
  over; with the default chunk of 65536 rows that is negligible.
- bert (mlm): rows are shuffled like gpt's and padded per micro-batch (`attention_mask`).

Every rank receives the same number of rows (Ray's `streaming_split(equal=True)`), so every
rank produces the same number of micro-batches per epoch and the ranks stay in step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

Chunk = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]


def table_to_chunk(table: pa.Table, objective: str) -> Chunk:
    """A block of shard rows as tensors. clm: input_ids (n, T+1) int32 and stream_pos (n,);
    mlm: input_ids / token_type_ids (n, Lmax) right-padded with 0, lengths (n,), nsp_label (n,)."""
    ids = table.column("input_ids").combine_chunks()
    n = len(ids)
    if objective == "clm":
        values = ids.values.to_numpy(zero_copy_only=False)
        width = len(values) // n if n else 0
        # One copy per chunk: Arrow's buffers are read-only, torch wants writable memory.
        return {
            "input_ids": torch.from_numpy(np.array(values, dtype=np.int32).reshape(n, width)),
            "stream_pos": torch.from_numpy(table.column("stream_pos").to_numpy().astype(np.int64)),
        }
    if objective == "span":
        inputs, input_lengths = _padded(ids, 0)
        targets, target_lengths = _padded(table.column("target_ids").combine_chunks(), 0)
        return {
            "input_ids": torch.from_numpy(inputs),
            "input_lengths": torch.from_numpy(input_lengths),
            "target_ids": torch.from_numpy(targets),
            "target_lengths": torch.from_numpy(target_lengths),
        }
    lengths = np.diff(ids.offsets.to_numpy())
    longest = int(lengths.max()) if n else 0
    inside = np.arange(longest)[None, :] < lengths[:, None]  # row-major, like the flat values
    input_ids = np.zeros((n, longest), dtype=np.int32)
    input_ids[inside] = ids.values.to_numpy(zero_copy_only=False)
    types = np.zeros((n, longest), dtype=np.int8)
    types[inside] = (
        table.column("token_type_ids").combine_chunks().values.to_numpy(zero_copy_only=False)
    )
    return {
        "input_ids": torch.from_numpy(input_ids),
        "token_type_ids": torch.from_numpy(types),
        "lengths": torch.from_numpy(lengths.astype(np.int64)),
        "nsp_label": torch.from_numpy(table.column("nsp_label").to_numpy().astype(np.int64)),
    }


def _padded(lists: pa.ListArray, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column as an (n, longest) int32 array right-padded with `fill`, and the
    (n,) int64 lengths."""
    lengths = np.diff(lists.offsets.to_numpy()).astype(np.int64)
    longest = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), longest), fill, dtype=np.int32)
    out[np.arange(longest)[None, :] < lengths[:, None]] = lists.values.to_numpy(
        zero_copy_only=False
    )
    return out, lengths


def chunk_rows(chunk: Chunk) -> int:
    return int(chunk["input_ids"].shape[0])


def chunk_generator(seed: int, epoch: int, rank: int, index: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + rank) * 65_537 + index)
    return g


def micro_batches(
    chunks: Iterable[Chunk],
    *,
    kind: str,
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int,
    shuffle: bool,
    rows_seen: list[int] | None = None,
) -> Iterator[Batch]:
    """Micro-batches of one epoch. kind: "clm", "stream" (rnn/lstm) or "mlm".

    clm batches: {"input_ids": (B, T+1) int64}; stream batches add {"reset": (B,) bool};
    mlm batches: {"input_ids", "token_type_ids", "attention_mask" (B, L), "nsp_label" (B,)};
    span batches: {"input_ids", "attention_mask" (B, S), "targets" (B, T) (-100 padded)}.
    rows_seen, if given, accumulates the rows read (to report rows dropped by the split).
    """
    for index, chunk in enumerate(chunks):
        n = chunk_rows(chunk)
        if rows_seen is not None:
            rows_seen[0] += n
        if kind == "stream":
            yield from _stream_windows(chunk, batch_size)
            continue
        if shuffle:
            order = torch.randperm(n, generator=chunk_generator(seed, epoch, rank, index))
        else:
            order = torch.arange(n)
        for start in range(0, n - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            if kind == "span":
                yield _span_batch(chunk, rows)
            else:
                yield _clm_batch(chunk, rows) if kind == "clm" else _mlm_batch(chunk, rows)


def _clm_batch(chunk: Chunk, rows: torch.Tensor) -> Batch:
    return {"input_ids": chunk["input_ids"][rows].long()}


def _mlm_batch(chunk: Chunk, rows: torch.Tensor) -> Batch:
    lengths = chunk["lengths"][rows]
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return {
        "input_ids": chunk["input_ids"][rows, :width].long(),
        "token_type_ids": chunk["token_type_ids"][rows, :width].long(),
        "attention_mask": mask.long(),
        "nsp_label": chunk["nsp_label"][rows],
    }


def _span_batch(chunk: Chunk, rows: torch.Tensor) -> Batch:
    """Encoder input (B, S) with its attention_mask; decoder targets (B, T), -100 past the end."""
    in_len, out_len = chunk["input_lengths"][rows], chunk["target_lengths"][rows]
    width, depth = int(in_len.max()), int(out_len.max())
    targets = chunk["target_ids"][rows, :depth].long()
    targets[torch.arange(depth)[None, :] >= out_len[:, None]] = -100  # IGNORE_INDEX
    return {
        "input_ids": chunk["input_ids"][rows, :width].long(),
        "attention_mask": (torch.arange(width)[None, :] < in_len[:, None]).long(),
        "targets": targets,
    }


def _stream_windows(chunk: Chunk, streams: int) -> Iterator[Batch]:
    n = chunk_rows(chunk)
    per_stream = n // streams
    if per_stream == 0:
        return
    used = streams * per_stream
    rows = chunk["input_ids"][:used].view(streams, per_stream, -1)
    pos = chunk["stream_pos"][:used].view(streams, per_stream)
    for k in range(per_stream):
        if k == 0:
            reset = torch.ones(streams, dtype=torch.bool)  # a new chunk: new streams
        else:
            reset = pos[:, k] != pos[:, k - 1] + 1  # a gap in the packed stream
        yield {"input_ids": rows[:, k].long(), "reset": reset}


def batches_per_epoch(rows: int, *, kind: str, batch_size: int, chunk: int) -> int:
    """How many micro-batches `micro_batches` yields from `rows` rows read in chunks of `chunk`."""
    full, rest = divmod(rows, chunk)
    return full * (chunk // batch_size) + rest // batch_size


def reset_state(state: Any, reset: torch.Tensor) -> Any:
    """Detach a recurrent state (truncated BPTT) and zero the streams flagged in `reset`.

    States are tensors shaped (n_layer, B, H) or tuples/lists of them (the LSTM's (h, c)).
    """
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return type(state)(reset_state(s, reset) for s in state)
    keep = (~reset).to(state.dtype).view(1, -1, *([1] * (state.dim() - 2)))
    return state.detach() * keep.to(state.device)


def state_to(state: Any, device: torch.device | str) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple | list):
        return type(state)(state_to(s, device) for s in state)
    return state.detach().to(device)
