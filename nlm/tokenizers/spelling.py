"""The spelling model: what an open-vocabulary bits/byte charges for text a tokenizer maps to
`<unk>`.

A closed-vocabulary model predicts every word outside its vocabulary as one `<unk>` token, so
its bits/byte leaves out the cost of saying *which* word it was, while a character or byte-level
model pays for every letter. The open-vocabulary convention (Mielke & Eisner, "Spell Once,
Summon Anywhere: A Two-Level Open-Vocabulary Language Model", AAAI 2019, arXiv:1804.08205,
sec. 4: a closed-vocabulary model becomes a distribution over all strings when the `<unk>` it
predicts is followed by a spelling from a character-level speller; their WikiText-2 table
compares word, BPE and char models in bits per character for this reason, as Cotterell et al.
2018, "Are All Languages Equally Hard to Language-Model?", do across languages) charges each
`<unk>` its spelling:

    p(unknown word w | context) = p_model(<unk> | context) * p_spell(w)

`p_spell` here is a character bigram model over the spelling followed by an end-of-word symbol,
with Witten-Bell interpolation (Witten & Bell 1991, as Chen & Goodman 1998 state it) down to an
add-one unigram over the characters seen in training plus the end symbol plus an escape. A
character never seen costs the escape plus 8 bits per UTF-8 byte (a uniform byte model), so
every string has a positive probability and the probabilities of all strings sum to at most 1.

It is estimated on the training text of the tokenizer: on the units the tokenizer leaves out
(the words that a word vocabulary maps to `<unk>`, each weighted by its training count: the
text `<unk>` stands for in training), or on every unit when the vocabulary keeps them all. The
tokenizer's training text is what `train_tokenizer` read: for `nlm prepare`, the sample of the
training split it trains the tokenizer on. A SentencePiece tokenizer has one only when trained
without byte fallback (estimated on the sampled characters it has no piece for). Saved with the
tokenizer as DIR/spelling.json, so a checkpoint and a serving replica carry it; a tokenizer
saved before it existed loads without one (evaluation then reports the closed figure only).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from nlm.errors import NLMError

FILE = "spelling.json"
VERSION = 1
# Markers that no character equals: the start of a spelling (bigram context) and its end.
BOW, EOW = "", "\x00eow"
BITS_PER_UNSEEN_BYTE = 8.0  # the escape spells an unseen character byte by byte, uniformly


class SpellingModel:
    """Character bigram (Witten-Bell) over spellings with an end-of-word symbol.

    unigrams: {char: count} over the estimation spellings (EOW counted once per spelling);
    bigrams: {prev: {char: count}} with prev "" at the start of a spelling.
    """

    def __init__(self, unigrams: Mapping[str, int], bigrams: Mapping[str, Mapping[str, int]]):
        self.unigrams = dict(unigrams)
        self.bigrams = {p: dict(f) for p, f in bigrams.items()}
        self._total = sum(self.unigrams.values())
        # add-one over the seen characters, EOW (already a key) and the escape
        self._unigram_den = self._total + len(self.unigrams) + 1
        self._context = {p: (sum(f.values()), len(f)) for p, f in self.bigrams.items()}

    @classmethod
    def estimate(cls, spellings: Mapping[str, int]) -> SpellingModel:
        """From spellings and their counts (e.g. the training words a vocabulary leaves out)."""
        unigrams: Counter[str] = Counter()
        bigrams: dict[str, Counter[str]] = {}
        for word, n in spellings.items():
            if not word or n <= 0:
                continue
            prev = BOW
            for c in [*word, EOW]:
                unigrams[c] += n
                bigrams.setdefault(prev, Counter())[c] += n
                prev = c
        if not unigrams:
            raise NLMError("no text to estimate a spelling model on")
        return cls(unigrams, bigrams)

    def bits(self, word: str) -> float:
        """-log2 p_spell(word): the bits to spell `word` (then end it). Any string, > 0."""
        total, prev = 0.0, BOW
        for c in [*word, EOW]:
            unseen = c != EOW and c not in self.unigrams
            # an unseen character is the escape symbol (count 0, as every unseen unit)
            lower = (0 if unseen else self.unigrams[c]) + 1
            lower /= self._unigram_den
            seen = self.bigrams.get(prev)
            if seen:
                n, types = self._context[prev]
                p = (seen.get(c, 0) + types * lower) / (n + types)
            else:
                p = lower
            total += -math.log2(p)
            if unseen:  # then the character itself, byte by byte
                total += BITS_PER_UNSEEN_BYTE * len(c.encode("utf-8"))
            prev = c
        return total

    def total_bits(self, words: Iterable[str]) -> float:
        return sum(self.bits(w) for w in words)

    # --- files -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "version": VERSION,
            "model": "char-bigram-witten-bell",
            "unigrams": self.unigrams,
            "bigrams": self.bigrams,
        }

    def save(self, directory: str | Path) -> None:
        from nlm.tokenizers.base import write_json

        write_json(Path(directory) / FILE, self.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> SpellingModel | None:
        """The model saved in a tokenizer directory, or None when it has none (saved before
        spelling models existed: evaluation then reports closed-vocabulary bits/byte only)."""
        path = Path(directory) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = cls(
                {str(k): int(v) for k, v in data["unigrams"].items()},
                {
                    str(p): {str(k): int(v) for k, v in f.items()}
                    for p, f in data["bigrams"].items()
                },
            )
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
            raise NLMError(f"{path}: corrupt spelling model ({exc!r})") from None
        if not model.unigrams:
            raise NLMError(f"{path}: corrupt spelling model (no characters)")
        return model


def estimate_left_out(counts: Mapping[str, int], kept: set[str] | Iterable[str]) -> SpellingModel:
    """The spelling model of a vocabulary: estimated on the units of `counts` it leaves out
    (what `<unk>` stands for in its training text), or on every unit when it keeps them all."""
    kept = set(kept)
    left_out = {u: n for u, n in counts.items() if u not in kept}
    return SpellingModel.estimate(left_out or counts)
