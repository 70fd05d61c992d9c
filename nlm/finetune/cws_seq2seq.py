"""Chinese word segmentation as text-to-text, for an encoder-decoder (issue 18).

The source is a piece of unsegmented text, the target the same characters with `[SEP]` between
the words (the tokenizer's own special token, so every tokenizer kind spells it with one id and
a character tokenizer that drops whitespace keeps it):

    {"source": "共同创造美好的", "target": "共同[SEP]创造[SEP]美好[SEP]的"}

Lines are cut into windows of at most `max_chars` characters at word ends (training: the gold
words are known) or after punctuation (segmenting: they are not), so that a target (characters +
separators + </s>) fits the model's positions.

Segmenting decodes greedily under a constraint: at each step the decoder may only write the next
source character or, between two characters, one `[SEP]`; the choice is whichever of the two the
model scores higher. The output is therefore always the source's characters with word
boundaries, and scores with the SIGHAN rules (nlm.finetune.cws.score_segmentation). This is the
constrained decoding of copy-like seq2seq tasks (e.g. Hokamp & Liu 2017, lexically constrained
decoding); unconstrained generation could drop or invent characters, which the scorer refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError
from nlm.finetune.cws import split_words, write_jsonl
from nlm.finetune.data import is_punctuation, windows
from nlm.tokenizers.base import EOS_ID, SEP_ID, Tokenizer

WORD_SEP = "[SEP]"


def word_windows(words: Sequence[str], max_chars: int) -> list[list[str]]:
    """Gold words cut into windows of at most `max_chars` characters, at word ends (a word
    longer than `max_chars` is cut into pieces of `max_chars`)."""
    pieces = [w[i : i + max_chars] for w in words for i in range(0, len(w), max_chars)]
    spans = windows([len(p) for p in pieces], max_chars, [True] * len(pieces))
    return [list(pieces[a:b]) for a, b in spans]


def text_windows(text: str, max_chars: int) -> list[str]:
    """Unsegmented text cut into pieces of at most `max_chars` characters, after punctuation
    where possible (nlm.finetune.data.windows)."""
    spans = windows([1] * len(text), max_chars, [is_punctuation(c) for c in text])
    return [text[a:b] for a, b in spans]


def pair(words: Sequence[str]) -> dict[str, str]:
    return {"source": "".join(words), "target": WORD_SEP.join(words)}


def convert_cws_seq2seq(
    source: str | Path,
    output: str | Path,
    test_output: str | Path | None = None,
    test_fraction: float = 0.1,
    max_chars: int = 30,
) -> dict[str, Any]:
    """Segmented text -> seq2seq JSONL {"source", "target"} windows (module docstring), with
    the line split of nlm.finetune.cws.convert_cws (the first 1 - test_fraction of the lines
    to `output`, the rest to `test_output`). NLMError for a missing or non-UTF-8 file."""
    source = Path(source)
    if not source.is_file():
        raise NLMError(f"{source}: no such file")
    if not 0 < test_fraction < 1:
        raise NLMError(f"test fraction {test_fraction}: must be between 0 and 1")
    if max_chars < 2:
        raise NLMError(f"max chars {max_chars}: must be at least 2")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise NLMError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    cut = int(len(lines) * (1 - test_fraction)) if test_output else len(lines)
    parts = [(Path(output), lines[:cut])]
    if test_output:
        parts.append((Path(test_output), lines[cut:]))
    stats: dict[str, Any] = {"source": str(source), "lines": len(lines), "max_chars": max_chars}
    for path, part in parts:
        records = [pair(w) for line in part for w in word_windows(split_words(line), max_chars)]
        if not records:
            raise NLMError(f"{source}: no segmented text for {path}")
        write_jsonl(path, records)
        stats[str(path)] = {
            "examples": len(records),
            "characters": sum(len(r["source"]) for r in records),
        }
    return stats


class Seq2SeqSegmenter:
    """Segments text with a fine-tuned encoder-decoder by constrained greedy decoding (module
    docstring). The tokenizer must spell every character with one id (a char tokenizer);
    NLMError otherwise. `max_chars` defaults to the most a target of the model's positions holds."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        max_chars: int | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        limit = (model.max_positions - 1) // 2 + 1  # n chars + (n - 1) separators + </s>
        self.max_chars = min(max_chars or limit, limit)
        self.batch_size = batch_size
        if tokenizer.encode(WORD_SEP) != [SEP_ID]:
            raise NLMError(f"the {tokenizer.kind} tokenizer does not spell {WORD_SEP} as one id")

    def char_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if len(ids) != len(text):
            raise NLMError(
                f"the {self.tokenizer.kind} tokenizer does not give one id per character; "
                "text-to-text segmentation needs a char tokenizer"
            )
        return ids

    def segment(self, texts: Sequence[str]) -> list[list[str]]:
        """Each text (whitespace removed) -> its words."""
        texts = ["".join(t.split()) for t in texts]
        pieces = [(i, p) for i, t in enumerate(texts) for p in text_windows(t, self.max_chars)]
        words: list[list[str]] = [[] for _ in texts]
        for start in range(0, len(pieces), self.batch_size):
            batch = pieces[start : start + self.batch_size]
            for (i, _), piece_words in zip(batch, self._decode([p for _, p in batch]), strict=True):
                words[i] += piece_words
        return words

    @torch.no_grad()
    def _decode(self, pieces: list[str]) -> list[list[str]]:
        rows = [self.char_ids(p) for p in pieces]
        n = torch.tensor([len(r) for r in rows])
        width = int(n.max()) + 1
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        chars = torch.zeros(len(rows), width, dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r) + 1] = torch.tensor([*r, EOS_ID])
            mask[k, : len(r) + 1] = 1
            chars[k, : len(r)] = torch.tensor(r)
        steps = 2 * int(n.max())  # characters, separators and </s>
        logits, cache = self.model.prefill(ids, mask, steps)
        arange = torch.arange(len(rows))
        pos = torch.zeros(len(rows), dtype=torch.long)
        after_sep = torch.ones(len(rows), dtype=torch.bool)  # no separator before the first char
        starts = torch.zeros(len(rows), width, dtype=torch.bool)
        for _ in range(steps):
            done = pos >= n
            if bool(done.all()):
                break
            next_char = chars[arange, pos.clamp(max=width - 1)]
            sep = ~done & ~after_sep & (logits[:, SEP_ID] > logits[arange, next_char])
            starts[arange[sep], pos[sep]] = True
            next_ids = torch.where(done, EOS_ID, torch.where(sep, SEP_ID, next_char))
            pos = pos + (~done & ~sep).long()
            after_sep = sep
            logits, cache = self.model.decode_step(next_ids, cache)
        out = []
        for k, piece in enumerate(pieces):
            cuts = [0, *(j for j in range(1, len(piece)) if starts[k, j]), len(piece)]
            out.append([piece[a:b] for a, b in zip(cuts, cuts[1:], strict=False)])
        return out
