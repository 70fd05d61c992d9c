"""Perplexity, bits per byte and MLM accuracy of a model on a text.

The text: every non-empty line (stripped) is a document. Causal families read the documents as
one token stream, each document followed by `</s>` and the whole stream preceded by `</s>` (the
context a document start has in training shards), so every token of the text and every document
end is predicted once:

    </s> doc1 </s> doc2 </s> ... docN </s>        tokens = len(stream) - 1 predictions

Bits per byte is open-vocabulary: `bits_per_byte` = (total NLL in bits + the spelling bits of
every piece of text the tokenizer maps to `<unk>`) / UTF-8 bytes of the documents, each counted
with the one newline its `</s>` stands for. A closed vocabulary predicts an unknown word as one
`<unk>` for the price of one prediction, while a char or byte-fallback subword model spells it
out; charging each `<unk>` its spelling under the tokenizer's character model
(nlm/tokenizers/spelling.py, estimated on the tokenizer's training text; the open-vocabulary
convention of Mielke & Eisner 2019, sec. 4) makes word, char and subword models comparable on
the same text. The closed-vocabulary figure (NLL bits / bytes, `<unk>` at the price of one token) is
reported separately as `bits_per_byte_closed_vocab`, never under the plain name. A tokenizer
saved without a spelling model (before it existed) gets `bits_per_byte: null` and a
`bits_per_byte_note` when the text has unknown pieces; with none the two figures are equal.
Every result also reports `unk_tokens`, `unk_rate` (share of the scored tokens that are
`<unk>`, literal `<unk>` markers in the text included) and `unk_bytes` / `unk_byte_share` (the
text's bytes the tokenizer could not spell; a literal `<unk>` marker is the text's own and
every tokenizer reads it as one token, so it is not counted there nor charged a spelling).

Scoring, by the model's family facts (nlm/models/base.py):
- causal, not recurrent (gpt, fnn): windows of `seq_len` tokens; consecutive windows overlap so
  every scored token keeps context; a model with a bounded `context_size`, the fnn's n-1 words,
  overlaps by exactly that, which makes the score exact. Unbounded (gpt): `stride` defaults to
  3/4 of seq_len, so every scored token after the first window sees at least seq_len/4 tokens
  of context (the context floor: 32 at the default 128) and the text costs seq_len/stride = 4/3
  passes of the body per token (the vocabulary projection runs once per scored token when the
  model takes `logits_to_keep`, as gpt does); seq_len/2 (a floor of half the window) cost more
  for a small gain. Pass `stride` for another trade. Each prediction is scored in exactly one
  window.
  Evaluation is forward only (torch.inference_mode), batch by batch, with no per-token Python.
- recurrent (rnn, lstm): the stream is cut into `batch_size` contiguous streams scored in
  parallel (as in PyTorch's word_language_model example), the hidden state carried across
  consecutive windows. Each stream starts with an empty state, so the first tokens of streams
  2..B lose context.
- span (the encoder-decoder): windows of `seq_len` - 1 tokens, span-corrupted as in training
  with a fixed seed; `ppl` is the perplexity of the decoder's targets given the corrupted input
  (`ppl_kind` "span", no bits_per_byte: the kept tokens are not predicted).
- not causal (bert): the documents' tokens are packed into `[CLS] ... [SEP]` sequences. MLM
  accuracy masks 15% of the ordinary tokens (ids >= 7; as in training, specials and <unk> are
  never targets) with a fixed seed, all replaced by [MASK]; pseudo-perplexity masks each ordinary
  token in turn (Salazar et al. 2020) for the first `max_pll_tokens` of them and reports how many
  were scored.
  A pseudo-likelihood is not a probability of the text, so bert has no bits_per_byte.
- a backward LM too (elmo, `backward_lm`): its forward direction is scored as above (`ppl`,
  `bits_per_byte`), its backward direction by the mirror image (`score_backward_windows`:
  each token of the stream but the last predicted once from the tokens after it, windows taken
  from the end): `backward_nll`, `backward_ppl`.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nlm.device import model_device
from nlm.errors import NLMError
from nlm.models.base import IGNORE_INDEX, LanguageModel
from nlm.tokenizers.base import (
    CLS_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SEP_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    Tokenizer,
)
from nlm.tokenizers.sentinels import first_sentinel_id

DEFAULT_SEQ_LEN = 128
DEFAULT_BATCH_SIZE = 8  # windows (rnn/lstm: parallel streams) per batch; `nlm eval`'s default


# --- the text ---------------------------------------------------------------------------------
def read_documents(path: str | Path) -> list[str]:
    """The documents (non-empty stripped lines) of a UTF-8 text file, or a one-line NLMError."""
    path = Path(path)
    if path.is_dir():
        raise NLMError(f"{path}: is a directory, not a text file")
    if not path.is_file():
        raise NLMError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise NLMError(
            f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at byte offset {exc.start})"
        ) from None
    documents = [line.strip() for line in text.splitlines()]
    documents = [d for d in documents if d]
    if not documents:
        raise NLMError(f"{path}: no text to evaluate (the file is empty or blank)")
    return documents


def text_bytes(documents: list[str]) -> int:
    """UTF-8 bytes of the documents, one newline each (what `</s>` stands for)."""
    return sum(len(d.encode("utf-8")) + 1 for d in documents)


def token_stream(tokenizer: Tokenizer, documents: list[str]) -> torch.Tensor:
    """`</s> doc1 </s> doc2 </s> ...` as one int64 tensor."""
    ids = [EOS_ID]
    for doc in tokenizer.encode_batch(documents):
        ids.extend(doc)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# --- open vocabulary ------------------------------------------------------------------------
def unknown_text(tokenizer: Tokenizer, documents: list[str]) -> dict[str, Any]:
    """The text the tokenizer maps to `<unk>`: its UTF-8 bytes and its spelling cost in bits
    under the tokenizer's spelling model (None without one, or when the kind cannot tell)."""
    spans = tokenizer.unknown_spans(documents)
    if spans is None:
        return {"unk_bytes": None, "spelling_bits": None, "spans": None}
    flat = [piece for doc in spans for piece in doc]
    n_bytes = sum(len(piece.encode("utf-8")) for piece in flat)
    speller = tokenizer.spelling
    bits = speller.total_bits(flat) if speller is not None else None
    return {"unk_bytes": n_bytes, "spelling_bits": 0.0 if not flat else bits, "spans": len(flat)}


def open_vocabulary(
    tokenizer: Tokenizer,
    documents: list[str],
    targets: torch.Tensor,
    nll_nats: float | None,
    n_bytes: int,
) -> dict[str, Any]:
    """unk_rate, unk bytes and the open- and closed-vocabulary bits/byte of a scored text.

    targets: the scored token ids (any shape); nll_nats: their total NLL (None for a
    pseudo-likelihood, which is no probability of the text: no bits/byte at all)."""
    unk_tokens = int((targets == UNK_ID).sum())
    unknown = unknown_text(tokenizer, documents)
    out: dict[str, Any] = {
        "unk_tokens": unk_tokens,
        "unk_rate": unk_tokens / max(int(targets.numel()), 1),
        "unk_bytes": unknown["unk_bytes"],
        "unk_byte_share": None if unknown["unk_bytes"] is None else unknown["unk_bytes"] / n_bytes,
    }
    if nll_nats is None:
        return {**out, "bits_per_byte": None, "bits_per_byte_closed_vocab": None}
    closed = nll_nats / math.log(2) / n_bytes
    out["bits_per_byte_closed_vocab"] = closed
    if unknown["spelling_bits"] is not None:
        out["bits_per_byte"] = closed + unknown["spelling_bits"] / n_bytes
        out["spelling_bits"] = unknown["spelling_bits"]
    elif unk_tokens == 0 and unknown["unk_bytes"] in (0, None):
        out["bits_per_byte"] = closed  # nothing to spell: open and closed are one figure
    else:
        out["bits_per_byte"] = None
        out["bits_per_byte_note"] = (
            "the tokenizer has no spelling model (saved before nlm priced <unk>) and maps "
            f"{out['unk_bytes'] if out['unk_bytes'] is not None else 'some'} bytes of this text "
            "to <unk>: only bits_per_byte_closed_vocab, which leaves out their cost"
        )
    return out


# --- the model's context --------------------------------------------------------------------
def _window_length(model: LanguageModel, seq_len: int | None) -> int:
    limit = model.max_positions
    if seq_len is None:
        return min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if seq_len < 2:
        raise NLMError(f"--seq-len {seq_len}: must be at least 2")
    if limit and seq_len > limit:
        raise NLMError(f"--seq-len {seq_len}: exceeds the {model.family} model's {limit} positions")
    return seq_len


# glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with fresh pages
# and unmaps it on free, so a (rows, V) logits tensor larger than that is faulted in anew by
# every forward call. Scoring therefore cuts its forward calls so their logits stay under this
# many elements (16 MiB in fp32); the result does not depend on the cut. Measured with the fnn
# small (V = 13,534) on wt2 test, 2 cores: 24k tokens/s at 1024 rows per call, 40k under the
# budget (with nlm.device.keep_freed_memory, which evaluate_file sets; 28k without it).
LOGITS_BUDGET = 4 * 2**20


def _rows_per_call(model: LanguageModel) -> int:
    """Output positions one forward call may compute within `LOGITS_BUDGET`; unbounded for a
    module that is not one of nlm's families (nlm bench quality's reference models, which
    are scored with exactly the example's windows)."""
    if not isinstance(model, LanguageModel):
        return sys.maxsize
    return max(1, LOGITS_BUDGET // model.output_embeddings().size(0))


def _windows_per_call(model: LanguageModel, seq_len: int, batch_size: int) -> int:
    """At most `batch_size` windows of `seq_len` per forward call, fewer within the budget."""
    return max(1, min(batch_size, _rows_per_call(model) // seq_len))


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="batch", file=sys.stderr, disable=not enabled, leave=False
    )


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # fp32 logits (whatever the weights' dtype); targets follow the logits onto their device.
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1).to(logits.device),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )  # fmt: skip


# --- causal scoring -------------------------------------------------------------------------
def _windows(n_predictions: int, length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, first scored prediction, end) triples; prediction j is the token stream[j]."""
    start, scored_to = 0, 0
    while scored_to < n_predictions:
        end = min(start + length, n_predictions)
        yield start, scored_to + 1, end
        scored_to = end
        start += stride


@torch.inference_mode()
def score_windows(
    model: LanguageModel,
    stream: torch.Tensor,
    seq_len: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> tuple[float, int]:
    """Total NLL (nats) and count of the predictions of stream[1:], by overlapping windows.

    `batch_size` windows at most per forward call, fewer when their logits would exceed
    `LOGITS_BUDGET`."""
    windows = list(_windows(len(stream) - 1, seq_len, stride))
    batch_size = _windows_per_call(model, seq_len, batch_size)
    # Every window after the first scores only its last `stride` positions (the ones before
    # were scored by the window before it); a model that takes `logits_to_keep` projects
    # only those onto the vocabulary.
    keep = stride if "logits_to_keep" in inspect.signature(model.forward).parameters else 0
    total, count = 0.0, 0
    bar = _progress(math.ceil(len(windows) / batch_size), f"eval {model.family}", progress)
    for b in range(0, len(windows), batch_size):
        chunk = windows[b : b + batch_size]
        x = torch.full((len(chunk), seq_len), PAD_ID, dtype=torch.long)
        y = torch.full((len(chunk), seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, (start, first, end) in enumerate(chunk):
            x[row, : end - start] = stream[start:end]
            # Only predictions first..end are scored here; earlier ones were scored before.
            y[row, first - 1 - start : end - start] = stream[first : end + 1]
        x = x.to(model_device(model))
        if keep and chunk[0][0] > 0:  # (the first window scores every position)
            total += _nll_sum(model(x, logits_to_keep=keep).logits, y[:, -keep:]).item()
        else:
            total += _nll_sum(model(x).logits, y).item()
        count += int((y != IGNORE_INDEX).sum())
        bar.update()
    bar.close()
    return total, count


@torch.inference_mode()
def score_backward_windows(
    model: LanguageModel,
    stream: torch.Tensor,
    seq_len: int,
    stride: int,
    batch_size: int,
    progress: bool = False,
) -> tuple[float, int]:
    """Total NLL (nats) and count of a backward LM's predictions of stream[:-1], each token
    given the tokens after it (`ModelOutput.backward_logits`).

    The mirror image of `score_windows`: its windows over the reversed stream r (r[i] =
    stream[n - i]), so each prediction is scored once, in the window that gives it the most right
    context. A window reading r[start:end] is the model call x = stream[n-end : n-start] with
    targets stream[n-end+1 : n-start+1] (the last one is x's right context)."""
    n = len(stream) - 1
    windows = list(_windows(n, seq_len, stride))
    batch_size = _windows_per_call(model, seq_len, batch_size)
    total, count = 0.0, 0
    bar = _progress(
        math.ceil(len(windows) / batch_size), f"eval {model.family} (backward)", progress
    )
    b = 0
    while b < len(windows):
        # one batch: consecutive windows of one length (only the last ones are shorter)
        width = windows[b][2] - windows[b][0]
        chunk = []
        while (
            b < len(windows) and len(chunk) < batch_size and windows[b][2] - windows[b][0] == width
        ):
            chunk.append(windows[b])
            b += 1
        x = torch.stack([stream[n - end : n - start] for start, _, end in chunk])
        y = torch.stack([stream[n - end + 1 : n - start + 1] for start, _, end in chunk])
        labels = torch.full_like(x, IGNORE_INDEX)
        for row, (_, first, end) in enumerate(chunk):
            labels[row, : end - first + 1] = x[row, : end - first + 1]
        device = model_device(model)
        out = model(x.to(device), targets=y.to(device))
        total += _nll_sum(out.backward_logits, labels).item()
        count += int((labels != IGNORE_INDEX).sum())
        bar.update()
    bar.close()
    return total, count


@torch.inference_mode()
def score_recurrent(
    model: LanguageModel,
    stream: torch.Tensor,
    seq_len: int,
    batch_size: int,
    progress: bool = False,
) -> tuple[float, int]:
    """Total NLL and count of stream[1:] for a recurrent model: B parallel streams, state
    carried. Each forward call runs at most `seq_len` steps, fewer when the B streams' logits
    would exceed `LOGITS_BUDGET` (the state is carried exactly, so the cut changes nothing)."""
    n = len(stream) - 1
    streams = max(1, min(batch_size, n))
    seq_len = max(1, min(seq_len, _rows_per_call(model) // streams))
    width = math.ceil(n / streams)
    x = torch.full((streams, width), PAD_ID, dtype=torch.long)
    y = torch.full((streams, width), IGNORE_INDEX, dtype=torch.long)
    for row in range(streams):
        a, b = row * width, min((row + 1) * width, n)
        if a < b:
            x[row, : b - a] = stream[a:b]
            y[row, : b - a] = stream[a + 1 : b + 1]
    total, count, state = 0.0, 0, None
    bar = _progress(math.ceil(width / seq_len), f"eval {model.family}", progress)
    for t in range(0, width, seq_len):
        out = model(x[:, t : t + seq_len].to(model_device(model)), state=state)
        state = out.state
        total += _nll_sum(out.logits, y[:, t : t + seq_len]).item()
        count += int((y[:, t : t + seq_len] != IGNORE_INDEX).sum())
        bar.update()
    bar.close()
    return total, count


# --- bert -----------------------------------------------------------------------------------
def _bert_sequences(stream: list[int], seq_len: int) -> list[list[int]]:
    body = seq_len - 2
    return [[CLS_ID, *stream[i : i + body], SEP_ID] for i in range(0, len(stream), body)]


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def _masked_logits(
    model: LanguageModel, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(M, V) logits at the M labelled positions, in row-major order."""
    device = model_device(model)
    logits = model(
        ids.to(device), attention_mask=attention.to(device), mlm_labels=labels.to(device)
    ).logits
    # bert computes the vocabulary projection only where there is a label; accept (B, T, V) too.
    logits = logits[labels.to(device) != IGNORE_INDEX] if logits.dim() == 3 else logits
    return logits.float().cpu()  # (M, V): the masked positions only, scored in fp32


@torch.inference_mode()
def score_bert(
    model: LanguageModel,
    stream: list[int],
    seq_len: int,
    batch_size: int,
    max_pll_tokens: int = 2000,
    seed: int = 0,
    mask_prob: float = 0.15,
    progress: bool = False,
) -> dict[str, Any]:
    """MLM accuracy (fixed-seed masking) and pseudo-perplexity of the first max_pll_tokens."""
    sequences = _bert_sequences(stream, seq_len)
    # Pseudo-log-likelihood: one row per scored token, that token masked.
    pll_rows: list[tuple[int, int]] = []  # (sequence, position)
    for s, seq in enumerate(sequences):
        for p in range(1, len(seq) - 1):
            if len(pll_rows) < max_pll_tokens and seq[p] >= len(SPECIAL_TOKENS):
                pll_rows.append((s, p))
    mlm_batches = math.ceil(len(sequences) / batch_size)
    bar = _progress(mlm_batches + math.ceil(len(pll_rows) / batch_size), "eval bert", progress)

    generator = torch.Generator().manual_seed(seed)
    correct, masked, mlm_nll = 0, 0, 0.0
    for b in range(0, len(sequences), batch_size):
        ids, attention = _pad(sequences[b : b + batch_size])
        ordinary = ids >= len(SPECIAL_TOKENS)
        chosen = (torch.rand(ids.shape, generator=generator) < mask_prob) & ordinary
        labels = torch.where(chosen, ids, IGNORE_INDEX)
        logits = _masked_logits(model, ids.masked_fill(chosen, MASK_ID), attention, labels)
        mlm_nll += F.cross_entropy(logits.float(), ids[chosen], reduction="sum").item()
        correct += int((logits.argmax(-1) == ids[chosen]).sum())
        masked += int(chosen.sum())
        bar.update()

    pll_nll = 0.0
    for b in range(0, len(pll_rows), batch_size):
        rows = pll_rows[b : b + batch_size]
        ids, attention = _pad([sequences[s] for s, _ in rows])
        labels = torch.full_like(ids, IGNORE_INDEX)
        at = (torch.arange(len(rows)), torch.tensor([p for _, p in rows]))
        labels[at] = ids[at]
        ids[at] = MASK_ID
        logits = _masked_logits(model, ids, attention, labels)
        pll_nll += F.cross_entropy(
            logits.float(), labels[labels != IGNORE_INDEX], reduction="sum"
        ).item()
        bar.update()
    bar.close()
    return {
        "mlm_accuracy": correct / masked if masked else None,
        "mlm_nll": mlm_nll / masked if masked else None,
        "mlm_masked": masked,
        "pll_tokens": len(pll_rows),
        "pll_nll": pll_nll / len(pll_rows),
        "pseudo_ppl": math.exp(pll_nll / len(pll_rows)),
    }


# --- span corruption (the encoder-decoder) ---------------------------------------------------
SPAN_NOISE_DENSITY, SPAN_MEAN_LENGTH = 0.15, 3.0  # T5's, as `nlm prepare --objective span`


def score_span(
    model: LanguageModel,
    stream: list[int],
    length: int,
    batch_size: int,
    first_sentinel: int,
    seed: int = 0,
    progress: bool = False,
) -> tuple[float, int]:
    """(total NLL, target tokens) of a seq2seq model's span-corruption targets: the stream cut
    into windows of `length` - 1 tokens, each corrupted as training shards are
    (nlm.objectives.span_corrupt, T5's density and span length, noise from (seed, window)),
    the targets scored given the corrupted input (teacher forcing)."""
    import random

    from nlm.objectives import max_spans, span_corrupt

    # Windows no longer than the model's sentinels (its last rows) can corrupt.
    sentinels = model.config.vocab_size - first_sentinel
    if sentinels < 1:
        raise NLMError(
            f"the {model.family} model has no sentinel ids past the tokenizer's {first_sentinel}"
        )
    width = length - 1
    while width > 2 and max_spans(width, SPAN_NOISE_DENSITY, SPAN_MEAN_LENGTH) > sentinels:
        width -= 1
    rows = []
    for i, start in enumerate(range(0, len(stream) - 1, width)):
        window = stream[start : start + width]
        if len(window) >= 2:
            rng = random.Random(f"{seed}|{i}")
            rows.append(
                span_corrupt(window, first_sentinel, rng, SPAN_NOISE_DENSITY, SPAN_MEAN_LENGTH)
            )
    if not rows:
        raise NLMError("the text encodes to fewer than 2 tokens")
    device = model_device(model)
    total, count = 0.0, 0
    bar = _progress((len(rows) + batch_size - 1) // batch_size, "span", progress)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            group = rows[start : start + batch_size]
            inputs, mask = _pad([x for x, _ in group])
            targets, target_mask = _pad([y for _, y in group])
            targets = targets.masked_fill(~target_mask.bool(), IGNORE_INDEX).to(device)
            out = model(inputs.to(device), targets=targets, attention_mask=mask.to(device))
            total += float(_nll_sum(out.logits, targets))
            count += int(target_mask.sum())
            bar.update(1)
    bar.close()
    return total, count


# --- entry points ---------------------------------------------------------------------------
def evaluate_documents(
    model: LanguageModel,
    tokenizer: Tokenizer,
    documents: list[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    seq_len: int | None = None,
    stride: int | None = None,
    max_pll_tokens: int = 2000,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score documents with a model; the result is the JSON `nlm eval` prints (minus 'model')."""
    if batch_size < 1:
        raise NLMError(f"--batch-size {batch_size}: must be at least 1")
    model.eval()
    length = _window_length(model, seq_len)
    n_bytes = text_bytes(documents)
    result: dict[str, Any] = {"family": model.family, "bytes": n_bytes, "seq_len": length}
    if model.objective == "span":
        stream = [i for doc in tokenizer.encode_batch(documents) for i in [*doc, EOS_ID]]
        total, count = score_span(
            model, stream, length, batch_size, first_sentinel_id(tokenizer), seed, progress
        )
        nll = total / count
        return {
            **result,
            "tokens": count,
            "nll": nll,
            "ppl": math.exp(nll),
            "ppl_kind": "span",  # of the dropped spans' tokens given the rest, not of the text
            "bits_per_byte": None,
            "noise_density": SPAN_NOISE_DENSITY,
            "mean_span_length": SPAN_MEAN_LENGTH,
        }
    if model.objective == "mlm":
        if length < 3:
            raise NLMError(
                f"--seq-len {length}: {model.family} needs at least 3 ([CLS] token [SEP])"
            )
        if max_pll_tokens < 1:
            raise NLMError(f"--max-pll-tokens {max_pll_tokens}: must be at least 1")
        stream = [i for doc in tokenizer.encode_batch(documents) for i in doc]
        if not stream:
            raise NLMError("the text encodes to no tokens")
        scores = score_bert(
            model, stream, length, batch_size, max_pll_tokens, seed, progress=progress
        )
        return {
            **result,
            "tokens": len(stream),
            "nll": scores["pll_nll"],
            "ppl": scores["pseudo_ppl"],
            "ppl_kind": "pseudo",
            **open_vocabulary(tokenizer, documents, torch.tensor(stream), None, n_bytes),
            **scores,
        }
    stream = token_stream(tokenizer, documents)
    if model.recurrent:
        total, count = score_recurrent(model, stream, length, batch_size, progress)
    else:
        overlap = model.context_size
        if overlap is not None:  # bounded context: windows overlapping by it score exactly
            if overlap >= length:
                raise NLMError(
                    f"--seq-len {length}: must exceed the {model.family}'s {overlap}-token context"
                )
            step = length - overlap
        else:
            # the context floor is length - step
            step = stride if stride is not None else max(1, (3 * length) // 4)
            if not 1 <= step <= length:
                raise NLMError(f"--stride {step}: must be between 1 and --seq-len {length}")
        total, count = score_windows(model, stream, length, step, batch_size, progress)
        result["stride"] = step
        result["context_floor"] = length - step
        if model.backward_lm:  # elmo: the right-to-left direction, on the same windows
            back, back_count = score_backward_windows(
                model, stream, length, step, batch_size, progress
            )
            result["backward_nll"] = back / back_count
            result["backward_ppl"] = math.exp(back / back_count)
    nll = total / count
    return {
        **result,
        "tokens": count,
        "nll": nll,
        "ppl": math.exp(nll),  # the forward (left-to-right) direction's for a backward_lm
        "ppl_kind": "causal",
        **open_vocabulary(tokenizer, documents, stream[1:], total, n_bytes),
    }


def evaluate_file(
    checkpoint: str | Path,
    text_path: str | Path,
    progress: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    **options: Any,
) -> dict[str, Any]:
    """Load a checkpoint (or run dir) onto `device` in `dtype` (nlm.device: checked before
    loading) and score a text file with it; see `evaluate_documents`. Adds `eval_s`, the
    seconds spent scoring (not loading), and `tokens_per_s`, the scored tokens per second."""
    from nlm.device import check_request, describe, keep_freed_memory, load_for_inference

    check_request(device, dtype)
    keep_freed_memory()  # scoring allocates the same large tensors batch after batch
    documents = read_documents(text_path)
    ckpt = load_for_inference(checkpoint, device, dtype)
    started = time.perf_counter()
    result = evaluate_documents(ckpt.model, ckpt.tokenizer, documents, progress=progress, **options)
    seconds = time.perf_counter() - started  # scoring only: not the load, not the import
    speed = {"eval_s": round(seconds, 6)}
    if result.get("tokens"):
        speed["tokens_per_s"] = round(result["tokens"] / max(seconds, 1e-9), 1)
    return {
        "model": str(checkpoint), **result, **speed, "input": str(text_path),
        **describe(ckpt.model),
    }  # fmt: skip


def metrics_to_record(result: dict[str, Any]) -> dict[str, Any]:
    """What a test evaluation adds to the checkpoint's metrics.json (`nlm eval --record`, the
    demo): `test_ppl` for causal models, `test_pseudo_ppl` for bert (not comparable to a ppl),
    `test_bits_per_byte` (open vocabulary), `test_bits_per_byte_closed_vocab`,
    `test_unk_rate` and `test_mlm_accuracy` when measured, `test_tokens`."""
    kind = result.get("ppl_kind")
    key = {"pseudo": "test_pseudo_ppl", "span": "test_span_ppl"}.get(kind, "test_ppl")
    metrics = {key: result["ppl"]}
    names = (
        "bits_per_byte",
        "bits_per_byte_closed_vocab",
        "unk_rate",
        "mlm_accuracy",
        "tokens",
        "backward_ppl",
    )
    for name in names:
        if result.get(name) is not None:
            metrics[f"test_{name}"] = result[name]
    return metrics
