"""Whether a `--resume` asks for the run its checkpoint belongs to (plain Python, no Ray).

A resumed run loads DeepSpeed's sharded model and optimizer state, the data position and the
RNG states of the run that wrote the checkpoint. Anything that changes the model's shape, the
data, the batch layout or the optimisation would either crash inside the workers after Ray,
DeepSpeed and the data pipeline have started (a 3-layer gpt resuming a 2-layer run's state),
or, worse, silently train something else under the old run's name. So every field of the
requested config is compared with the run's recorded one (RUN/config.yaml and the resolved
model config in RUN/plan.json, both written when the run first started) before anything is
written or any worker starts, and the first difference is one NLMError naming the field.

Only the fields in MAY_CHANGE may differ: how long to train (max_steps, which also stretches
the learning-rate schedule to the new end), where to write and how often to log, evaluate and
checkpoint, and the resources a worker asks for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nlm.cluster.train.config import TrainConfig
from nlm.errors import NLMError

MAY_CHANGE = frozenset(
    {
        "max_steps",
        "resume",
        "out",
        "storage",
        "shared_fs",
        "eval_every",
        "eval_rows",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_failures",
        "placement_timeout_s",
        "cpus_per_worker",
        "worker_resources",
        "torch_threads",
        "materialize_mb",
        "device",
        "compile",
    }
)
# Recorded in every checkpoint's meta.json (older runs may lack config.yaml / plan.json).
META_FIELDS = ("model", "preset", "workers", "zero_stage")


def check_same_run(
    meta: dict[str, Any], config: TrainConfig, model_config: dict[str, Any], run_dir: Path
) -> None:
    """NLMError naming the first field in which `config` (resolved: lr, min_lr and paths
    filled in) or the resolved `model_config` differs from the run that wrote the checkpoint
    described by `meta` (its meta.json, with "path")."""
    where = meta["path"]
    wanted = config.flat_dict()  # the flat keys of RUN/config.yaml (sections unfolded)
    for field in META_FIELDS:
        if meta.get(field) != wanted[field]:
            raise _differs(where, field, meta.get(field), wanted[field])
    recorded_config = run_dir / "config.yaml"
    if recorded_config.is_file():
        recorded = TrainConfig.load_yaml(recorded_config).check(str(recorded_config))
        for field, value in recorded.flat_dict().items():
            if field not in MAY_CHANGE and _normal(value) != _normal(wanted.get(field)):
                raise _differs(str(recorded_config), field, value, wanted.get(field))
    recorded_plan = run_dir / "plan.json"
    if recorded_plan.is_file():
        try:
            plan = json.loads(recorded_plan.read_text(encoding="utf-8"))
            recorded_model = plan["model_config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NLMError(f"{recorded_plan}: unreadable ({exc})") from None
        if isinstance(recorded_model, dict):
            # A field added to the model's config since (fnn's `combine`, `activation`) is
            # absent from an older plan: it ran with the field's default, so compare with that.
            from nlm.models import model_class

            defaults = model_class(config.model).config_class.from_dict(
                recorded_model, source=f"{recorded_plan} (field 'model_config')"
            )
            recorded_model = {**defaults.to_dict(), **recorded_model}
        for field in sorted(set(recorded_model) | set(model_config)):
            old, new = recorded_model.get(field), model_config.get(field)
            if _normal(old) != _normal(new):
                raise _differs(str(recorded_plan), f"model_overrides.{field}", old, new)


def _normal(value: Any) -> Any:
    """YAML and JSON give lists for tuples and ints for whole floats: compare as JSON does."""
    return json.loads(json.dumps(value))


def _differs(where: str, field: str, old: Any, new: Any) -> NLMError:
    return NLMError(
        f"{where} (field '{field}'): the run was started with {old!r}, this resume asks for "
        f"{new!r}; a resume continues the same run (only max_steps, outputs, logging, "
        "evaluation, checkpoint and resource settings may change): use another --out"
    )
