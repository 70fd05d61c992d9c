"""The n-gram bar of `nlm bench quality`: interpolated modified Kneser-Ney, estimated by KenLM.

The course notes motivate the feed-forward model by the n-gram model's sparsity, and Bengio et
al. (2003) measured their FNN against the best smoothed n-gram; the smoothing of record is
interpolated modified Kneser-Ney (Chen & Goodman 1998, "An empirical study of smoothing
techniques for language modeling", TR-10-98). nlm does not write its own: KenLM's `lmplz`
estimates it (Heafield et al. 2013, "Scalable modified Kneser-Ney language model estimation",
ACL) and the `kenlm` Python module scores with it. `make test` builds `lmplz` into .venv/bin
from the kenlm sdist (PyPI ships no binary) and installs the module.

On equal terms with the neural models:
  - the same vocabulary and training tokens: the n-gram is estimated on the shards' train token
    stream, each id written as a word `t<id>` (so `<unk>` is an ordinary word learned from its
    counts, as the neural models learn it; KenLM's own `<unk>` only catches ids that never occur
    in training), one document a line as the stream's `</s>` ids separate them;
  - the same scored tokens: every token of every test document plus the `</s>` after it, i.e.
    the predictions of `</s> doc1 </s> doc2 ...` that nlm.evaluation scores. An n-gram model's
    history starts afresh at each document (`<s>`), a neural model's carries over; that is the
    n-gram model's usual use, and it is the one the comparison asks to beat.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from nlm.errors import NLMError
from nlm.tokenizers.base import EOS_ID  # `</s>`: the document separator of a token stream


def lmplz_path() -> str:
    """The `lmplz` binary: .venv/bin's (`make test` builds it) or one on PATH; else NLMError."""
    import sys

    here = Path(sys.executable).parent / "lmplz"
    found = str(here) if here.is_file() else shutil.which("lmplz")
    if not found:
        raise NLMError("lmplz not found: `make .venv/bin/lmplz` builds KenLM's estimator")
    return found


def documents_of(stream: torch.Tensor) -> list[list[int]]:
    """Split a `</s> doc1 </s> doc2 ...` id stream into its documents (empty ones dropped)."""
    docs, current = [], []
    for t in stream.tolist():
        if t == EOS_ID:
            if current:
                docs.append(current)
            current = []
        else:
            current.append(t)
    if current:
        docs.append(current)
    return docs


def _line(doc: list[int]) -> str:
    return " ".join(f"t{t}" for t in doc)


def estimate(train: torch.Tensor, order: int, work: Path) -> Path:
    """Estimate an order-`order` interpolated modified KN model on a token stream -> ARPA path.

    `--discount_fallback`: on a corpus this small some count-of-counts are zero and KenLM's
    closed-form discounts are undefined; it then falls back to Chen & Goodman's defaults."""
    work.mkdir(parents=True, exist_ok=True)
    text, arpa = work / "train.txt", work / f"kn{order}.arpa"
    text.write_text("\n".join(_line(d) for d in documents_of(train)) + "\n", encoding="utf-8")
    cmd = [lmplz_path(), "-o", str(order), "--discount_fallback", "-S", "20%", "-T", str(work)]
    with text.open("rb") as src, arpa.open("wb") as dst:
        done = subprocess.run(cmd, stdin=src, stdout=dst, stderr=subprocess.PIPE)
    if done.returncode != 0:
        last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise NLMError(f"lmplz failed: {last}")
    return arpa


def score(arpa: Path, stream: torch.Tensor) -> tuple[float, int]:
    """Total NLL (nats) and count of the predictions of a `</s> doc1 </s> doc2 ...` stream:
    each document's tokens and its closing `</s>`, history reset per document."""
    import kenlm

    model = kenlm.Model(str(arpa))
    total, count = 0.0, 0
    for doc in documents_of(stream):
        for log10p, _, _ in model.full_scores(_line(doc), bos=True, eos=True):
            total -= log10p * math.log(10.0)
            count += 1
    return total, count


def ngram_run(train: torch.Tensor, test: torch.Tensor, order: int, work: Path) -> dict[str, Any]:
    """Estimate on `train`, score `test` (both id streams): the bench table's fields."""
    started = time.perf_counter()
    arpa = estimate(train, order, work)
    total, count = score(arpa, test)
    if count != len(test) - 1:  # `</s>` runs in a stream would leave predictions unscored
        raise NLMError(f"n-gram scored {count} predictions of {len(test) - 1}")
    return {"wall_s": round(time.perf_counter() - started, 1), "total": total, "count": count}
