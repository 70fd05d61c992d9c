"""Task metrics, kept as counts so that data-parallel ranks can sum them before dividing.

classify: accuracy, and macro-F1 (the unweighted mean of each label's F1, over the labels that
          occur in the gold or the predictions).
tag:      tag accuracy (per token), and span precision / recall / F1. Spans are words for
          B/M/E/S tags (so span F1 is the SIGHAN word F1), B-X/I-X chunks for BIO tags (the
          conlleval reading: an I-X that does not continue an X chunk starts one), and maximal
          runs of one tag other than O for any other tag set.
"""

from __future__ import annotations

from collections.abc import Sequence

from nlm.finetune.cws import tags_to_words, word_spans

Counts = dict[str, float]


def classification_counts(gold: Sequence[int], predicted: Sequence[int], num_labels: int) -> Counts:
    counts: Counts = {"examples": len(gold), "correct": 0}
    for name in ("tp", "fp", "fn"):
        for label in range(num_labels):
            counts[f"{name}/{label}"] = 0
    for g, p in zip(gold, predicted, strict=True):
        if g == p:
            counts["correct"] += 1
            counts[f"tp/{g}"] += 1
        else:
            counts[f"fp/{p}"] += 1
            counts[f"fn/{g}"] += 1
    return counts


def classification_metrics(counts: Counts, num_labels: int) -> dict[str, float]:
    f1s = []
    for label in range(num_labels):
        tp, fp, fn = (counts[f"{k}/{label}"] for k in ("tp", "fp", "fn"))
        if tp + fp + fn == 0:
            continue  # neither in the gold nor predicted: no F1 to average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    examples = counts["examples"]
    return {
        "accuracy": round(counts["correct"] / examples, 5) if examples else 0.0,
        "macro_f1": round(sum(f1s) / len(f1s), 5) if f1s else 0.0,
    }


def spans(tags: Sequence[str], scheme: str) -> set[tuple[int, int, str]]:
    """(start, end, type) of every span in a tag sequence (see the module docstring)."""
    if scheme == "bmes":
        return {(a, b, "") for a, b in word_spans(tags_to_words(["x"] * len(tags), tags))}
    found: set[tuple[int, int, str]] = set()
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        if scheme == "bio":
            label = tag[2:] if tag[:2] in ("B-", "I-") else None
            begins = tag.startswith("B-") or (tag.startswith("I-") and label != kind)
        else:
            label = None if tag == "O" else tag
            begins = label != kind
        if start is not None and (begins or label is None):
            found.add((start, i, kind or ""))
            start, kind = None, None
        if label is not None and start is None:
            start, kind = i, label
    return found


def tagging_counts(
    gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]], scheme: str
) -> Counts:
    counts: Counts = {
        "tokens": 0,
        "correct": 0,
        "gold_spans": 0,
        "predicted_spans": 0,
        "matched": 0,
    }
    for g, p in zip(gold, predicted, strict=True):
        counts["tokens"] += len(g)
        counts["correct"] += sum(a == b for a, b in zip(g, p, strict=True))
        g_spans, p_spans = spans(g, scheme), spans(p, scheme)
        counts["gold_spans"] += len(g_spans)
        counts["predicted_spans"] += len(p_spans)
        counts["matched"] += len(g_spans & p_spans)
    return counts


def tagging_metrics(counts: Counts) -> dict[str, float]:
    precision = counts["matched"] / counts["predicted_spans"] if counts["predicted_spans"] else 0.0
    recall = counts["matched"] / counts["gold_spans"] if counts["gold_spans"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "tag_accuracy": round(counts["correct"] / counts["tokens"], 5) if counts["tokens"] else 0.0,
        "span_precision": round(precision, 5),
        "span_recall": round(recall, 5),
        "span_f1": round(f1, 5),
    }
