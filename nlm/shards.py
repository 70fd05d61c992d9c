"""The shard format that `nlm prepare` writes and `nlm train` reads (plain pyarrow, no Ray).

    SHARDS/manifest.json        written last; its presence means the directory is complete
    SHARDS/tokenizer/           the tokenizer the ids come from
    SHARDS/train/part-00000.parquet ...   SHARDS/val/part-00000.parquet ...

clm rows: `input_ids: list<int32>` of exactly seq_len+1 tokens and `stream_pos: int64`. Row r
is the slice stream[r*L : r*L+L+1] of its split's token stream (documents joined by `</s>`), so
row r+1 starts with row r's last token and x=row[:-1], y=row[1:] covers every position once.
mlm rows: `input_ids` = [CLS] A [SEP] B [SEP], `token_type_ids: list<int8>`, `nsp_label: int8`.
Rows follow stream order across files (part numbers ascending).

This module also holds the pieces of the writer that define the format: `ClmPacker` (the stream
-> rows rule) and `ShardWriter` (temp names, renamed when a file is complete).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import posixpath
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nlm.config import Config
from nlm.errors import NLMError

# Bumped when the same command would write different shards. 2: one-sentence documents give
# MLM rows (their halves as A and B) instead of none.
PIPELINE_VERSION = 2
OBJECTIVES = ("clm", "mlm", "span")
SPLITS = ("train", "val")
MANIFEST = "manifest.json"

CLM_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("stream_pos", pa.int64())])
MLM_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("token_type_ids", pa.list_(pa.int8())),
        ("nsp_label", pa.int8()),
    ]
)

# span (T5's span corruption, nlm.objectives.span_corrupt): the encoder's input and the decoder's
# targets, both ending with </s>; the sentinels are the tokenizer's last tokens, <extra_id_k>
# (nlm/tokenizers/sentinels.py; manifest tokenizer.sentinels, settings first_sentinel, sentinels).
SPAN_SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("target_ids", pa.list_(pa.int32())),
        ("stream_pos", pa.int64()),
    ]
)


def schema_for(objective: str) -> pa.Schema:
    return {"clm": CLM_SCHEMA, "span": SPAN_SCHEMA}.get(objective, MLM_SCHEMA)


@dataclasses.dataclass
class Manifest(Config):
    """manifest.json. `splits[s]["files"]` are paths relative to the shard directory, in order."""

    pipeline_version: int
    objective: str
    seq_len: int
    seed: int
    tokenizer: dict[str, Any]  # {kind, vocab_size, fingerprint}
    sources: list[dict[str, Any]]  # [{path, bytes}]
    splits: dict[str, dict[str, Any]]  # {train|val: {rows, tokens, documents, files}}
    skipped: dict[str, Any]  # {documents, reasons {reason: n}, examples [message]}
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # the rest of the config

    def files(self, split: str) -> list[str]:
        return list(self.splits.get(split, {}).get("files", []))


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else str(Path(base, *parts))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path) for a local path or any URI pyarrow understands (s3://, gs://)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise NLMError(f"{uri}: cannot open this filesystem ({exc})") from None


def read_manifest(directory: str | Path) -> Manifest:
    """The validated manifest of a complete shard directory (NLMError otherwise)."""
    directory = str(directory)
    path = _join(directory, MANIFEST)
    fs, fs_path = filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise NLMError(
            f"{path}: missing (not a shard directory, or `nlm prepare` did not finish)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NLMError(f"{path}: cannot read ({exc})") from None
    manifest = Manifest.from_json(text, source=path)
    if manifest.pipeline_version != PIPELINE_VERSION:
        raise NLMError(
            f"{path} (field 'pipeline_version'): {manifest.pipeline_version}, this nlm reads "
            f"{PIPELINE_VERSION}; prepare the shards again"
        )
    if manifest.objective not in OBJECTIVES:
        raise NLMError(
            f"{path} (field 'objective'): {manifest.objective!r} is not one of {OBJECTIVES}"
        )
    for key in ("kind", "vocab_size", "fingerprint"):
        if key not in manifest.tokenizer:
            raise NLMError(f"{path} (field 'tokenizer.{key}'): missing")
    for split in SPLITS:
        if split not in manifest.splits:
            raise NLMError(f"{path} (field 'splits.{split}'): missing")
        for name in manifest.files(split):
            file_fs, file_path = filesystem(_join(directory, name))
            if file_fs.get_file_info(file_path).type != pafs.FileType.File:
                raise NLMError(f"{path} (field 'splits.{split}.files'): {name} is missing")
    return manifest


def split_paths(directory: str | Path, manifest: Manifest, split: str) -> list[str]:
    """Full paths of a split's Parquet files, in stream order."""
    return [_join(str(directory), name) for name in manifest.files(split)]


def check_tokenizer(manifest: Manifest | str | Path, tokenizer_dir: str | Path) -> None:
    """Refuse shards whose ids come from another tokenizer than the one in `tokenizer_dir`."""
    from nlm.tokenizers.base import fingerprint

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    if not Path(tokenizer_dir).is_dir():
        raise NLMError(f"{tokenizer_dir}: no such tokenizer directory")
    found = fingerprint(tokenizer_dir)
    expected = manifest.tokenizer["fingerprint"]
    if found != expected:
        raise NLMError(
            f"{tokenizer_dir}: tokenizer fingerprint {found[:12]} does not match the shards' "
            f"manifest ({manifest.tokenizer['kind']}, {expected[:12]}); the token ids would mean "
            "other words. Use the tokenizer/ saved next to the shards, or prepare them again"
        )


# --- writing -----------------------------------------------------------------------------------


class ClmPacker:
    """Cuts one split's token stream into rows of seq_len+1 tokens, overlapping by one.

    Tokens arrive in pieces (one per work unit); at most seq_len tokens wait between pieces.
    The tail that never fills a row (< seq_len+1 tokens) is dropped at the end: no padding.
    """

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.carry = np.zeros(0, dtype=np.int32)
        self.rows = 0  # rows emitted so far = stream_pos of the next row
        self.tokens = 0  # tokens pushed so far (the split's stream length)

    def push(self, tokens: np.ndarray) -> pa.Table | None:
        """Rows completed by `tokens` as a CLM_SCHEMA table (None when no row is complete)."""
        self.tokens += len(tokens)
        stream = np.concatenate([self.carry, tokens.astype(np.int32, copy=False)])
        width = self.seq_len + 1
        n = (len(stream) - 1) // self.seq_len if len(stream) >= width else 0
        if n == 0:
            self.carry = stream
            return None
        # Row i = stream[i*L : i*L+L+1]: a strided view, copied once into the Arrow buffer.
        view = np.lib.stride_tricks.as_strided(
            stream, shape=(n, width), strides=(self.seq_len * 4, 4), writeable=False
        )
        values = pa.array(np.ascontiguousarray(view).reshape(-1), type=pa.int32())
        offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
        table = pa.table(
            {
                "input_ids": pa.ListArray.from_arrays(offsets, values),
                "stream_pos": pa.array(np.arange(self.rows, self.rows + n, dtype=np.int64)),
            },
            schema=CLM_SCHEMA,
        )
        self.rows += n
        self.carry = stream[n * self.seq_len :].copy()
        return table


class ShardWriter:
    """Writes one split as part-00000.parquet, part-00001.parquet, ... of `rows_per_file` rows.

    A file is written under a hidden temporary name and renamed when it is complete, so a
    crash never leaves a file that looks finished. The row grouping depends on the rows only,
    never on how they arrived, so the same rows give byte-identical files.
    """

    def __init__(
        self, fs: pafs.FileSystem, directory: str, split: str, schema: pa.Schema, rows_per_file: int
    ) -> None:
        self.fs, self.directory, self.split, self.schema = fs, directory, split, schema
        self.rows_per_file = rows_per_file
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[str] = []  # relative to the shard directory
        self.rows = 0
        fs.create_dir(_join(directory, split), recursive=True)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_file:
            merged = pa.concat_tables(self.pending)
            self._flush(merged.slice(0, self.rows_per_file))
            rest = merged.slice(self.rows_per_file)
            self.pending, self.pending_rows = [rest], rest.num_rows

    def close(self) -> list[str]:
        if self.pending_rows or not self.files:  # an empty split still gets one (empty) file
            self._flush(
                pa.concat_tables(self.pending) if self.pending else self.schema.empty_table()
            )
        self.pending, self.pending_rows = [], 0
        return self.files

    def _flush(self, table: pa.Table) -> None:
        name = f"{self.split}/part-{len(self.files):05d}.parquet"
        final = _join(self.directory, name)
        temp = _join(self.directory, self.split, f".{name.rsplit('/', 1)[-1]}.{_unique()}.tmp")
        table = table.combine_chunks()  # one chunk: the file does not depend on arrival order
        with self.fs.open_output_stream(temp) as sink:
            pq.write_table(table, sink, row_group_size=8192, compression="snappy")
        self.fs.move(temp, final)
        self.files.append(name)
        self.rows += table.num_rows


def write_manifest(fs: pafs.FileSystem, directory: str, manifest: Manifest) -> None:
    """manifest.json, through a temporary name: the last thing `nlm prepare` writes."""
    temp = _join(directory, f".{MANIFEST}.{_unique()}.tmp")  # never shared by two writers
    try:
        with fs.open_output_stream(temp) as sink:
            sink.write((json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        fs.move(temp, _join(directory, MANIFEST))
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(temp)
        raise


def _unique() -> str:
    """A temporary-name suffix (pyarrow file systems have no mkstemp; nlm.files is local-only)."""
    return uuid.uuid4().hex[:12]


# --- reading -----------------------------------------------------------------------------------


def iter_tables(directory: str | Path, split: str) -> Iterator[pa.Table]:
    """A split's files as tables, in stream order (for tests, evaluation and small readers)."""
    manifest = read_manifest(directory)
    for path in split_paths(directory, manifest, split):
        fs, fs_path = filesystem(path)
        yield pq.read_table(fs_path, filesystem=fs)


def clm_stream(directory: str | Path, split: str) -> np.ndarray:
    """The packed token stream of a clm split, rebuilt from its rows (row r+1 drops its first
    token, which repeats row r's last)."""
    pieces: list[np.ndarray] = []
    for table in iter_tables(directory, split):
        column = table.column("input_ids").combine_chunks()
        if len(column) == 0:
            continue
        rows = column.values.to_numpy().reshape(len(column), -1)
        if not pieces:
            pieces.append(rows[0, :1])
        pieces.append(rows[:, 1:].reshape(-1))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
