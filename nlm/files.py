"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file nlm writes for others to read (configs, plans, metrics, reports, results, the
serving checkpoint) goes through here:

    write_text(path, text); write_bytes(path, data); write_json(path, obj)
    with atomic_open(path) as f: ...          # streamed writes, same guarantee
    replace_dir(new_dir, target)              # swap a finished directory in by renames
    with locked(path): ...                    # serialise read-modify-write of one file

The data goes to a unique temporary name in the same directory (so two writers never share
one: a fixed ".tmp" name let two `nlm eval --record` runs interleave their bytes), is flushed
and fsynced, then `os.replace`d over the target (atomic on POSIX within one file system), and
the directory is fsynced so the rename itself survives a power cut. On any error the temporary
file is removed and the target is left as it was.

Local paths only: pyarrow file systems (S3, GCS) have their own write-then-move in nlm.shards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not every file system lets a directory be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object writing to a unique temporary sibling of `path`; on a clean exit it is
    fsynced and renamed over `path`, on an exception it is deleted (path untouched).

    mode: "w" (text, `encoding`) or "wb". The parent directory is created when missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r} is not 'w' or 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain open() would not
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see the module docstring); returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns the path."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any, *, indent: int | None = 2, **dumps: Any) -> Path:
    """`json.dumps(data, indent=indent, **dumps)` plus a newline, written atomically."""
    return write_text(path, json.dumps(data, indent=indent, **dumps) + "\n")


def temp_dir_for(target: str | Path) -> Path:
    """A new, empty, uniquely named directory beside `target`, for building its replacement
    (same file system, so `replace_dir` can rename it in)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; a plain mkdir would not
    return path


def replace_dir(new: str | Path, target: str | Path) -> Path:
    """Put the finished directory `new` at `target`, replacing what was there, by renames.

    The old directory is first renamed aside (to a hidden sibling), then `new` is renamed to
    `target`, then the old one is deleted. Unlike deleting the old directory first, a crash at
    any point leaves a complete directory: the old one (at `target`, or at its hidden name if
    the crash fell between the two renames, where `previous_dir` finds it) or the new one.
    """
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)  # put the old one back
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def previous_dir(target: str | Path) -> Path | None:
    """The old directory `replace_dir` set aside, when a crash left `target` missing."""
    target = Path(target)
    if target.exists() or not target.parent.is_dir():
        return None
    found = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock on `path` + ".lock") for a read-modify-write of
    `path` by several processes (two `nlm eval --record` runs on one checkpoint)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
