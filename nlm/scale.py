"""`ScaleConfig`: how many workers a training run uses and what each asks the cluster for.

The scale section of `TrainConfig` (pretraining) and `FinetuneConfig` (fine-tuning); the
cluster layer (nlm.cluster.train.driver) turns it into Ray Train's ScalingConfig and DeepSpeed's
ZeRO stage.
"""

from __future__ import annotations

import dataclasses

from nlm.config import Config, option
from nlm.errors import NLMError

DEVICES = ("auto", "cpu", "cuda")


@dataclasses.dataclass
class ScaleConfig(Config):
    workers: int = option(2, "Ray Train workers (data-parallel ranks)")
    # fractional on small machines: Ray Data needs CPUs too
    cpus_per_worker: float = option(0.5, "logical CPUs each worker reserves (fractional is fine)")
    worker_resources: dict[str, float] = option(
        {},
        "custom Ray resource per worker, NAME=AMOUNT (repeatable), e.g. trainer=1",
        flag="--worker-resource",
        metavar="NAME=AMOUNT",
    )
    device: str = option("auto", "auto | cpu | cuda (one GPU per worker, nccl, bf16)")
    zero_stage: int = option(1, "DeepSpeed ZeRO stage 0..3")
    torch_threads: int = option(0, "torch threads per worker (0: node cores / workers on the node)")
    compile: bool = option(False, "torch.compile the model through DeepSpeed's engine.compile()")

    def check(self, source: str = "config") -> ScaleConfig:
        self = self.typed(source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        if self.device not in DEVICES:
            raise bad("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise bad("zero_stage", f"{self.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.workers < 1:
            raise bad("workers", f"must be at least 1, got {self.workers}")
        if self.torch_threads < 0:
            raise bad("torch_threads", f"must not be negative, got {self.torch_threads}")
        if not self.cpus_per_worker > 0:
            raise bad("cpus_per_worker", f"must be positive, got {self.cpus_per_worker}")
        for name, amount in self.worker_resources.items():
            if name in ("CPU", "GPU"):
                raise bad("worker_resources", f"set {name} with cpus_per_worker / device")
            if not amount > 0:
                raise bad("worker_resources", f"{name}: must be positive, got {amount}")
        return self
