"""`nlm prepare` through the real CLI in a subprocess: bad input gives one line on stderr,
exit status 2, no traceback and no manifest; a good run prints its JSON summary.

Most bad inputs are caught before Ray starts (planning, or the tokenizer's training sample,
which covers these small corpora); one case goes through the Ray actors of a fresh local
instance, as `nlm prepare` does for a corpus bigger than the sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nlm.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]


def nlm(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # a local instance of its own
    return subprocess.run(
        [sys.executable, "-m", "nlm", "prepare", *args, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nlm: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def corpus(tmp_path: Path, data_mirror: Path) -> Path:
    directory = tmp_path / "corpus"
    directory.mkdir()
    text = (data_mirror / "ptb" / "valid.txt").read_text(encoding="utf-8").splitlines()[:300]
    (directory / "a.txt").write_text("\n".join(text[:150]) + "\n", encoding="utf-8")
    (directory / "b.txt").write_text("\n".join(text[150:]) + "\n", encoding="utf-8")
    return directory


def no_manifest(out: Path) -> bool:
    return not (out / "manifest.json").exists() and not list(out.rglob("*.parquet"))


def test_empty_input_set(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    result = nlm("--input", str(tmp_path / "empty" / "*.txt"), "--output", str(out))
    assert_one_line_error(result, "matches no files")
    assert no_manifest(out)


def test_non_utf8_file_names_file_and_line(tmp_path, corpus):
    (corpus / "c.txt").write_bytes(b"good line\nanother one\nbad \xc3\x28 line\n")
    out = tmp_path / "out"
    result = nlm("--input", str(corpus), "--line-docs", "--tokenizer", "word", "--output", str(out))
    assert_one_line_error(result, f"{corpus / 'c.txt'}:3", "not valid UTF-8")
    assert no_manifest(out)


def test_jsonl_line_without_text(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one doc"}\n{"title": "no text here"}\n', encoding="utf-8")
    out = tmp_path / "out"
    result = nlm("--input", str(path), "--tokenizer", "char", "--output", str(out))
    assert_one_line_error(result, f"{path}:2 (field 'text'): missing")
    assert no_manifest(out)


def test_document_over_the_size_limit(tmp_path, corpus):
    out = tmp_path / "out"
    result = nlm("--input", str(corpus), "--max-doc-bytes", "1k", "--output", str(out))
    assert_one_line_error(result, str(corpus / "a.txt"), "over --max-doc-bytes 1024")
    assert no_manifest(out)


def test_unreadable_file(tmp_path, corpus):
    if os.geteuid() == 0:
        # root reads through any permission bits; /proc/self/mem refuses a read at offset 0.
        bad = "/proc/self/mem"
    else:
        (corpus / "locked.txt").write_text("secret\n", encoding="utf-8")
        (corpus / "locked.txt").chmod(0)
        bad = str(corpus / "locked.txt")
    out = tmp_path / "out"
    result = nlm("--input", str(corpus), bad, "--tokenizer", "word", "--output", str(out))
    assert_one_line_error(result, Path(bad).name, "cannot read")
    assert no_manifest(out)


def test_bad_config_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("input: x.txt\nsequence_length: 12\n", encoding="utf-8")
    result = nlm("--config", str(config), "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "unknown field 'sequence_length'")


def test_worker_error_then_skip_bad(tmp_path, corpus):
    """Through the Ray actors (a saved tokenizer means no training sample is read first)."""
    from nlm.tokenizers import train_tokenizer

    tok = tmp_path / "tok"
    train_tokenizer("word", (corpus / "a.txt").read_text(encoding="utf-8").splitlines()).save(tok)
    (corpus / "c.jsonl").write_text(
        '{"text": "fine"}\n{"text": 3}\n{"text": "also fine"}\n', encoding="utf-8"
    )
    out = tmp_path / "out"
    args = [
        "--input",
        str(corpus),
        "--line-docs",
        "--tokenizer-from",
        str(tok),
        "--output",
        str(out),
        "--seq-len",
        "16",
        "--workers",
        "1",
    ]
    result = nlm(*args)
    assert_one_line_error(result, f"{corpus / 'c.jsonl'}:2 (field 'text'): not a string")
    assert no_manifest(out)

    result = nlm(*args, "--skip-bad", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == 1 and summary["train"]["rows"] > 0
    manifest = read_manifest(out)
    assert manifest.skipped["reasons"] == {"missing_text": 1}
    assert manifest.splits["train"]["documents"] + manifest.splits["val"]["documents"] == 302
    assert (out / "tokenizer" / "nlm-tokenizer.json").is_file()
