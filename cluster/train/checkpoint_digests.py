"""SHA-256 digests of the DeepSpeed checkpoints a run writes, checked before `--resume` loads one.

DeepSpeed 0.19.8 loads its checkpoint files with `torch.load(..., weights_only=False)`
(deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py): unpickling, so a file
planted in checkpoint storage runs code in every training worker that resumes from it. The
loop's own per-rank state (rank_*.pt) is loaded with weights_only=True; for DeepSpeed's files
the run records each file's digest when it writes the checkpoint, in the run directory
(RUN/checkpoint_digests.json, beside metrics.jsonl, which may live on other storage than the
checkpoints), and a resume refuses a checkpoint whose files are not exactly those. Write
access to the run directory itself remains code execution (docs/OPERATIONS.md, "Security
model").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from nlm.errors import NLMError
from nlm.files import locked, write_json

DIGESTS = "checkpoint_digests.json"
UNCHECKED = ("meta.json",)  # plain JSON, read with json.loads


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    """The checked files under a checkpoint directory, by relative path."""
    return {
        str(p.relative_to(directory)): p
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in UNCHECKED
    }


def record_digests(run_dir: Path, step: int, directory: Path) -> None:
    """Add the digests of the files this rank wrote into `directory` (its staging directory for
    the checkpoint of `step`) to RUN/checkpoint_digests.json. Every rank calls it after its own
    save and before the barrier; ranks may write files of the same name (each digest is kept)."""
    digests = {name: file_digest(path) for name, path in _files(directory).items()}
    path = run_dir / DIGESTS
    with locked(path):
        record = json.loads(path.read_text()) if path.is_file() else {}
        files = record.setdefault(str(step), {})
        for name, digest in digests.items():
            files[name] = sorted({*files.get(name, []), digest})
        write_json(path, record, sort_keys=True)


def verify_digests(run_dir: Path, checkpoint: Path) -> None:
    """NLMError unless every file under `checkpoint` has a digest recorded when the run wrote
    that step (meta.json names it). A file with no record (planted) or a changed file is
    refused; recorded files absent here are allowed (a node may hold only its own ranks')."""
    path = run_dir / DIGESTS
    try:
        step = json.loads((checkpoint / "meta.json").read_text())["step"]
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NLMError(f"{checkpoint}: cannot check it against {path} ({exc})") from None
    expected = record.get(str(step))
    if expected is None:
        raise NLMError(
            f"{checkpoint}: no digests recorded for step {step} in {path}; refusing to resume "
            "from a checkpoint this run did not write (DeepSpeed unpickles its files)"
        )
    for name, file in _files(checkpoint).items():
        if name not in expected:
            raise NLMError(f"{file}: not written by this run (no recorded digest); refusing it")
        if file_digest(file) not in expected[name]:
            raise NLMError(f"{file}: changed since the run wrote it (digest mismatch); refusing it")
