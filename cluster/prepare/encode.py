"""What one Ray actor does with one work unit: documents -> split -> token ids -> Arrow.

No Ray here either (the actor class in data.py wraps `process_unit`), so the same code runs in
the driver for tests and in the benchmark's single-process reference.

Per unit the output is one Arrow table (UNIT_SCHEMA): first a meta row (split = -1) carrying
counts, skipped documents and the first fatal error as JSON, then
  clm: one row per split holding that split's whole token stream for the unit (documents
       joined by </s>) as one list<int32>, built from numpy without per-token Python;
  mlm: one row per sentence pair.
The driver packs the clm streams into rows of seq_len+1 in unit order (ClmPacker), because a
row may span two units.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import resource
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from nlm.cluster.prepare.sources import Skips, Unit, is_val, read_documents
from nlm.errors import NLMError
from nlm.tokenizers.base import EOS_ID, Tokenizer

UNIT_SCHEMA = pa.schema(
    [
        ("unit", pa.int64()),
        ("split", pa.int8()),  # 0 train, 1 val, -1 meta
        ("input_ids", pa.list_(pa.int32())),
        ("token_type_ids", pa.list_(pa.int8())),
        ("nsp_label", pa.int8()),
        ("meta", pa.string()),
    ]
)
META, TRAIN, VAL = -1, 0, 1
# Texts handed to one encode_batch call: bounds the transient Python lists of ids (~40 bytes
# per token) while keeping calls large enough that the per-call cost vanishes.
ENCODE_BATCH_BYTES = 1 << 20

# A sentence ends after . ! ? followed by whitespace, after Chinese 。！？ (whitespace or
# not), or at a line break.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])\s*|\s*\n\s*")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def private_rss_bytes() -> int:
    """Resident anonymous memory now: RSS without the object store's shared pages (which
    count in RSS once a process has touched them) and without mapped files. 0 off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _batches(texts: Sequence[str], sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of texts holding about ENCODE_BATCH_BYTES each."""
    ranges, start, acc = [], 0, 0
    for i, size in enumerate(sizes):
        acc += size
        if acc >= ENCODE_BATCH_BYTES:
            ranges.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(texts):
        ranges.append((start, len(texts)))
    return ranges


def encode_pieces(tok: Tokenizer, texts: Sequence[str], sizes: Sequence[int]) -> list[list[int]]:
    """Token ids of many texts, in batched calls (SentencePiece encodes a batch in C++)."""
    out: list[list[int]] = []
    for start, end in _batches(texts, sizes):
        out.extend(tok.encode_batch(texts[start:end]))
    return out


def _lines_for(tok: Tokenizer, text: str) -> list[str]:
    # SentencePiece models are trained on lines and have no piece for "\n" (it would encode
    # to <unk>): a multi-line document is encoded line by line, a line break being a word
    # boundary. Word tokenizers split on any whitespace; char tokenizers keep "\n".
    if tok.kind.startswith("spm-") and "\n" in text:
        return [line for line in text.split("\n") if line.strip()]
    return [text]


def document_ids(tok: Tokenizer, text: str) -> list[int]:
    """The ids of one document as the pipeline tokenizes it (without the </s> after it)."""
    return [i for ids in tok.encode_batch(_lines_for(tok, text)) for i in ids]


def clm_stream(tok: Tokenizer, docs: list[str], sizes: list[int]) -> np.ndarray:
    """The documents' ids joined and each followed by </s>, as one int32 array.

    The tokenizer's flat encode gives each batch's ids as one array and the lengths as another
    (Python touches each token once, flattening SentencePiece's lists); the rest is numpy on
    whole arrays. This and the encoder are all the per-token work of an actor.
    """
    if not tok.kind.startswith("spm-") or not any("\n" in text for text in docs):
        pieces, piece_sizes, counts = docs, sizes, None  # one piece per document
    else:
        split = [_lines_for(tok, text) for text in docs]
        pieces = [line for lines in split for line in lines]
        piece_sizes = [len(line) for line in pieces]
        counts = np.fromiter((len(lines) for lines in split), dtype=np.int64, count=len(split))
    flats, lengths = [], []
    for start, end in _batches(pieces, piece_sizes):
        ids, n = tok.encode_flat(pieces[start:end])
        flats.append(ids)
        lengths.append(n)
    if not flats:
        return np.zeros(0, dtype=np.int32)
    piece_ends = np.cumsum(np.concatenate(lengths))
    # </s> after the last piece of each document.
    doc_ends = piece_ends if counts is None else piece_ends[np.cumsum(counts) - 1]
    return np.insert(np.concatenate(flats), doc_ends, np.int32(EOS_ID))


def split_sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text)) if s]


def mlm_rows(
    tok: Tokenizer, docs: list[str], seq_len: int, rng: random.Random
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Sentence-pair rows (input_ids, token_type_ids, nsp_label) for BERT from documents."""
    from nlm.objectives import make_nsp_pairs

    sentences = [split_sentences(d) for d in docs]
    flat = [s for ss in sentences for s in ss]
    ids = iter(encode_pieces(tok, flat, [len(s) for s in flat]))
    documents = [[next(ids) for _ in ss] for ss in sentences]
    documents = [[s for s in doc if s] for doc in documents]
    # A one-sentence document has no next sentence: its two halves stand in for A and B (BERT's
    # segments need not be linguistic sentences), so it still gives a row with a fair NSP draw
    # instead of none; pku-style corpora are mostly such lines.
    documents = [doc if len(doc) > 1 else _halves(doc[0]) for doc in documents if doc]
    documents = [doc for doc in documents if doc]
    if not documents:
        return [], [], []
    if len(documents) == 1 and len(documents[0]) >= 4:
        # A random B must come from another document; a unit holding a single (long)
        # document lends its two halves to each other instead of giving only IsNext pairs.
        documents = _halves(documents[0])
    return _nsp_columns(make_nsp_pairs(documents, rng, max_length=seq_len))


def _halves(items: list[Any]) -> list[list[Any]]:
    """The first and second half of a list (a sentence's ids, a document's sentences); none
    when it has fewer than two items."""
    if len(items) < 2:
        return []
    half = len(items) // 2
    return [items[:half], items[half:]]


def _nsp_columns(pairs: Any) -> tuple[list[list[int]], list[list[int]], list[int]]:
    input_ids, token_types, labels = [], [], []
    for pair in pairs:
        if isinstance(pair, dict):
            a, t, y = pair["input_ids"], pair["token_type_ids"], pair["nsp_label"]
        else:
            a, t, y = pair
        input_ids.append(list(a))
        token_types.append(list(t))
        labels.append(int(y))
    return input_ids, token_types, labels


def unit_rng(seed: int, unit: Unit, split: int) -> random.Random:
    """Randomness of a unit from the seed and the unit's place in its file only, so it does not
    depend on which worker runs the unit or on other files."""
    digest = hashlib.blake2b(f"{seed}|{unit.key}|{split}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def process_unit(tok: Tokenizer, unit: Unit, opts: dict[str, Any]) -> pa.Table:
    """One unit -> UNIT_SCHEMA table (see the module docstring). Bad input never raises here:
    it comes back as the meta row's `error`, so the driver can name it and clean up."""
    skips = Skips(opts["skip_bad"])
    docs: dict[int, list[str]] = {TRAIN: [], VAL: []}
    sizes: dict[int, list[int]] = {TRAIN: [], VAL: []}
    meta: dict[str, Any] = {"bytes": unit.nbytes, "error": None}
    try:
        for text, raw in read_documents(
            unit,
            line_docs=opts["line_docs"],
            text_column=opts["text_column"],
            max_doc_bytes=opts["max_doc_bytes"],
            skips=skips,
        ):
            split = VAL if is_val(raw, opts["val_fraction"]) else TRAIN
            docs[split].append(text)
            sizes[split].append(len(raw))
    except NLMError as exc:
        meta["error"] = str(exc)  # the driver stops at the first one, in unit order
        docs, sizes = {TRAIN: [], VAL: []}, {TRAIN: [], VAL: []}

    columns: dict[str, list[Any]] = {name: [] for name in UNIT_SCHEMA.names}

    def add(split: int, ids: Any, types: Any = None, label: Any = None, info: Any = None) -> None:
        columns["unit"].append(unit.index)
        columns["split"].append(split)
        columns["input_ids"].append(ids)
        columns["token_type_ids"].append(types)
        columns["nsp_label"].append(label)
        columns["meta"].append(info)

    tokens = {}
    streams: dict[int, np.ndarray] = {}
    pairs: dict[int, tuple[list, list, list]] = {}
    for split in (TRAIN, VAL):
        if opts["objective"] != "mlm":  # clm, and span (corrupted by the driver after packing)
            streams[split] = clm_stream(tok, docs[split], sizes[split])
            tokens[split] = len(streams[split])
        else:
            rows = mlm_rows(tok, docs[split], opts["seq_len"], unit_rng(opts["seed"], unit, split))
            pairs[split] = rows
            tokens[split] = sum(len(x) for x in rows[0])
    meta.update(
        documents={"train": len(docs[TRAIN]), "val": len(docs[VAL])},
        tokens={"train": tokens[TRAIN], "val": tokens[VAL]},
        skipped={"reasons": skips.reasons, "examples": skips.examples},
        worker_peak_rss=peak_rss_bytes(),
        worker_private_rss=private_rss_bytes(),
        worker=[os.getpid(), cpu_seconds()],  # the actor's process and its CPU time so far
    )
    add(META, None, info=json.dumps(meta))
    if opts["objective"] != "mlm":
        table = pa.table(columns, schema=UNIT_SCHEMA)
        rows = [table]
        for split in (TRAIN, VAL):
            if len(streams[split]):
                rows.append(_stream_row(unit.index, split, streams[split]))
        return pa.concat_tables(rows)
    for split in (TRAIN, VAL):
        for ids, types, label in zip(*pairs[split], strict=True):
            add(split, ids, types, label)
    return pa.table(columns, schema=UNIT_SCHEMA)


def _stream_row(unit: int, split: int, stream: np.ndarray) -> pa.Table:
    # One list value over the whole numpy buffer: no per-token conversion.
    ids = pa.ListArray.from_arrays(
        pa.array(np.array([0, len(stream)], dtype=np.int32)), pa.array(stream, type=pa.int32())
    )
    n = pa.nulls(1, pa.int8())
    return pa.table(
        [
            pa.array([unit], pa.int64()),
            pa.array([split], pa.int8()),
            ids,
            pa.nulls(1, pa.list_(pa.int8())),
            n,
            pa.nulls(1, pa.string()),
        ],
        schema=UNIT_SCHEMA,
    )
