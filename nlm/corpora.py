"""Named reference corpora and their benchmark splits.

`resolve_corpus("wt2-mini")` returns the train/test files of a named split. With
`NLM_DATA_MIRROR` set (CI sets it to ../shared/data) the files come from that mirror;
otherwise they are downloaded once from their public source into `~/.cache/nlm/corpora`
(or `$NLM_CACHE`) and checked against known SHA-256 sums. Splits that cut one file by lines
(pku-lm, shakespeare) are materialised as train.txt / test.txt in the cache.
Nothing here downloads during tests: tests always set the mirror.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.request
import uuid
from pathlib import Path

from nlm.errors import NLMError
from nlm.files import write_text

# relative path in the mirror -> (public URL, sha256)
SOURCES: dict[str, tuple[str, str]] = {
    "wikitext-2/valid.txt": (
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/valid.txt",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    ),
    "wikitext-2/test.txt": (
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/test.txt",
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    ),
    "tinyshakespeare/input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "pku/pku_test_gold.utf8": (
        "https://raw.githubusercontent.com/yuikns/icwb2-data/master/gold/pku_test_gold.utf8",
        "913f78b20b17ea1e154f6246644d7d624b2710641f109a15daee9d63c9fb88d4",
    ),
    "msr/msr_test_gold.utf8": (
        "https://raw.githubusercontent.com/yuikns/icwb2-data/master/gold/msr_test_gold.utf8",
        "cd1a8473841f1b2fcddd14d12599ad8872e6167feb64807af5bac2f6a32cb75d",
    ),
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    train: Path
    test: Path
    language: str  # "en" | "zh"
    segmented: bool  # whitespace is the word boundary (pre-segmented Chinese)


def cache_dir() -> Path:
    return Path(os.environ.get("NLM_CACHE", Path.home() / ".cache" / "nlm"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def data_file(relpath: str) -> Path:
    """A reference file from the mirror, or downloaded (once) into the cache."""
    mirror = os.environ.get("NLM_DATA_MIRROR")
    if mirror:
        path = Path(mirror) / relpath
        if not path.is_file():
            where = f" (resolved from {Path.cwd()})" if not Path(mirror).is_absolute() else ""
            raise NLMError(f"{path}: not found in NLM_DATA_MIRROR={mirror}{where}")
        return path
    url, sha = SOURCES[relpath]
    path = cache_dir() / "downloads" / relpath
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name: two processes downloading the same corpus must not share one.
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise NLMError(
                f"cannot download {url}: {exc} (set NLM_DATA_MIRROR to a local copy)"
            ) from None
        if _sha256(tmp) != sha:
            tmp.unlink()
            raise NLMError(f"{url}: checksum mismatch, refusing the download")
        os.replace(tmp, path)
    return path


def _split_lines(source: Path, name: str, fraction: float = 0.9) -> tuple[Path, Path]:
    """First `fraction` of lines -> train.txt, the rest -> test.txt (cached, keyed by content)."""
    out = cache_dir() / "corpora" / name / _sha256(source)[:16]
    train, test = out / "train.txt", out / "test.txt"
    if not (train.is_file() and test.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
        cut = int(len(lines) * fraction)
        for path, part in ((train, lines[:cut]), (test, lines[cut:])):
            write_text(path, "".join(part))
    return train, test


CORPORA = ("wt2-mini", "pku-lm", "shakespeare")


def resolve_corpus(name: str) -> Corpus:
    """The named benchmark split (see ../shared/data/README.md)."""
    if name == "wt2-mini":
        return Corpus(
            name, data_file("wikitext-2/valid.txt"), data_file("wikitext-2/test.txt"), "en", False
        )
    if name in ("pku-lm", "pku"):
        train, test = _split_lines(data_file("pku/pku_test_gold.utf8"), "pku-lm")
        return Corpus("pku-lm", train, test, "zh", True)
    if name == "shakespeare":
        train, test = _split_lines(data_file("tinyshakespeare/input.txt"), "shakespeare")
        return Corpus(name, train, test, "en", False)
    raise NLMError(f"unknown corpus '{name}' (known: {', '.join(CORPORA)})")
