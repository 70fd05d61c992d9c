"""Task models: a pretrained gpt or bert plus one new linear layer, as in the course notes.

    bert classify:  p(y|x) = softmax(W h_[CLS])          the first token's final hidden state
    bert tag:       p(y_j|x) = softmax(W h_j)            every token's final hidden state
    gpt classify:   p(y|x) = softmax(W h_</s>)           the last position (batches left-padded)
    gpt tag:        p(y_j|x) = softmax(W h_j)            (left context only)
    loss:           L = L2 + λ·L1    L2 the task's cross-entropy, L1 gpt's language-model loss on
                                     the same input (both means); λ = 0 computes L2 alone.

The head is registered on the backbone as `task_head`, so a fine-tuned checkpoint is the usual
directory (nlm/checkpoint.py) whose model.safetensors holds the pretrained model's tensors under
their usual names plus task_head.weight / task_head.bias, and whose config.json adds
    "task": "classify" | "tag",  "labels": [...] (the label map, index order),
    "finetune": {"lm_weight", "max_length", "scheme", "base_checkpoint", ...}.
`load_task_checkpoint` reads it back without unpickling (safetensors) and checks every tensor.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from nlm.checkpoint import (
    _check_tokenizer,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint_dir,
    save_checkpoint,
)
from nlm.errors import NLMError
from nlm.finetune.data import TASKS, Label, tag_scheme
from nlm.models import IGNORE_INDEX, LanguageModel, families_where, model_class
from nlm.objectives import causal_lm_loss
from nlm.tokenizers import load_tokenizer
from nlm.tokenizers.base import Tokenizer

HEAD = "task_head"


def finetunable_families() -> list[str]:
    """Families a task head can sit on: those whose `summary_type` says which hidden state
    sums up an input (the course notes fine-tune the pretrained Transformers)."""
    return families_where(lambda cls: cls.summary_type is not None)


@dataclasses.dataclass
class TaskOutput:
    logits: torch.Tensor  # (B, C) classify, (B, T, C) tag
    loss: torch.Tensor | None = None  # L = L2 + λ·L1
    task_loss: torch.Tensor | None = None  # L2
    lm_loss: torch.Tensor | None = None  # L1 (gpt with λ > 0 only)


class TaskModel(nn.Module):
    def __init__(
        self, backbone: LanguageModel, task: str, labels: list[Label], lm_weight: float = 0.0
    ) -> None:
        super().__init__()
        if backbone.summary_type is None:
            raise NLMError(
                f"fine-tuning needs a {' or '.join(finetunable_families())} checkpoint, not "
                f"{backbone.family} (the course notes fine-tune the pretrained Transformers)"
            )
        if task not in TASKS:
            raise NLMError(f"task '{task}': not one of {', '.join(TASKS)}")
        if lm_weight < 0:
            raise NLMError(f"lm_weight {lm_weight}: must not be negative")
        if lm_weight and not backbone.causal:
            causal = families_where(lambda cls: cls.causal and cls.summary_type is not None)
            raise NLMError(
                f"lm_weight {lm_weight}: the auxiliary language-model loss applies to "
                f"{' or '.join(causal)}; use --lm-weight 0 with {backbone.family}"
            )
        self.task, self.labels, self.lm_weight = task, list(labels), float(lm_weight)
        self.family = backbone.family
        self.backbone = backbone
        if not hasattr(backbone, HEAD):
            head = nn.Linear(backbone.hidden_size, len(labels))
            nn.init.normal_(head.weight, mean=0.0, std=0.02)
            nn.init.zeros_(head.bias)
            backbone.add_module(HEAD, head)
        self.dropout = nn.Dropout(backbone.config.dropout)
        # The pretraining heads take no part in a task: frozen, so no optimizer state is kept
        # for them.
        for parameter in backbone.pretraining_head_parameters():
            parameter.requires_grad_(False)

    @property
    def head(self) -> nn.Linear:
        return getattr(self.backbone, HEAD)

    @property
    def pad_left(self) -> bool:
        """Batches are left-padded when the head reads the last position, so it is real in
        every row."""
        return self.backbone.summary_type == "last"

    @property
    def max_positions(self) -> int:
        return self.backbone.max_positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TaskOutput:
        if self.backbone.objective == "mlm":
            # mlm_labels all -100: the MLM head runs on no position (we only want the states).
            out = self.backbone(
                input_ids,
                token_type_ids=token_type_ids,
                attention_mask=attention_mask,
                mlm_labels=torch.full_like(input_ids, IGNORE_INDEX),
            )
        else:
            out = self.backbone(input_ids, attention_mask=attention_mask)
        features = out.hidden
        if self.task == "classify":
            features = features[:, 0] if self.backbone.summary_type == "first" else features[:, -1]
        logits = self.head(self.dropout(features))
        if labels is None:
            return TaskOutput(logits)
        task_loss = task_cross_entropy(logits, labels)
        if not self.lm_weight:
            return TaskOutput(logits, task_loss, task_loss)
        lm_loss = causal_lm_loss(out.logits, lm_targets(input_ids, attention_mask))
        return TaskOutput(logits, task_loss + self.lm_weight * lm_loss, task_loss, lm_loss)


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (-100 ignored); 0 (with a graph) if none."""
    flat, targets = logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1)
    if not bool((targets != IGNORE_INDEX).any()):
        return flat.sum() * 0.0
    return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)


def lm_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets of a (left-padded) batch: -100 where either token is padding."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    following = input_ids[:, 1:]
    if attention_mask is not None:
        real = attention_mask.bool()
        following = torch.where(real[:, :-1] & real[:, 1:], following, IGNORE_INDEX)
    targets[:, :-1] = following
    return targets


# --- building, saving, loading ---------------------------------------------------------------


def load_backbone(
    path: str | Path, dropout: float | None = None
) -> tuple[LanguageModel, Tokenizer, Path]:
    """The pretrained model and tokenizer of a checkpoint (a fine-tuned one gives its backbone,
    without its old head)."""
    directory = resolve_checkpoint_dir(path)
    config = read_checkpoint_config(directory)
    if config["family"] not in finetunable_families():
        raise NLMError(
            f"{directory}: a {config['family']} checkpoint; fine-tuning needs "
            f"{' or '.join(finetunable_families())}"
        )
    if "task" in config:
        loaded = load_task_checkpoint(directory)
        backbone, tokenizer = loaded.model.backbone, loaded.tokenizer
        delattr(backbone, HEAD)
    else:
        loaded = load_checkpoint(directory)
        backbone, tokenizer = loaded.model, loaded.tokenizer
    if dropout is not None and dropout != backbone.config.dropout:
        rebuilt = type(backbone)(backbone.config.replace(dropout=dropout))
        rebuilt.load_state_dict(backbone.state_dict())
        backbone = rebuilt
    return backbone, tokenizer, directory


def fresh_like(backbone: LanguageModel, seed: int) -> LanguageModel:
    """The same architecture with freshly initialised weights (the from-scratch control)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return type(backbone)(backbone.config)


def save_task_checkpoint(
    directory: str | Path,
    model: TaskModel,
    tokenizer: Tokenizer,
    metrics: dict[str, Any] | None = None,
    finetune: dict[str, Any] | None = None,
) -> Path:
    extra = {
        "task": model.task,
        "labels": model.labels,
        "finetune": {"lm_weight": model.lm_weight, **(finetune or {})},
    }
    if model.task == "tag":
        extra["finetune"]["scheme"] = tag_scheme(model.labels)
    return save_checkpoint(directory, model.backbone, tokenizer, metrics=metrics, extra=extra)


@dataclasses.dataclass
class TaskCheckpoint:
    path: Path
    model: TaskModel
    tokenizer: Tokenizer
    metrics: dict[str, Any]
    config: dict[str, Any]

    @property
    def task(self) -> str:
        return self.model.task

    @property
    def labels(self) -> list[Label]:
        return self.model.labels


def load_task_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TaskCheckpoint:
    import json

    directory = resolve_checkpoint_dir(path)
    config = read_checkpoint_config(directory)
    source = f"{directory}/config.json"
    task = config.get("task")
    if task is None:
        raise NLMError(
            f"{source}: not a fine-tuned checkpoint (no field 'task'); see `nlm finetune`"
        )
    if task not in TASKS:
        raise NLMError(f"{source} (field 'task'): {task!r} is not one of {', '.join(TASKS)}")
    labels = config.get("labels")
    if (
        not isinstance(labels, list)
        or not labels
        or any(isinstance(x, bool) or not isinstance(x, str | int) for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise NLMError(
            f"{source} (field 'labels'): expected a list of distinct strings or integers"
        )
    if not isinstance(config.get("model"), dict):
        raise NLMError(f"{source} (field 'model'): missing or not an object")
    cls = model_class(config["family"])
    backbone = cls(cls.config_class.from_dict(config["model"], source=source))
    finetune = config.get("finetune") or {}
    model = TaskModel(backbone, task, labels, lm_weight=float(finetune.get("lm_weight", 0.0)))
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise NLMError(f"{directory}: no model.safetensors")
    try:
        missing, unexpected = safetensors.torch.load_model(backbone, str(weights), strict=False)
    except safetensors.SafetensorError as exc:
        raise NLMError(f"{weights}: unreadable weights ({exc})") from None
    except RuntimeError as exc:  # shapes differ: e.g. a label map edited by hand
        first = str(exc).strip().splitlines()[-1].strip()
        raise NLMError(f"{weights}: weights do not match config.json ({first})") from None
    if missing or unexpected:
        names = ", ".join([*sorted(missing), *sorted(unexpected)][:3])
        raise NLMError(f"{weights}: weights do not match config.json ({names} …)")
    model.to(device).eval()
    tokenizer = load_tokenizer(directory / "tokenizer")
    _check_tokenizer(directory, config, tokenizer, backbone)
    metrics_path = directory / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return TaskCheckpoint(directory, model, tokenizer, metrics, config)
