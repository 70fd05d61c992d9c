"""Tokenizers: round trips on real English and segmented Chinese text, the vocabulary rules,
fixed special ids, save/load, byte-determinism, and clear errors for bad saved tokenizers."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from nlm.errors import NLMError
from nlm.tokenizers import KINDS, load_tokenizer, train_tokenizer
from nlm.tokenizers.base import (
    SPECIAL_IDS,
    SPECIAL_TOKENS,
    UNK_ID,
    cut_specials,
    fingerprint,
    split_specials,
)

SPM_VOCAB = 1000


@pytest.fixture(scope="module")
def wt2_lines(data_mirror) -> list[str]:
    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:1500]


@pytest.fixture(scope="module")
def pku_lines(data_mirror) -> list[str]:
    lines = (data_mirror / "pku" / "pku_test_gold.utf8").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()][:800]


def _train(kind: str, lines: list[str], segmented: bool = False):
    # byte_fallback: rare characters become byte pieces instead of <unk>, so round trips are exact.
    # Chinese needs room for its ~2400 characters.
    vocab_size = 3000 if segmented else SPM_VOCAB
    spm = {"vocab_size": vocab_size, "byte_fallback": True} if kind.startswith("spm-") else {}
    return train_tokenizer(kind, iter(lines), segmented=segmented, seed=0, **spm)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("corpus", ["wt2", "pku"])
def test_round_trip_and_save_load(kind, corpus, wt2_lines, pku_lines, tmp_path):
    lines, segmented = (wt2_lines, False) if corpus == "wt2" else (pku_lines, True)
    tok = _train(kind, lines, segmented)  # a one-shot iterator: training streams
    sample = lines[:50]
    for line in sample:
        text = tok.decode(tok.encode(line))
        if kind == "char" and segmented:  # the segmentation spaces are not characters
            assert text == "".join(line.split())
        elif kind == "char":  # exact, spaces included
            assert text == line
        else:  # words and pieces: whitespace runs become single spaces
            assert text == " ".join(line.split())
    assert tok.encode_batch(sample) == [tok.encode(line) for line in sample]

    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.encode_batch(sample) == tok.encode_batch(sample)
    assert [again.id_to_token(i) for i in range(tok.vocab_size)] == [
        tok.id_to_token(i) for i in range(tok.vocab_size)
    ]


@pytest.mark.parametrize("kind", list(KINDS))
def test_special_ids_fixed_and_literal_specials(kind, wt2_lines):
    tok = _train(kind, wt2_lines[:300])
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.id_to_token(i) == token
        assert tok.token_to_id(token) == i
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (4, 5, 6)
    # WikiText's literal <unk> is the unknown token; a fill-mask query's [MASK] is the mask id.
    ids = tok.encode("the <unk> of [MASK]")
    assert UNK_ID in ids and 6 in ids and ids.count(UNK_ID) == 1
    assert tok.decode(ids) == "the <unk> of [MASK]"
    assert tok.decode(ids, skip_special=True).strip() == "the <unk> of"  # char keeps the space
    assert tok.decode([0, 0, *tok.encode("the")]) == "the"  # <pad> never shows
    assert tok.token_to_id("surely-not-a-token-§§§") is None


# Literal special tokens in every position: alone, adjacent, at the ends, inside words, in
# broken forms that are not special tokens, several kinds in one text.
LITERAL_SPECIALS = [
    "the <unk> of [MASK]",
    "<unk>",
    "<unk><unk> x <unk>",
    "a<unk>b",
    " <unk> ",
    "",
    "no special token here",
    "[CLS] a [SEP] b [SEP]",
    "<s> x </s> <pad>",
    "<un k> [MASK [MASK]] <<unk>> [[SEP]",
    "< [ ] >",
]


def _reference_cut(text: str) -> tuple[list[str], list[int]]:
    """What cut_specials must give for one text: the regex's pieces and special ids."""
    pieces, ids, current = [], [], ""
    for part in split_specials(text):
        if part in SPECIAL_IDS:
            pieces.append(current)
            ids.append(SPECIAL_IDS[part])
            current = ""
        else:
            current += part
    return [*pieces, current], ids


@pytest.mark.parametrize(
    "texts",
    [
        LITERAL_SPECIALS,
        [t for t in LITERAL_SPECIALS if "[" not in t],  # one kind of special: str.split
        ["a <unk> b", "c <unk>", "<unk> d"],
        ["plain", "text"],
        [],
    ],
)
def test_cut_specials_matches_the_regex(texts):
    cut = cut_specials(texts)
    expected = [_reference_cut(t) for t in texts]
    if not any(ids for _, ids in expected):
        assert cut is None
        return
    pieces, counts, ids = cut
    assert counts == [len(p) for p, _ in expected]
    assert pieces == [piece for p, _ in expected for piece in p]
    assert ids == [i for _, found in expected for i in found]


@pytest.mark.parametrize("kind", list(KINDS))
def test_encode_flat_equals_encode_batch(kind, wt2_lines):
    tok = _train(kind, wt2_lines[:300])
    batches = [wt2_lines[:200], LITERAL_SPECIALS, wt2_lines[:20] + LITERAL_SPECIALS, [], ["a"]]
    for texts in batches:
        lists = tok.encode_batch(texts)
        assert lists == [tok.encode(t) for t in texts]
        ids, lengths = tok.encode_flat(texts)
        assert ids.dtype == np.int32 and lengths.dtype == np.int64
        assert lengths.tolist() == [len(x) for x in lists]
        assert ids.tolist() == [i for x in lists for i in x]
    if kind.startswith("spm-"):
        # A literal special token is its id; the text around it is encoded as if the special
        # token were the end of one text and the start of another (the ids nlm always gave).
        for text in LITERAL_SPECIALS:
            expected = []
            for part in split_specials(text):
                expected += [SPECIAL_IDS[part]] if part in SPECIAL_IDS else tok.sp.encode(part)
            assert tok.encode(text) == expected


def test_word_vocabulary_rules():
    text = ["b a c a", "b a d <unk>", "e c"]  # a:3 b:2 c:2 d:1 e:1
    everything = train_tokenizer("word", text)
    assert everything.tokens[7:] == ["a", "b", "c", "d", "e"]  # count desc, then token
    assert everything.counts[7:] == [3, 2, 2, 1, 1]
    assert "<unk>" not in everything.tokens[7:]  # literal <unk> is not a word

    frequent = train_tokenizer("word", text, min_count=2)
    assert frequent.tokens[7:] == ["a", "b", "c"]
    assert frequent.encode("d a x") == [UNK_ID, 7, UNK_ID]

    top = train_tokenizer("word", text, vocab_size=7 + 2)  # V counts the specials
    assert top.vocab_size == 9 and top.tokens[7:] == ["a", "b"]
    assert top.encode("c a") == [UNK_ID, 7]

    both = train_tokenizer("word", text, vocab_size=100, min_count=2)
    assert both.tokens[7:] == ["a", "b", "c"]

    with pytest.raises(NLMError, match="vocab_size"):
        train_tokenizer("word", text, vocab_size=5)
    with pytest.raises(NLMError, match="min_count"):
        train_tokenizer("word", text, min_count=0)


def test_word_vocabulary_on_segmented_chinese(pku_lines):
    tok = train_tokenizer("word", pku_lines, vocab_size=500)
    assert tok.vocab_size == 500
    counts = tok.counts[7:]
    assert counts == sorted(counts, reverse=True)
    counter = Counter(w for line in pku_lines for w in line.split())
    expected = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:493]
    assert tok.tokens[7:] == [w for w, _ in expected]
    assert tok.tokens[7:9] == ["，", "的"]  # People's Daily's most frequent words
    frequent = train_tokenizer("word", pku_lines, min_count=5)
    assert min(frequent.counts[7:]) >= 5
    assert frequent.vocab_size < train_tokenizer("word", pku_lines).vocab_size


def test_char_vocabulary_rules():
    tok = train_tokenizer("char", ["aab", "bc a"], min_count=2)
    assert tok.tokens[7:] == ["a", "b"]
    assert tok.encode("abc") == [7, 8, UNK_ID]
    seg = train_tokenizer("char", ["中国  人民"], segmented=True)
    assert " " not in seg.tokens and seg.decode(seg.encode("人民  中国")) == "人民中国"


@pytest.mark.parametrize("kind", list(KINDS))
def test_saved_files_are_byte_deterministic(kind, pku_lines, tmp_path):
    for name in ("one", "two"):
        _train(kind, pku_lines[:400], segmented=True).save(tmp_path / name)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").iterdir()}
    assert one == two
    assert fingerprint(tmp_path / "one") == fingerprint(tmp_path / "two")
    assert json.loads(one["nlm-tokenizer.json"])["kind"] == kind


def test_spm_seed_and_sample(wt2_lines):
    def proto(seed: int) -> bytes:
        return train_tokenizer(
            "spm-bpe", wt2_lines, vocab_size=SPM_VOCAB, sample_size=200, seed=seed
        ).model_proto

    # the seed picks the bounded sample: same seed, same model; another seed, another sample
    assert proto(0) == proto(0)
    assert proto(0) != proto(1)
    with pytest.raises(NLMError, match="sample_size"):
        train_tokenizer("spm-bpe", wt2_lines, sample_size=0)
    with pytest.raises(NLMError, match="min_count"):
        train_tokenizer("spm-unigram", wt2_lines, min_count=2)


def test_bad_kinds_and_bad_saved_tokenizers(tmp_path, wt2_lines):
    with pytest.raises(NLMError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer("wordpiece", ["a b"])
    with pytest.raises(NLMError, match="no text"):
        train_tokenizer("word", iter([]))
    with pytest.raises(NLMError, match="no such tokenizer directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NLMError, match="tokenizer.json: missing"):
        load_tokenizer(tmp_path / "empty")

    train_tokenizer("word", wt2_lines[:50]).save(tmp_path / "word")
    (tmp_path / "word" / "vocab.json").write_text('[["<pad>", 0], ["oops"', encoding="utf-8")
    with pytest.raises(NLMError, match="vocab.json: corrupt"):
        load_tokenizer(tmp_path / "word")
    (tmp_path / "word" / "nlm-tokenizer.json").write_text('{"kind": "nope"}')
    with pytest.raises(NLMError, match="unknown tokenizer kind 'nope'"):
        load_tokenizer(tmp_path / "word")
    (tmp_path / "word" / "nlm-tokenizer.json").write_text("{not json")
    with pytest.raises(NLMError, match="tokenizer.json: corrupt"):
        load_tokenizer(tmp_path / "word")

    _train("spm-unigram", wt2_lines[:200]).save(tmp_path / "spm")
    model = tmp_path / "spm" / "spm.model"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(NLMError, match="corrupt SentencePiece model"):
        load_tokenizer(tmp_path / "spm")


@pytest.mark.parametrize("kind", ["spm-bpe", "spm-unigram"])
def test_sentencepiece_is_open_vocabulary_by_default(kind, wt2_lines, tmp_path):
    """Byte fallback is on by default: characters never seen in training (CJK in an English
    tokenizer, a snowman) become byte pieces, not <unk>, and decode gives them back; with it
    off they are <unk>, and the saved spelling model prices them."""
    text = "the 日本語 text ☃ ends"
    tok = train_tokenizer(kind, wt2_lines[:300], vocab_size=600)
    ids = tok.encode(text)
    assert UNK_ID not in ids and tok.decode(ids) == text
    assert tok.unknown_spans([text]) == [[]] and tok.spelling is None
    assert any(tok.id_to_token(i).startswith("<0x") for i in ids)

    closed = train_tokenizer(kind, wt2_lines[:300], vocab_size=600, byte_fallback=False)
    assert UNK_ID in closed.encode(text)
    spans = closed.unknown_spans([text, "a <unk> b"])  # a literal <unk> is the text's own
    assert [p for p in spans[0]] == ["日本語", "☃"] and spans[1] == []
    closed.save(tmp_path / "closed")
    again = load_tokenizer(tmp_path / "closed")
    assert again.spelling.bits("日本語") == closed.spelling.bits("日本語") > 3 * 3 * 8


def test_word_tokenizer_spelling_model_is_saved(wt2_lines, tmp_path):
    tok = train_tokenizer("word", wt2_lines, min_count=3)
    assert tok.unknown_spans(["the zyzzyva <unk> of"]) == [["zyzzyva"]]
    tok.save(tmp_path / "w")
    again = load_tokenizer(tmp_path / "w")
    assert again.spelling.bits("zyzzyva") == tok.spelling.bits("zyzzyva")
    # estimated on the training words the vocabulary leaves out (what <unk> stands for), each
    # character and the end of each word counted once per occurrence
    counts = Counter(
        w
        for line in wt2_lines
        for p in split_specials(line)
        if p not in SPECIAL_IDS
        for w in p.split()
    )
    left_out = {w: n for w, n in counts.items() if n < 3}
    assert sum(tok.spelling.unigrams.values()) == sum((len(w) + 1) * n for w, n in left_out.items())
    (tmp_path / "w" / "spelling.json").write_text("{", encoding="utf-8")
    with pytest.raises(NLMError, match="spelling.json: corrupt spelling model"):
        load_tokenizer(tmp_path / "w")


def test_too_small_a_vocabulary_for_byte_fallback_is_one_clear_error(wt2_lines):
    with pytest.raises(NLMError, match=r"vocab_size=300: too small .* 256 byte pieces"):
        train_tokenizer("spm-bpe", wt2_lines[:300], vocab_size=300)
    train_tokenizer("spm-bpe", wt2_lines[:300], vocab_size=300, byte_fallback=False)  # fits
