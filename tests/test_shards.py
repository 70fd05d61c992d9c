"""The corpus pipeline in-process on the session's local Ray: shards decode back to the token
stream, pack without padding, are byte-identical across runs and worker counts, split by
content, pair sentences for BERT, refuse a foreign tokenizer, and report bad documents."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nlm.cluster.prepare.encode import document_ids, mlm_rows, split_sentences
from nlm.cluster.prepare.pipeline import PrepareConfig, prepare
from nlm.cluster.prepare.sources import Skips, find_sources, is_val, plan_units, read_documents
from nlm.errors import NLMError
from nlm.shards import MANIFEST, check_tokenizer, clm_stream, iter_tables, read_manifest
from nlm.tokenizers import load_tokenizer, train_tokenizer
from nlm.tokenizers.base import CLS_ID, EOS_ID, PAD_ID, SEP_ID

SEQ = 32


@pytest.fixture(scope="module")
def paragraphs(data_mirror: Path) -> list[str]:
    """Non-blank WikiText paragraphs (one per line), the first ~90 kB."""
    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").split("\n")
    kept, size = [], 0
    for line in lines:
        if line.strip():
            kept.append(line)
            size += len(line)
        if size > 90_000:
            break
    return kept


def write_files(
    directory: Path, paragraphs: list[str], n_files: int, prefix: str = "doc"
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_files):
        path = directory / f"{prefix}-{i:03d}.txt"
        path.write_text("\n".join(paragraphs[i::n_files]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory, paragraphs) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "word"
    train_tokenizer("word", paragraphs).save(directory)
    return directory


def run(ray_local, **fields) -> tuple[Path, object]:
    fields.setdefault("seq_len", SEQ)
    fields.setdefault("workers", 2)
    fields.setdefault("progress", False)
    manifest, stats = prepare(PrepareConfig(**fields))
    return Path(fields["output"]), manifest


def reference_stream(tok, texts: list[str], val: bool, val_fraction: float) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        if is_val(text.encode(), val_fraction) == val:
            ids += document_ids(tok, text) + [EOS_ID]
    return np.array(ids, dtype=np.int32)


def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_clm_round_trip_and_packing(ray_local, tmp_path, paragraphs, word_tokenizer):
    files = write_files(tmp_path / "in", paragraphs, 3)
    out, manifest = run(
        ray_local,
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "shards"),
        line_docs=True,
        tokenizer_from=str(word_tokenizer),
        unit_bytes=16_000,
        val_fraction=0.1,
    )
    tok = load_tokenizer(out / "tokenizer")
    texts = [
        line for f in files for line in f.read_text(encoding="utf-8").split("\n") if line.strip()
    ]
    for split, val in (("train", False), ("val", True)):
        expected = reference_stream(tok, texts, val, 0.1)
        assert manifest.splits[split]["tokens"] == len(expected)
        rows, positions = [], []
        for table in iter_tables(out, split):
            assert table.schema.field("input_ids").type == pa.list_(pa.int32())
            assert table.schema.field("stream_pos").type == pa.int64()
            rows += table.column("input_ids").to_pylist()
            positions += table.column("stream_pos").to_pylist()
        assert rows and all(len(r) == SEQ + 1 for r in rows)  # exactly seq_len+1, never padded
        assert positions == list(range(len(rows)))
        assert all(a[-1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
        assert PAD_ID not in {t for r in rows for t in r}
        stream = clm_stream(out, split)
        assert len(stream) == len(rows) * SEQ + 1
        # Everything but a tail shorter than one row is kept, in order.
        assert len(expected) - len(stream) < SEQ + 1
        np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert manifest.splits["val"]["documents"] > 0
    assert manifest.sources == [{"path": str(f), "bytes": f.stat().st_size} for f in files]
    check_tokenizer(manifest, out / "tokenizer")
    check_tokenizer(out, word_tokenizer)  # the copy next to the shards is the same tokenizer
    # Another tokenizer (even of the same kind, on other text) is refused by the trainer's check.
    other = tmp_path / "other-tok"
    train_tokenizer("word", paragraphs[:20]).save(other)
    with pytest.raises(NLMError, match="fingerprint"):
        check_tokenizer(manifest, other)
    (out / MANIFEST).unlink()
    with pytest.raises(NLMError, match="manifest.json: missing"):
        read_manifest(out)


def test_same_command_gives_identical_bytes(ray_local, tmp_path, paragraphs):
    write_files(tmp_path / "in", paragraphs[:150], 2)
    common = dict(
        input=[str(tmp_path / "in" / "*.txt")],
        line_docs=True,
        tokenizer="spm-bpe",
        vocab_size=600,  # byte fallback's 256 byte pieces + the text's characters fit
        unit_bytes=8_000,
        seed=7,
    )
    a, _ = run(ray_local, output=str(tmp_path / "a"), workers=1, **common)
    b, _ = run(ray_local, output=str(tmp_path / "b"), workers=2, **common)
    digests = file_digests(a)
    assert any(name.startswith("train/part-") for name in digests)
    assert digests == file_digests(b)  # shards, tokenizer and manifest alike


def test_split_is_stable_when_files_are_added(ray_local, tmp_path, paragraphs, word_tokenizer):
    write_files(tmp_path / "in", paragraphs[:200], 2, prefix="a")
    first, m1 = run(
        ray_local,
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "s1"),
        line_docs=True,
        tokenizer_from=str(word_tokenizer),
        val_fraction=0.2,
    )
    write_files(tmp_path / "in", paragraphs[200:], 2, prefix="b")  # sorts after the old files
    second, m2 = run(
        ray_local,
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "s2"),
        line_docs=True,
        tokenizer_from=str(word_tokenizer),
        val_fraction=0.2,
    )
    assert m2.splits["val"]["documents"] > m1.splits["val"]["documents"] > 0
    for split in ("train", "val"):
        old, new = clm_stream(first, split), clm_stream(second, split)
        # The old documents keep their split and order: the old stream is a prefix.
        np.testing.assert_array_equal(new[: len(old)], old)
    # The split is a function of the document alone.
    doc = paragraphs[3].encode()
    assert is_val(doc, 0.2) == is_val(bytes(doc), 0.2)


def test_mlm_pairs(ray_local, tmp_path, paragraphs, word_tokenizer):
    write_files(tmp_path / "in", paragraphs, 2)
    out, manifest = run(
        ray_local,
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "mlm"),
        line_docs=True,
        tokenizer_from=str(word_tokenizer),
        objective="mlm",
        seq_len=64,
    )
    table = pa.concat_tables(iter_tables(out, "train"))
    assert table.schema.field("token_type_ids").type == pa.list_(pa.int8())
    assert table.schema.field("nsp_label").type == pa.int8()
    labels = np.array(table.column("nsp_label").to_pylist())
    assert len(labels) > 300
    assert 0.4 < labels.mean() < 0.6  # about half the B sentences are random
    for ids, types in zip(
        table.column("input_ids").to_pylist(),
        table.column("token_type_ids").to_pylist(),
        strict=True,
    ):
        assert len(ids) <= 64 and len(types) == len(ids)
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID and ids.count(SEP_ID) == 2
        first_b = ids.index(SEP_ID) + 1
        assert types == [0] * first_b + [1] * (len(ids) - first_b)
    assert manifest.splits["train"]["rows"] == len(labels)
    assert split_sentences("One. Two! Three?\nFour") == ["One.", "Two!", "Three?", "Four"]
    assert split_sentences("他来了。 我走了！好") == ["他来了。", "我走了！", "好"]


def test_one_sentence_documents_give_mlm_rows(word_tokenizer):
    tok = load_tokenizer(word_tokenizer)
    docs = [f"the {w} was a game of the season" for w in ("first", "second", "third", "last")]
    docs += ["game"]  # one token: nothing to pair
    input_ids, token_types, labels = mlm_rows(tok, docs, 64, random.Random(0))
    assert len(labels) == 4  # one row per multi-token sentence, none for "game"
    assert 0 in labels and 1 in labels
    for ids, types, label in zip(input_ids, token_types, labels, strict=True):
        a = ids[1 : ids.index(SEP_ID)]
        b = ids[ids.index(SEP_ID) + 1 : -1]
        assert len(a) == 4  # the first half of an 8-word sentence
        if label == 0:  # IsNext: B is the same sentence's second half
            assert len(b) == 4 and tok.decode(a + b) in docs
        assert sum(types) == len(b) + 1


def test_many_small_files_give_many_blocks(ray_local, tmp_path, paragraphs, word_tokenizer):
    files = write_files(tmp_path / "in", paragraphs, 60)
    out, manifest = run(
        ray_local,
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "s"),
        tokenizer_from=str(word_tokenizer),
        unit_bytes=4_000,
        rows_per_file=40,
        val_fraction=0.0,
    )
    # One document per file; ~1.5 kB files, 4 kB units: about 25 units.
    units = plan_units(
        find_sources([str(tmp_path / "in")]),
        line_docs=False,
        unit_bytes=4_000,
        max_doc_bytes=1 << 20,
        text_column="text",
        skips=Skips(False),
    )
    assert len(units) >= 20
    train = manifest.files("train")
    assert len(train) >= 10 and train == sorted(train)
    assert manifest.splits["train"]["documents"] == len(files)
    assert manifest.splits["val"]["rows"] == 0
    positions = [p for t in iter_tables(out, "train") for p in t.column("stream_pos").to_pylist()]
    assert positions == list(range(manifest.splits["train"]["rows"]))
    tok = load_tokenizer(out / "tokenizer")
    expected = reference_stream(tok, [f.read_text(encoding="utf-8") for f in files], False, 0.0)
    stream = clm_stream(out, "train")
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_jsonl_and_parquet_inputs(ray_local, tmp_path, paragraphs, word_tokenizer):
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "a.jsonl", "w", encoding="utf-8") as f:
        for p in paragraphs[:60]:
            f.write(json.dumps({"id": 1, "text": p}) + "\n")
    pq.write_table(
        pa.table({"text": paragraphs[60:120]}), tmp_path / "in" / "b.parquet", row_group_size=16
    )
    out, manifest = run(
        ray_local,
        input=[str(tmp_path / "in")],
        output=str(tmp_path / "s"),
        tokenizer_from=str(word_tokenizer),
        val_fraction=0.0,
    )
    tok = load_tokenizer(out / "tokenizer")
    expected = reference_stream(tok, paragraphs[:120], False, 0.0)
    stream = clm_stream(out, "train")
    assert manifest.splits["train"]["documents"] == 120
    np.testing.assert_array_equal(stream, expected[: len(stream)])


def test_bad_document_in_a_worker(ray_local, tmp_path, paragraphs, word_tokenizer):
    """Errors found by a Ray actor: fatal and cleaned up, or skipped and counted."""
    write_files(tmp_path / "in", paragraphs[:40], 2)
    (tmp_path / "in" / "doc-002.txt").write_bytes(b"fine line\nbad \xff line\nlast line\n")
    fields = dict(input=[str(tmp_path / "in")], line_docs=True, tokenizer_from=str(word_tokenizer))
    with pytest.raises(NLMError, match=r"doc-002.txt:2: not valid UTF-8"):
        run(ray_local, output=str(tmp_path / "s"), **fields)
    assert not (tmp_path / "s" / MANIFEST).exists()
    assert not list((tmp_path / "s").rglob("*.parquet"))
    out, manifest = run(ray_local, output=str(tmp_path / "s"), skip_bad=True, **fields)
    assert manifest.skipped["documents"] == 1
    assert manifest.skipped["reasons"] == {"not_utf8": 1}
    assert "doc-002.txt:2" in manifest.skipped["examples"][0]
    assert manifest.splits["train"]["documents"] + manifest.splits["val"]["documents"] == 42


def test_line_ranges_cover_every_line_once(tmp_path):
    lines = [f"line {i} " + "x" * (i * 7 % 23) for i in range(200)] + ["y" * 300, "tail"]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines), encoding="utf-8")  # no final newline
    for unit_bytes in (1, 5, 64, 1000, 100_000):
        units = plan_units(
            find_sources([str(path)]),
            line_docs=True,
            unit_bytes=unit_bytes,
            max_doc_bytes=1 << 20,
            text_column="text",
            skips=Skips(False),
        )
        got = [
            text
            for u in units
            for text, _ in read_documents(
                u, line_docs=True, text_column="text", max_doc_bytes=1 << 20, skips=Skips(False)
            )
        ]
        assert got == lines, unit_bytes
    # A line over the limit is skipped (or fatal) wherever the unit boundaries fall.
    skips = Skips(True)
    units = plan_units(
        find_sources([str(path)]),
        line_docs=True,
        unit_bytes=50,
        max_doc_bytes=200,
        text_column="text",
        skips=skips,
    )
    got = [
        t
        for u in units
        for t, _ in read_documents(
            u, line_docs=True, text_column="text", max_doc_bytes=200, skips=skips
        )
    ]
    assert got == lines[:200] + ["tail"]
    assert skips.reasons == {"too_long": 1}
    assert skips.examples[0].startswith(f"{path}:201:")
