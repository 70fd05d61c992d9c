"""Chinese word segmentation as character tagging, SIGHAN scoring, and the max-matching baseline.

Tags (B/M/E/S): B begins a word of two or more characters, M continues it, E ends it, S is a
one-character word.   共同 创造 美好 的  ->  B E B E B E S

Invalid sequences, one policy everywhere:
- gold tags (training/eval JSONL) must be valid; an invalid sequence is rejected with the line
  and position (nlm.finetune.data.check_labels);
- predicted tags are valid by construction: `viterbi_bmes` picks the most probable sequence
  among the valid ones (B/M -> M/E, E/S -> B/S, start with B/S, end with E/S);
- `tags_to_words` accepts any sequence and reads it by one rule: a word starts at every B or S
  and after every E or S (so a stray M or E starts a word, a B or S closes the open one).
  `repair_bmes(tags)` is that reading written back as tags: valid, and the identity on valid
  sequences.

Scoring follows the SIGHAN Bakeoff script (score in icwb2-data): words are compared as
character spans, precision = correct / predicted words, recall = correct / gold words,
F1 = 2PR / (P + R), plus the OOV rate and recall against the training word list.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError

BMES = ("B", "M", "E", "S")
B, M, E, S = range(4)
# allowed[i, j]: tag j may follow tag i (indices in BMES order)
ALLOWED = torch.tensor(
    [
        [False, True, True, False],  # B -> M, E
        [False, True, True, False],  # M -> M, E
        [True, False, False, True],  # E -> B, S
        [True, False, False, True],  # S -> B, S
    ]
)
CAN_START = torch.tensor([True, False, False, True])
CAN_END = torch.tensor([False, False, True, True])


def split_words(line: str) -> list[str]:
    """A gold-segmented line (words separated by whitespace) -> its words."""
    return line.split()


def words_to_tags(words: Sequence[str]) -> list[str]:
    tags: list[str] = []
    for word in words:
        if len(word) == 1:
            tags.append("S")
        else:
            tags += ["B"] + ["M"] * (len(word) - 2) + ["E"]
    return tags


def word_starts(tags: Sequence[str]) -> list[bool]:
    """Whether a word starts at each position, by the reading rule in the module docstring."""
    return [i == 0 or t in ("B", "S") or tags[i - 1] in ("E", "S") for i, t in enumerate(tags)]


def tags_to_words(chars: Sequence[str], tags: Sequence[str]) -> list[str]:
    """Characters (a string or a list of tokens) + tags -> words; any tag sequence is read."""
    if len(chars) != len(tags):
        raise ValueError(f"{len(chars)} characters but {len(tags)} tags")
    words: list[str] = []
    for char, start in zip(chars, word_starts(tags), strict=True):
        if start:
            words.append(char)
        else:
            words[-1] += char
    return words


def first_invalid_bmes(tags: Sequence[str]) -> int | None:
    """Index of the first tag that breaks the B/M/E/S grammar, or None when valid."""
    inside = False  # within a word begun by B
    for i, tag in enumerate(tags):
        if tag not in BMES or (tag in ("B", "S")) == inside:
            return i
        inside = tag in ("B", "M")
    return len(tags) - 1 if inside else None


def repair_bmes(tags: Sequence[str]) -> list[str]:
    """The valid sequence with the words `tags_to_words` reads from `tags`."""
    return words_to_tags(tags_to_words(["x"] * len(tags), tags))


def viterbi_bmes(scores: torch.Tensor) -> list[int]:
    """(T, 4) per-position log-probabilities in B/M/E/S order -> the best valid tag indices."""
    steps = scores.size(0)
    if steps == 0:
        return []
    scores = scores.float().cpu()
    minus_inf = torch.tensor(float("-inf"))
    best = torch.where(CAN_START, scores[0], minus_inf)
    back = torch.zeros(steps, 4, dtype=torch.long)
    transition = torch.where(ALLOWED, 0.0, minus_inf)  # (from, to)
    for t in range(1, steps):
        total = best[:, None] + transition  # (from, to)
        best, back[t] = total.max(dim=0)
        best = best + scores[t]
    best = torch.where(CAN_END, best, minus_inf)
    path = [int(best.argmax())]
    for t in range(steps - 1, 0, -1):
        path.append(int(back[t, path[-1]]))
    return path[::-1]


# --- conversion ------------------------------------------------------------------------------


def segmented_to_example(line: str) -> dict[str, Any] | None:
    """One gold-segmented line -> {"tokens": characters, "tags": B/M/E/S}; None if blank."""
    words = split_words(line)
    if not words:
        return None
    return {"tokens": [c for w in words for c in w], "tags": words_to_tags(words)}


def convert_cws(
    source: str | Path,
    output: str | Path,
    test_output: str | Path | None = None,
    test_fraction: float = 0.1,
) -> dict[str, Any]:
    """Segmented text (words separated by spaces, one paragraph a line) -> tagging JSONL.

    With `test_output`, the first (1 - test_fraction) of the lines go to `output` and the rest
    to `test_output` (the pku split: int(0.9 * lines) train lines, the same cut as the pku-lm
    corpus). Blank lines are skipped. Files are written under a temporary name and renamed.
    """
    source = Path(source)
    if not source.is_file():
        raise NLMError(f"{source}: no such file")
    if not 0 < test_fraction < 1:
        raise NLMError(f"test fraction {test_fraction}: must be between 0 and 1")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise NLMError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    cut = int(len(lines) * (1 - test_fraction)) if test_output else len(lines)
    parts = [(Path(output), lines[:cut])]
    if test_output:
        parts.append((Path(test_output), lines[cut:]))
    stats: dict[str, Any] = {"source": str(source), "lines": len(lines)}
    for path, part in parts:
        examples = [e for e in map(segmented_to_example, part) if e is not None]
        if not examples:
            raise NLMError(f"{source}: no segmented text for {path}")
        write_jsonl(path, examples)
        stats[str(path)] = {
            "examples": len(examples),
            "characters": sum(len(e["tokens"]) for e in examples),
            "words": sum(e["tags"].count("B") + e["tags"].count("S") for e in examples),
        }
    return stats


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    from nlm.files import atomic_open

    with atomic_open(path) as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# --- scoring ---------------------------------------------------------------------------------


def word_spans(words: Sequence[str]) -> set[tuple[int, int]]:
    spans, start = set(), 0
    for word in words:
        spans.add((start, start + len(word)))
        start += len(word)
    return spans


def score_segmentation(
    gold: Sequence[Sequence[str]],
    predicted: Sequence[Sequence[str]],
    train_words: set[str] | None = None,
) -> dict[str, float | int]:
    """SIGHAN Bakeoff word precision / recall / F1 of predicted against gold segmentations
    (one list of words per line), plus OOV rate / recall when the training words are given."""
    if len(gold) != len(predicted):
        raise NLMError(f"{len(gold)} gold lines but {len(predicted)} segmented lines")
    gold_n = pred_n = correct = oov_n = oov_correct = 0
    for number, (g, p) in enumerate(zip(gold, predicted, strict=True), start=1):
        if "".join(g) != "".join(p):
            raise NLMError(
                f"line {number}: the segmentation's characters differ from the gold text"
            )
        g_spans, p_spans = word_spans(g), word_spans(p)
        gold_n += len(g_spans)
        pred_n += len(p_spans)
        correct += len(g_spans & p_spans)
        if train_words is not None:
            start = 0
            for word in g:
                if word not in train_words:
                    oov_n += 1
                    oov_correct += (start, start + len(word)) in p_spans
                start += len(word)
    precision = correct / pred_n if pred_n else 0.0
    recall = correct / gold_n if gold_n else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    result: dict[str, float | int] = {
        "gold_words": gold_n,
        "predicted_words": pred_n,
        "correct_words": correct,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
    }
    if train_words is not None:
        result["oov_rate"] = round(oov_n / gold_n, 4) if gold_n else 0.0
        result["oov_recall"] = round(oov_correct / oov_n, 4) if oov_n else 0.0
        iv_n = gold_n - oov_n
        result["iv_recall"] = round((correct - oov_correct) / iv_n, 4) if iv_n else 0.0
    return result


# --- the maximum-matching baseline -----------------------------------------------------------


class MaxMatch:
    """Dictionary segmentation: at each position take the longest dictionary word that starts
    there (forward), or ends there (backward); a character no word covers stands alone."""

    def __init__(self, words: Iterable[str], max_word_length: int | None = None) -> None:
        self.words = {w for w in words if w}
        longest = max((len(w) for w in self.words), default=1)
        self.max_word_length = min(longest, max_word_length) if max_word_length else longest

    def segment(self, text: str, backward: bool = False) -> list[str]:
        text = "".join(text.split())
        words: list[str] = []
        if backward:
            end = len(text)
            while end > 0:
                size = self._longest(text, end, backward=True)
                words.append(text[end - size : end])
                end -= size
            return words[::-1]
        start = 0
        while start < len(text):
            size = self._longest(text, start, backward=False)
            words.append(text[start : start + size])
            start += size
        return words

    def _longest(self, text: str, at: int, backward: bool) -> int:
        room = at if backward else len(text) - at
        for size in range(min(self.max_word_length, room), 1, -1):
            piece = text[at - size : at] if backward else text[at : at + size]
            if piece in self.words:
                return size
        return 1
