"""Small shard directories for the training tests, written with nlm.shards' own writer pieces
(ClmPacker, ShardWriter, write_manifest) so they follow the shard contract exactly, without
paying for a Ray Data `nlm prepare` run in every test."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from nlm.cluster.prepare.pipeline import span_table
from nlm.objectives import make_nsp_pairs, max_spans
from nlm.shards import (
    MLM_SCHEMA,
    PIPELINE_VERSION,
    ClmPacker,
    Manifest,
    ShardWriter,
    schema_for,
    write_manifest,
)
from nlm.tokenizers import Tokenizer, train_tokenizer
from nlm.tokenizers.base import EOS_ID, fingerprint
from nlm.tokenizers.sentinels import with_sentinels

SPAN = {"noise_density": 0.15, "mean_span_length": 3.0}


def corpus_lines(data_mirror: Path, limit: int) -> list[str]:
    text = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    lines = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith(" =")
    ]
    return lines[:limit]


def write_shards(
    out: Path,
    lines: list[str],
    *,
    objective: str = "clm",
    seq_len: int = 16,
    vocab_size: int = 256,
    rows_per_file: int = 1024,
    val_every: int = 10,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Every val_every-th line goes to val; the rest to train. Returns `out`. The tokenizer is
    a word tokenizer trained on `lines` unless one is given."""
    tokenizer = tokenizer or train_tokenizer("word", lines, vocab_size=vocab_size)
    if objective == "span":  # the <extra_id_k> sentinels end the vocabulary, as nlm prepare's
        tokenizer = with_sentinels(tokenizer, max_spans(seq_len - 1, **SPAN))
    tokenizer.save(out / "tokenizer")
    splits = {
        "train": [line for i, line in enumerate(lines) if i % val_every],
        "val": lines[::val_every],
    }
    fs = pafs.LocalFileSystem()
    summary = {}
    for split, docs in splits.items():
        writer = ShardWriter(fs, str(out), split, schema_for(objective), rows_per_file)
        ids = [tokenizer.encode(d) for d in docs]
        if objective in ("clm", "span"):
            # span: the pipeline's own corruption of packed rows of seq_len - 1 fresh tokens
            packer = ClmPacker(seq_len - 1 if objective == "span" else seq_len)
            for doc in ids:
                table = packer.push(np.array(doc + [EOS_ID], dtype=np.int32))
                if table is not None and objective == "span":
                    table = span_table(table, f"0|{split}", tokenizer.first_sentinel, **SPAN)
                if table is not None:
                    writer.write(table)
            tokens = packer.tokens
        else:
            # a "document" is 4 consecutive lines, a "sentence" one line (cut to fit)
            documents = [[d[: seq_len // 2] for d in ids[i : i + 4]] for i in range(0, len(ids), 4)]
            rows = make_nsp_pairs(documents, random.Random(0), max_length=seq_len)
            writer.write(pa.Table.from_pylist(rows, schema=MLM_SCHEMA))
            tokens = sum(len(r["input_ids"]) for r in rows)
        files = writer.close()
        summary[split] = {
            "rows": writer.rows,
            "tokens": tokens,
            "documents": len(docs),
            "files": files,
        }
    manifest = Manifest(
        pipeline_version=PIPELINE_VERSION,
        objective=objective,
        seq_len=seq_len,
        seed=0,
        tokenizer={
            "kind": tokenizer.kind,
            "vocab_size": tokenizer.vocab_size,
            "fingerprint": fingerprint(out / "tokenizer"),
        },
        sources=[{"path": "wikitext-2/valid.txt", "bytes": 0}],
        splits=summary,
        skipped={"documents": 0, "reasons": {}, "examples": []},
    )
    if objective == "span":
        manifest.tokenizer["sentinels"] = tokenizer.count
        manifest.settings.update(SPAN, first_sentinel=tokenizer.first_sentinel)
        manifest.settings["sentinels"] = tokenizer.count
    write_manifest(fs, str(out), manifest)
    return out
