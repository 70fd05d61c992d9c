"""Corpus inputs: find the files, cut them into work units, read a unit's documents.

No Ray here: the driver plans units from file metadata only (never the text), and each Ray
actor reads its own units. A unit is small and bounded (`unit_bytes`), so neither the driver
nor a worker ever holds more than one unit of text, whatever the corpus size.

Documents: a whole text file (default), one line of a text file (`line_docs`), one JSONL line
(its `text` field), or one Parquet row (its text column). Blank documents are ignored.
Every document is normalised (`nlm.tokenizers.base.normalize_text`: no byte order mark, LF
line ends) before it is split or tokenized, so a file saved with a BOM and CRLF gives the same
shards as the same text saved plainly; the bytes returned with it are the normalised text's.
Every bad document is either an NLMError naming file and line, or, with skip_bad, a counted
skip (`Skips`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nlm.errors import NLMError
from nlm.shards import filesystem
from nlm.tokenizers.base import normalize_text

FORMATS = ("text", "jsonl", "parquet")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
_READ_CHUNK = 1 << 20
_BOM_BYTES = "\ufeff".encode()


@dataclasses.dataclass(frozen=True)
class Source:
    uri: str  # absolute local path or scheme://path
    size: int
    format: str


def _format_of(uri: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = uri.rsplit("/", 1)[-1].lower()
    for suffix, found in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return found
    return "text"


def _display(fs: pafs.FileSystem, path: str, pattern: str) -> str:
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return pattern.split("://", 1)[0] + "://" + path


def _hidden(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith((".", "_"))  # .part files, _SUCCESS markers


def find_sources(patterns: list[str], fmt: str = "auto") -> list[Source]:
    """Files named by paths, directories (recursive) and globs, sorted and deduplicated."""
    if fmt != "auto" and fmt not in FORMATS:
        raise NLMError(f"--format {fmt!r}: expected auto or one of {', '.join(FORMATS)}")
    found: dict[str, Source] = {}
    for pattern in patterns:
        matches: list[pafs.FileInfo] = []
        fs, path = filesystem(pattern)
        if any(c in path for c in "*?["):
            # List from the deepest directory without wildcards, match component by component.
            parts = path.split("/")
            fixed = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
            base = "/".join(parts[:fixed]) or "/"
            depth = len(parts)
            try:
                infos = fs.get_file_info(pafs.FileSelector(base, recursive="**" in path))
            except (FileNotFoundError, NotADirectoryError):
                infos = []
            except OSError as exc:
                raise NLMError(f"{pattern}: cannot list ({exc})") from None
            for info in infos:
                same_depth = "**" in path or len(info.path.split("/")) == depth
                if info.is_file and same_depth and fnmatch.fnmatchcase(info.path, path):
                    matches.append(info)
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                selector = pafs.FileSelector(path, recursive=True)
                matches = [i for i in fs.get_file_info(selector) if i.is_file]
            elif info.type == pafs.FileType.File:
                matches = [info]
            else:
                raise NLMError(f"{pattern}: no such file or directory")
        matches = [m for m in matches if not _hidden(m.path)]
        if not matches:
            raise NLMError(f"{pattern}: matches no files")
        for m in matches:
            uri = _display(fs, m.path, pattern)
            found[uri] = Source(uri, int(m.size or 0), _format_of(uri, fmt))
    if not found:
        raise NLMError("no input files given")
    return [found[k] for k in sorted(found)]


# --- work units -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
    """A bounded piece of work: several small whole files, a byte range of one line-oriented
    file (lines that *start* in [start, end)), or one Parquet row group."""

    index: int
    format: str
    files: tuple[tuple[str, int], ...]  # (uri, size)
    start: int = 0
    end: int = 0
    row_group: int = -1
    first_row: int = 0  # parquet: row number of the group's first row in the file

    @property
    def nbytes(self) -> int:
        if self.row_group >= 0:
            return self.end - self.start  # the group's share of the file size
        return self.end - self.start if self.end else sum(size for _, size in self.files)

    @property
    def key(self) -> str:
        """Stable across runs, across added files and across moving the corpus to another
        directory or bucket (seeds per-unit randomness): the file's name, not its path."""
        name = self.files[0][0].rstrip("/").rsplit("/", 1)[-1]
        return f"{name}|{self.start}|{self.row_group}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Unit:
        data = json.loads(text)
        data["files"] = tuple(tuple(f) for f in data["files"])
        return cls(**data)


def plan_units(
    sources: list[Source],
    *,
    line_docs: bool,
    unit_bytes: int,
    max_doc_bytes: int,
    text_column: str,
    skips: Skips,
) -> list[Unit]:
    """Cut the sources into units of about unit_bytes, in source order (= stream order)."""
    units: list[Unit] = []
    group: list[tuple[str, int]] = []

    def close_group() -> None:
        if group:
            units.append(Unit(len(units), "text", tuple(group)))
            group.clear()

    for src in sources:
        if src.format == "text" and not line_docs:
            if src.size > max_doc_bytes:
                close_group()
                skips.add(
                    "too_long",
                    f"{src.uri}: document is {src.size} bytes, over --max-doc-bytes {max_doc_bytes}",
                )
                continue
            if group and sum(s for _, s in group) + src.size > unit_bytes:
                close_group()
            group.append((src.uri, src.size))
            continue
        close_group()
        if src.format == "parquet":
            units.extend(_parquet_units(src, len(units), text_column, skips))
            continue
        for start in range(0, max(src.size, 1), unit_bytes):
            end = min(start + unit_bytes, src.size)
            units.append(Unit(len(units), src.format, ((src.uri, src.size),), start, end))
    close_group()
    return units


def _parquet_units(src: Source, first_index: int, text_column: str, skips: Skips) -> list[Unit]:
    fs, path = filesystem(src.uri)
    try:
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
            names = meta.schema.to_arrow_schema().names
    except (OSError, pa.ArrowInvalid) as exc:
        skips.add("unreadable", f"{src.uri}: cannot read as Parquet ({exc})")
        return []
    if text_column not in names:
        skips.add(
            "missing_text",
            f"{src.uri} (field '{text_column}'): no such column (columns: {', '.join(names)})",
        )
        return []
    units, row = [], 0
    total_rows = max(meta.num_rows, 1)
    for g in range(meta.num_row_groups):
        rows = meta.row_group(g).num_rows
        # Byte share of the file, for the progress bar only.
        start, end = src.size * row // total_rows, src.size * (row + rows) // total_rows
        files = ((src.uri, src.size),)
        units.append(Unit(first_index + len(units), "parquet", files, start, end, g, row))
        row += rows
    return units


# --- reading documents --------------------------------------------------------------------------


class Skips:
    """Bad documents: raise (default) or count and keep a few messages (skip_bad)."""

    EXAMPLES = 20

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.reasons: dict[str, int] = {}
        self.examples: list[str] = []

    def add(self, reason: str, message: str) -> None:
        if not self.skip_bad:
            raise NLMError(message)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        if len(self.examples) < self.EXAMPLES:
            self.examples.append(message)

    def merge(self, reasons: dict[str, int], examples: list[str]) -> None:
        for reason, n in reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + n
        self.examples.extend(examples[: self.EXAMPLES - len(self.examples)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": sum(self.reasons.values()),
            "reasons": dict(sorted(self.reasons.items())),
            "examples": self.examples,
        }


def is_val(doc: bytes, val_fraction: float) -> bool:
    """The split of a document, from its content only: stable when files are added or moved."""
    if val_fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(doc, digest_size=8).digest(), "big")
    return h < val_fraction * 2.0**64


def read_documents(
    unit: Unit, *, line_docs: bool, text_column: str, max_doc_bytes: int, skips: Skips
) -> Iterator[tuple[str, bytes]]:
    """(text, utf-8 bytes) of each non-blank document of the unit, in file order, both
    normalised (`normalize_text`)."""
    if unit.format == "parquet":
        docs = _parquet_documents(unit, text_column, max_doc_bytes, skips)
    elif unit.format == "text" and not line_docs:
        docs = _file_documents(unit, skips)
    else:
        docs = _line_documents(unit, text_column, max_doc_bytes, skips)
    for text, raw in docs:
        clean = normalize_text(text)
        if len(clean) != len(text):  # normalising only ever removes characters
            if not clean.strip():
                continue  # a byte order mark alone
            text, raw = clean, clean.encode("utf-8")
        yield text, raw


def _line_number(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _file_documents(unit: Unit, skips: Skips) -> Iterator[tuple[str, bytes]]:
    for uri, _ in unit.files:
        fs, path = filesystem(uri)
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
        except OSError as exc:
            skips.add("unreadable", f"{uri}: cannot read ({_reason(exc)})")
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = _line_number(data, exc.start)
            skips.add("not_utf8", f"{uri}:{line}: not valid UTF-8 (byte offset {exc.start})")
            continue
        if text.strip():
            yield text, data


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.split("Detail: ", 1)[-1]  # pyarrow: "Error reading bytes ... Detail: [errno 5] ..."


def _read_range(
    fs: pafs.FileSystem, path: str, unit: Unit, max_doc_bytes: int
) -> tuple[bytes, int]:
    """The bytes of the lines that start in [start, end), and the file offset of the first."""
    with fs.open_input_file(path) as f:
        begin = unit.start
        if begin > 0:
            # A line starts at `start` only if the byte before it ends a line; otherwise the
            # previous unit owns the partial line and this unit starts after its newline.
            f.seek(begin - 1)
            head = f.read(unit.end - begin + 1)
            cut = head.find(b"\n")
            if cut < 0 or begin + cut >= unit.end:
                return b"", unit.end
            data = head[cut + 1 :]
            begin = begin + cut
        else:
            data = f.read(unit.end)
        if data and not data.endswith(b"\n") and f.tell() < unit.files[0][1]:
            # Finish the last line, which runs into the next unit's range; bounded by the
            # document limit (the rest of an over-long line is never read).
            last = data.rfind(b"\n") + 1
            tail = [data]
            length = len(data) - last
            while length <= max_doc_bytes:
                chunk = f.read(min(_READ_CHUNK, max_doc_bytes + 1 - length + 1))
                if not chunk:
                    break
                cut = chunk.find(b"\n")
                if cut >= 0:
                    tail.append(chunk[: cut + 1])
                    break
                tail.append(chunk)
                length += len(chunk)
            data = b"".join(tail)
        return data, begin


def _count_lines(fs: pafs.FileSystem, path: str, offset: int) -> int:
    """Newlines before `offset` (only called to name the line of an error)."""
    count = 0
    with fs.open_input_stream(path) as f:
        remaining = offset
        while remaining > 0:
            chunk = f.read(min(_READ_CHUNK, remaining))
            if not chunk:
                break
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count


def _line_documents(
    unit: Unit, text_column: str, max_doc_bytes: int, skips: Skips
) -> Iterator[tuple[str, bytes]]:
    uri = unit.files[0][0]
    fs, path = filesystem(uri)
    try:
        data, begin = _read_range(fs, path, unit, max_doc_bytes)
    except OSError as exc:
        skips.add("unreadable", f"{uri}: cannot read ({_reason(exc)})")
        return
    first_line: list[int] = []  # computed on the first error only

    def where(index: int) -> str:
        if not first_line:
            first_line.append(_count_lines(fs, path, begin) + 1)
        return f"{uri}:{first_line[0] + index}"

    jsonl = unit.format == "jsonl"
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for index, line in enumerate(lines):
        if line.endswith(b"\r"):
            line = line[:-1]
        if index == 0 and begin == 0 and line.startswith(_BOM_BYTES):
            line = line[len(_BOM_BYTES) :]  # the file's byte order mark (json.loads refuses it)
        if len(line) > max_doc_bytes:
            skips.add(
                "too_long", f"{where(index)}: document is over --max-doc-bytes {max_doc_bytes}"
            )
            continue
        if not line.strip():
            continue
        if jsonl:
            doc = _json_text(line, text_column, where, index, skips)
            if doc is not None and doc.strip():
                yield doc, doc.encode("utf-8")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            skips.add("not_utf8", f"{where(index)}: not valid UTF-8 (byte {exc.start} of the line)")
            continue
        yield text, line


def _json_text(line: bytes, column: str, where, index: int, skips: Skips) -> str | None:
    try:
        record = json.loads(line)
    except UnicodeDecodeError as exc:
        skips.add("not_utf8", f"{where(index)}: not valid UTF-8 (byte {exc.start} of the line)")
        return None
    except json.JSONDecodeError as exc:
        skips.add("invalid_json", f"{where(index)}: invalid JSON ({exc.msg}, column {exc.colno})")
        return None
    if not isinstance(record, dict) or column not in record:
        skips.add("missing_text", f"{where(index)} (field '{column}'): missing")
        return None
    text = record[column]
    if not isinstance(text, str):
        skips.add("missing_text", f"{where(index)} (field '{column}'): not a string")
        return None
    return text


def _parquet_documents(
    unit: Unit, text_column: str, max_doc_bytes: int, skips: Skips
) -> Iterator[tuple[str, bytes]]:
    uri = unit.files[0][0]
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            column = pq.ParquetFile(f).read_row_group(unit.row_group, columns=[text_column])[0]
    except (OSError, pa.ArrowInvalid) as exc:
        skips.add("unreadable", f"{uri}: cannot read row group {unit.row_group} ({exc})")
        return
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        values = column.to_pylist()
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        too_long = pc.greater(pc.binary_length(column), max_doc_bytes).to_pylist()
        values = column.to_pylist()
    else:
        skips.add("missing_text", f"{uri} (field '{text_column}'): type {column.type}, not text")
        return
    for i, value in enumerate(values):
        where = f"{uri}: row {unit.first_row + i + 1}"
        if value is None:
            skips.add("missing_text", f"{where} (field '{text_column}'): missing")
            continue
        if isinstance(value, bytes):
            if len(value) > max_doc_bytes:
                skips.add("too_long", f"{where}: document is over --max-doc-bytes {max_doc_bytes}")
                continue
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError as exc:
                skips.add("not_utf8", f"{where}: not valid UTF-8 (byte {exc.start})")
                continue
            raw = value
        else:
            if too_long[i]:
                skips.add("too_long", f"{where}: document is over --max-doc-bytes {max_doc_bytes}")
                continue
            text, raw = value, value.encode("utf-8")
        if text.strip():
            yield text, raw
