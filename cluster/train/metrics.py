"""Where a run's numbers go: RUN/metrics.jsonl, TensorBoard (RUN/tb), and peak FLOP/s for MFU
(the model's own FLOPs per token are a family fact: `LanguageModel.flops_per_token`).

Only rank 0 writes. metrics.jsonl is append-only: every (re)start of the worker group adds an
`{"event": "start", ...}` line, so a restart after a failure shows in the log, and the steps
replayed after it (from the last checkpoint) appear again with their new values.
"""

from __future__ import annotations

import json
import math
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
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
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


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete line of RUN/metrics.jsonl (a line being written is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
