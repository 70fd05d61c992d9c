"""The model card (README.md) of an exported model: YAML front matter as the Hugging Face Hub
reads it (library, tags, datasets, the recorded test figures) and the training settings.

The license is left for the user to fill in: nlm cannot know what the training text allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from nlm.checkpoint import Checkpoint

# metrics.json keys worth a line in the card, with how to show them
FIGURES = {
    "test_ppl": "test perplexity",
    "test_bits_per_byte": "test bits/byte (open vocabulary: <unk> pays its spelling)",
    "test_bits_per_byte_closed_vocab": "test bits/byte, closed vocabulary (<unk> is one token)",
    "test_unk_rate": "test <unk> rate",
    "test_pseudo_ppl": "test pseudo-perplexity",
    "test_mlm_accuracy": "test MLM accuracy",
    "val_loss": "validation loss",
    "val_ppl": "validation perplexity",
    "params": "parameters",
    "tokens": "training tokens",
}


def _datasets(training: dict[str, Any]) -> list[str]:
    """The sources the training shards were prepared from, as the manifest records them."""
    data = (training.get("config") or {}).get("data")
    if not data:
        return []
    try:
        from nlm.shards import read_manifest

        sources = read_manifest(data).sources
        return sorted({str(Path(s["path"]).parent.name or s["path"]) for s in sources})
    except Exception:  # the shards may be gone or elsewhere: the card is still written
        return [str(Path(data).name)]


def model_card(ckpt: Checkpoint, class_name: str) -> str:
    training = ckpt.config.get("training") or {}
    figures = {
        key: ckpt.metrics[key] for key in FIGURES if isinstance(ckpt.metrics.get(key), int | float)
    }
    front: dict[str, Any] = {
        "library_name": "transformers",
        "license": None,  # left for the user
        "pipeline_tag": "text-generation" if ckpt.family == "gpt" else "fill-mask",
        "tags": ["nlm", ckpt.family, class_name],
    }
    datasets = _datasets(training)
    if datasets:
        front["datasets"] = datasets
    if figures:
        front["nlm_metrics"] = figures
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {Path(str(training.get('run') or ckpt.path)).name}",
        "",
        f"A {ckpt.family} language model pretrained with nlm and exported as `{class_name}` "
        f"(`nlm export --format hf`). Tokenizer: nlm's `{ckpt.tokenizer.kind}` kind, "
        f"{ckpt.tokenizer.vocab_size} ids, special tokens <pad>=0 <unk>=1 <s>=2 </s>=3 "
        "[CLS]=4 [SEP]=5 [MASK]=6 (imported tokenizers keep their own ids).",
        "",
        "License: not set. Fill in the `license` field above before publishing.",
        "",
    ]
    if figures:
        lines += ["## Recorded figures", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {FIGURES[k]} | {v:.4g} |" for k, v in figures.items()]
        lines.append("")
    config = training.get("config") or {}
    lines += [
        "## Model",
        "",
        "```yaml",
        yaml.safe_dump(ckpt.config["model"], sort_keys=True).rstrip(),
        "```",
        "",
    ]
    if config:
        lines += ["## Training settings", "", "```yaml"]
        lines += [yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
