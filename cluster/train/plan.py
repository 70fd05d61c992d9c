"""Everything a run can check before any worker starts (plain Python: no Ray, no DeepSpeed).

`plan_run(config)` reads the shard manifest, checks the tokenizer fingerprint, the preset, the
model's context length, the split sizes against workers and batch size, and the run directory
(fresh or resumable). Bad input becomes one NLMError here, never a hang in a worker. The
resulting `RunPlan` is a plain dict on its way to the workers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nlm.cluster.train.config import TrainConfig
from nlm.cluster.train.deepspeed_config import check_zero_stage
from nlm.cluster.train.resume import check_same_run
from nlm.config import Config
from nlm.errors import NLMError

CHECKPOINTS = "checkpoints"  # RUN/checkpoints: Ray Train's storage for this run
CHECKPOINT_PREFIX = "step_"
CHECKPOINT_META = "meta.json"  # rank 0 writes it into every checkpoint


@dataclasses.dataclass
class RunPlan(Config):
    config: dict[str, Any]  # the TrainConfig, paths made absolute
    run_dir: str
    storage: str  # Ray Train storage_path (the run's checkpoints go to STORAGE/checkpoints)
    objective: str  # clm | mlm
    seq_len: int
    vocab_size: int
    tokenizer_dir: str
    train_files: list[str]
    val_files: list[str]
    train_rows: int
    val_rows: int
    train_mb: float  # size of the train split's token ids in memory
    model_config: dict[str, Any]  # the resolved model config (vocab_size included)
    num_params: int
    device: str  # cpu | cuda
    resume_from: dict[str, Any] | None  # the latest checkpoint's meta.json, when resuming

    @property
    def train(self) -> TrainConfig:
        return TrainConfig.from_dict(self.config)


def plan_run(config: TrainConfig, device: str = "cpu") -> RunPlan:
    from nlm.models import model_class
    from nlm.models.presets import preset_config
    from nlm.shards import check_tokenizer, read_manifest, split_paths

    config = config.replace(
        data=_absolute(config.data),
        out=_absolute(config.out),
        storage=_absolute(config.storage) if config.storage else "",
        init_from=_absolute(config.init_from) if config.init_from else "",
    ).check()
    check_zero_stage(config.scale.zero_stage, device)

    manifest = read_manifest(config.data)
    wanted = model_class(config.model).objective
    if manifest.objective != wanted:
        raise NLMError(
            f"{config.data}: shards were prepared for '{manifest.objective}', but {config.model} "
            f"trains on '{wanted}' shards (nlm prepare --objective {wanted})"
        )
    tokenizer_dir = str(Path(config.data) / "tokenizer")
    check_tokenizer(manifest, tokenizer_dir)
    # span shards' sentinels are the tokenizer's last tokens (nlm/tokenizers/sentinels.py)
    if manifest.objective == "span" and not manifest.tokenizer.get("sentinels"):
        raise NLMError(
            f"{config.data}: span shards from before the sentinel tokens joined the tokenizer "
            "(its tokenizer has no <extra_id_k>); prepare them again with "
            "`nlm prepare --objective span`"
        )
    vocab_size = int(manifest.tokenizer["vocab_size"])

    if config.init_from:  # the checkpoint's architecture; its tokenizer must be the shards'
        fields = init_model_fields(config, manifest)
    else:
        fields = preset_config(config.model, config.preset)  # NLMError naming the known presets
        fields.update(vocab_size=vocab_size)
    fields.update(config.model_overrides)
    cls = model_class(config.model)
    model_config = cls.config_class.from_dict(fields, source=f"model_overrides of {config.model}")
    model = cls(model_config)
    context = model.max_positions
    if context is not None and manifest.seq_len > context:
        raise NLMError(
            f"{config.data}: rows of seq_len {manifest.seq_len} do not fit the {config.model} "
            f"'{config.preset}' context of {context} tokens (prepare with --seq-len {context} or "
            f"set model_overrides: {{{cls.max_positions_field}: {manifest.seq_len}}})"
        )
    num_params = model.num_parameters()

    train_rows = int(manifest.splits["train"].get("rows", 0))
    val_rows = int(manifest.splits["val"].get("rows", 0))
    per_worker = train_rows // config.scale.workers
    if per_worker < config.micro_batch:
        raise NLMError(
            f"{config.data}: the train split has {train_rows} rows, {per_worker} per worker, "
            f"fewer than one micro-batch of {config.micro_batch}: use fewer workers, a smaller "
            "--micro-batch, or more data"
        )
    if val_rows < config.scale.workers:
        raise NLMError(
            f"{config.data}: the val split has {val_rows} rows, fewer than the {config.scale.workers} "
            "workers that evaluate it (nlm prepare --val-fraction)"
        )

    run_dir = Path(config.out)
    storage = config.storage or str(run_dir)
    checkpoints = list_checkpoints(storage)
    resume_from = None
    if config.resume:
        if not checkpoints:
            raise NLMError(f"{storage}/{CHECKPOINTS}: no checkpoint to resume from")
        resume_from = checkpoints[-1]
        check_same_run(resume_from, config, model_config.to_dict(), run_dir)
    elif checkpoints or (run_dir / "metrics.jsonl").exists():
        raise NLMError(
            f"{run_dir}: already holds a run; pass --resume to continue it, or choose another --out"
        )

    return RunPlan(
        config=config.flat_dict(),
        run_dir=str(run_dir),
        storage=storage,
        objective=manifest.objective,
        seq_len=manifest.seq_len,
        vocab_size=vocab_size,
        tokenizer_dir=tokenizer_dir,
        train_files=split_paths(config.data, manifest, "train"),
        val_files=split_paths(config.data, manifest, "val"),
        train_rows=train_rows,
        val_rows=val_rows,
        train_mb=train_rows * (manifest.seq_len + 1) * 4 / 2**20,
        model_config=model_config.to_dict(),
        num_params=num_params,
        device=device,
        resume_from=resume_from,
    )


def init_model_fields(config: TrainConfig, manifest: Any) -> dict[str, Any]:
    """The model config of `config.init_from` (an nlm checkpoint), checked against the run: the
    same family, and the tokenizer the shards were prepared with (same fingerprint)."""
    from nlm.checkpoint import read_checkpoint_config

    ckpt = read_checkpoint_config(config.init_from)
    where = f"{config.init_from} (--init-from)"
    if ckpt["family"] != config.model:
        raise NLMError(f"{where}: is a {ckpt['family']} checkpoint, not {config.model}")
    if ckpt.get("task"):
        raise NLMError(f"{where}: a fine-tuned checkpoint; start from a pretrained one")
    found = (ckpt.get("tokenizer") or {}).get("fingerprint")
    if found != manifest.tokenizer["fingerprint"]:
        raise NLMError(
            f"{where}: its tokenizer is not the one {config.data} was prepared with (prepare "
            f"the shards with --tokenizer-from {config.init_from}/tokenizer)"
        )
    return dict(ckpt["model"])


def list_checkpoints(storage: str) -> list[dict[str, Any]]:
    """meta.json of every complete checkpoint under STORAGE/checkpoints, oldest first."""
    from nlm.shards import filesystem

    fs, root = filesystem(f"{storage.rstrip('/')}/{CHECKPOINTS}")
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    metas = []
    for info in fs.get_file_info(pafs.FileSelector(root)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        meta_path = f"{info.path}/{CHECKPOINT_META}"
        if fs.get_file_info(meta_path).type != pafs.FileType.File:
            continue  # incomplete: the upload did not finish
        with fs.open_input_stream(meta_path) as f:
            meta = json.loads(f.read().decode("utf-8"))
        meta["path"] = (
            info.path if "://" not in storage else f"{storage.split('://')[0]}://{info.path}"
        )
        metas.append(meta)
    return sorted(metas, key=lambda m: m["step"])


def _absolute(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())
