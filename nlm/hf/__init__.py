"""Hugging Face interop: nlm checkpoints <-> `transformers` model directories.

    export_hf("runs/gpt-small", "exports/gpt-small")     # gpt -> GPT2LMHeadModel, bert -> BertForPreTraining
    import_hf("hf/some-gpt2", "runs/imported-gpt2")      # GPT-2 / BERT -> an nlm checkpoint

Plain PyTorch + transformers / tokenizers / safetensors (no Ray). `convert` maps weights and
configs, `tokenizer` builds the `tokenizers` version of each nlm tokenizer kind, `card` writes
the model card. The submodules import `transformers` lazily: `import nlm.hf` is cheap.
"""

from __future__ import annotations

from typing import Any


def export_hf(checkpoint: Any, out: Any, overwrite: bool = False) -> dict[str, Any]:
    """See nlm.hf.export.export_hf."""
    from nlm.hf.export import export_hf as run

    return run(checkpoint, out, overwrite=overwrite)


def import_hf(source: Any, out: Any, overwrite: bool = False) -> dict[str, Any]:
    """See nlm.hf.importer.import_hf."""
    from nlm.hf.importer import import_hf as run

    return run(source, out, overwrite=overwrite)
