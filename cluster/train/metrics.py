"""Where a run's numbers go: RUN/metrics.jsonl, TensorBoard (RUN/tb), and peak FLOP/s for MFU
(the model's own FLOPs per token are a family fact: `LanguageModel.flops_per_token`).

Only rank 0 writes. Every (re)start of the worker group adds an `{"event": "start", ...}` line,
so a restart after a failure shows in the log, and every record carries `attempt` (1 for the
first start, 2 after the first restart or --resume, ...). The steps an attempt trains again
after the checkpoint it resumed from are logged again under the new attempt number;
`read_metrics` returns each step once (the latest attempt's) unless asked for every attempt
(the resume tests compare the two). A line cut short by a kill is cut off before the next
record is appended, so it never glues onto it; each record is appended with one write.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak of one GPU, FLOP/s (datasheet); MFU is reported only for GPUs listed here.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


class MetricsLog:
    """Rank 0's writer; other ranks get one whose methods do nothing."""

    def __init__(self, run_dir: Path | None) -> None:
        self.enabled = run_dir is not None
        self.path = run_dir / "metrics.jsonl" if run_dir else None
        self.tb = None
        self.attempt = 0  # set from the log at the first write
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._cut_partial_line()
        if record.get("event") == "start" or self.attempt == 0:
            self.attempt = self._starts_logged() + (record.get("event") == "start")
        record["attempt"] = max(self.attempt, 1)
        line = (json.dumps(record, sort_keys=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, line)  # one write: a kill cuts at most this line
        finally:
            os.close(fd)
        step = record.get("step")
        if self.tb is not None and step is not None and "event" not in record:
            for key, value in record.items():
                if key in ("step", "time", "epoch") or not isinstance(value, int | float):
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    continue
                self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def _cut_partial_line(self) -> None:
        """Truncate a last line without its newline (a write cut by a kill)."""
        try:
            with open(self.path, "rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size == 0:
                    return
                f.seek(size - 1)
                if f.read(1) == b"\n":
                    return
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        except FileNotFoundError:
            return

    def _starts_logged(self) -> int:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        return sum(1 for line in data.split(b"\n") if (_parse(line) or {}).get("event") == "start")


def _parse(line: bytes | str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _glued(line: bytes) -> dict[str, Any] | None:
    """The whole record at the end of a line whose start was cut by a kill (old writers
    appended the next record right after the cut), or None."""
    start = line.find(b"{", 1)
    while start > 0:
        record = _parse(line[start:])
        if record is not None:
            return record
        start = line.find(b"{", start + 1)
    return None


def _kept(record: dict[str, Any], resumed_from: int | None) -> bool:
    """Whether an earlier record survives a start that resumes after step `resumed_from`
    (None: from scratch). Start lines stay: they are the run's history of attempts."""
    if record.get("event") == "start":
        return True
    step = record.get("step")
    if resumed_from is None:
        return False
    return not isinstance(step, int) or step <= resumed_from


def read_metrics(run_dir: str | Path, every_attempt: bool = False) -> list[dict[str, Any]]:
    """The records of RUN/metrics.jsonl, in order.

    Robust to what kills leave behind: a line cut short is skipped, and a cut line with a
    record glued onto it (written by older versions) gives that record. Unless every_attempt,
    a start drops the earlier records of the steps it trains again (all step records for a
    start from scratch, those after `resumed_from_step` otherwise), so each step appears once.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    for line in path.read_bytes().split(b"\n"):
        record = _parse(line) or _glued(line)
        if record is None:
            continue
        if record.get("event") == "start" and not every_attempt:
            records = [r for r in records if _kept(r, record.get("resumed_from_step"))]
        records.append(record)
    return records
