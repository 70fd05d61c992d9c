"""Inference with a fine-tuned checkpoint (plain torch; serving and evaluation both use it).

    p = Predictor(load_task_checkpoint("runs/bert-cws"))
    p.classify(["a text", ...])            -> [{"label", "score", "probs": {label: p}}]
    p.tag([["我", "爱", ...], ...])          -> [["S", "S", ...], ...]
    p.segment(["我爱北京天安门"])              -> [{"words": [...], "tags": [...]}]  (B/M/E/S models)

Inputs longer than the model are cut into windows (after punctuation where possible) and the
per-token scores joined again; B/M/E/S models decode the whole sequence with the constrained
Viterbi search, so every answer is a valid segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nlm.finetune.cws import (
    BMES,
    score_segmentation,
    tags_to_words,
    viterbi_bmes,
    words_to_tags,
)
from nlm.finetune.data import (
    ClassifyExample,
    Example,
    TagExample,
    collate,
    encode_classify,
    encode_tag,
    tag_scheme,
)
from nlm.finetune.heads import TaskCheckpoint
from nlm.finetune.metrics import (
    classification_counts,
    classification_metrics,
    tagging_counts,
    tagging_metrics,
)


class Predictor:
    def __init__(self, checkpoint: TaskCheckpoint, batch_size: int = 32) -> None:
        self.checkpoint = checkpoint
        self.model = checkpoint.model.eval()
        self.tokenizer = checkpoint.tokenizer
        self.labels = checkpoint.labels
        self.task = checkpoint.task
        self.family = self.model.family
        self.scheme = tag_scheme(self.labels) if self.task == "tag" else None
        self.max_length = self.model.max_positions
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def _logits(self, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each row's logits: (C,) for classify, (len(row), C) for tag (padding removed)."""
        out: list[torch.Tensor] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            batch = collate(chunk, pad_left=self.model.pad_left)
            logits = (
                self.model(
                    batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    token_type_ids=batch["token_type_ids"].to(self.device),
                )
                .logits.float()
                .cpu()
            )
            width = batch["input_ids"].size(1)
            for row, row_logits in zip(chunk, logits, strict=True):
                if self.task == "classify":
                    out.append(row_logits)
                else:
                    n = len(row["input_ids"])
                    out.append(row_logits[width - n :] if self.model.pad_left else row_logits[:n])
        return out

    def classify(
        self, texts: Sequence[str], texts_b: Sequence[str | None] | None = None
    ) -> list[dict[str, Any]]:
        texts_b = texts_b or [None] * len(texts)
        rows = [
            encode_classify(
                ClassifyExample(a, None, b), self.tokenizer, self.family, self.max_length
            )[0]
            for a, b in zip(texts, texts_b, strict=True)
        ]
        answers = []
        for logits in self._logits(rows):
            probs = logits.softmax(-1)
            best = int(probs.argmax())
            answers.append(
                {
                    "label": self.labels[best],
                    "score": round(float(probs[best]), 6),
                    "probs": {
                        str(lab): round(float(p), 6)
                        for lab, p in zip(self.labels, probs, strict=True)
                    },
                }
            )
        return answers

    def tag(self, sequences: Sequence[Sequence[str]]) -> list[list[str]]:
        """Tags for pre-split tokens (one list per sequence)."""
        rows, owner = [], []
        for i, tokens in enumerate(sequences):
            pieces = encode_tag(
                TagExample(list(tokens), None),
                self.tokenizer,
                self.family,
                self.max_length,
                scheme=self.scheme or "plain",
            )
            rows += pieces
            owner += [i] * len(pieces)
        scores: list[list[torch.Tensor]] = [[] for _ in sequences]
        for i, row, logits in zip(owner, rows, self._logits(rows), strict=True):
            scores[i].append(logits[row["first"]].log_softmax(-1))
        answers = []
        for parts in scores:
            joined = torch.cat(parts) if parts else torch.empty(0, len(self.labels))
            if self.scheme == "bmes":
                answers.append([BMES[j] for j in viterbi_bmes(joined)])
            else:
                answers.append([self.labels[j] for j in joined.argmax(-1).tolist()])
        return answers

    def segment(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Raw text -> words (B/M/E/S models). Whitespace in the text always separates words."""
        if self.scheme != "bmes":
            raise ValueError("segment needs a B/M/E/S tagging model")
        chars, breaks = [], []
        for text in texts:
            kept = [c for c in text if not c.isspace()]
            cut, count = set(), 0
            for c in text:
                if c.isspace():
                    cut.add(count)
                else:
                    count += 1
            chars.append(kept)
            breaks.append(cut)
        answers = []
        for kept, cut, tags in zip(chars, breaks, self.tag(chars), strict=True):
            words, position = [], 0
            for word in tags_to_words(kept, tags):
                piece = ""
                for c in word:
                    if position in cut and piece:
                        words.append(piece)
                        piece = ""
                    piece += c
                    position += 1
                words.append(piece)
            answers.append({"words": words, "tags": words_to_tags(words)})
        return answers


def evaluate(
    predictor: Predictor, examples: Sequence[Example], train_words: set[str] | None = None
) -> dict[str, Any]:
    """Test metrics of a checkpoint on whole examples (long ones through the windows). B/M/E/S
    models also get the SIGHAN word scores (OOV rate and recall against `train_words`)."""
    labels = predictor.labels
    if predictor.task == "classify":
        assert all(isinstance(e, ClassifyExample) for e in examples)
        answers = predictor.classify([e.text for e in examples], [e.text_b for e in examples])
        index = {label: i for i, label in enumerate(labels)}
        gold = [index[e.label] for e in examples]
        predicted = [index[a["label"]] for a in answers]
        counts = classification_counts(gold, predicted, len(labels))
        return {"examples": len(examples), **classification_metrics(counts, len(labels))}
    gold_tags = [e.tags for e in examples]
    predicted_tags = predictor.tag([e.tokens for e in examples])
    counts = tagging_counts(gold_tags, predicted_tags, predictor.scheme or "plain")
    result: dict[str, Any] = {"examples": len(examples), "tokens": int(counts["tokens"])}
    result.update(tagging_metrics(counts))
    if predictor.scheme == "bmes":  # span F1 over B/M/E/S is the SIGHAN word F1
        gold = [tags_to_words(e.tokens, e.tags) for e in examples]
        predicted = [
            tags_to_words(e.tokens, t) for e, t in zip(examples, predicted_tags, strict=True)
        ]
        score = score_segmentation(gold, predicted, train_words)
        result.update(
            {f"word_{k}" if k in ("precision", "recall", "f1") else k: v for k, v in score.items()}
        )
    return result
