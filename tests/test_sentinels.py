"""T5's sentinel tokens as the tokenizer's own (issue 18, nlm/tokenizers/sentinels.py), and
Chinese word segmentation as text-to-text (nlm/finetune/cws_seq2seq.py). No Ray: plain units."""

from __future__ import annotations

import json

import pytest
import torch

from nlm.checkpoint import load_checkpoint, save_checkpoint
from nlm.errors import NLMError
from nlm.finetune.cws import score_segmentation
from nlm.finetune.cws_seq2seq import Seq2SeqSegmenter, convert_cws_seq2seq, word_windows
from nlm.models.transformer import Transformer, TransformerConfig
from nlm.tokenizers import load_tokenizer, train_tokenizer
from nlm.tokenizers.base import SEP_ID, fingerprint
from nlm.tokenizers.sentinels import SENTINEL_FILE, sentinel_count, with_sentinels

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the cat and the dog"] * 20


@pytest.mark.parametrize("kind", ["word", "char", "spm-bpe", "spm-unigram"])
def test_sentinels_are_the_tokenizers_last_tokens(kind, tmp_path):
    options = {"vocab_size": 300} if kind.startswith("spm") else {}
    plain = train_tokenizer(kind, TEXTS, **options)
    tok = with_sentinels(plain, 3)
    first = plain.vocab_size
    assert (tok.kind, tok.first_sentinel, tok.vocab_size) == (kind, first, first + 3)
    text = "the cat <extra_id_1> on the mat"
    ids = tok.encode(text)
    assert ids == plain.encode("the cat ") + [first + 1] + plain.encode(" on the mat")
    assert tok.encode("<extra_id_3>") == plain.encode("<extra_id_3>")  # past the 3: plain text
    assert [tok.id_to_token(first + k) for k in range(3)] == [f"<extra_id_{k}>" for k in range(3)]
    assert tok.token_to_id("<extra_id_2>") == first + 2 and tok.is_special(first)
    assert "<extra_id_1>" in tok.decode(ids, skip_special=True)
    assert tok.decode(plain.encode("the cat")) == plain.decode(plain.encode("the cat"))
    # saved with the tokenizer; the fingerprint tells it from the plain one
    tok.save(tmp_path / "s")
    plain.save(tmp_path / "p")
    loaded = load_tokenizer(tmp_path / "s")
    assert sentinel_count(loaded) == 3 and loaded.encode(text) == ids
    assert sentinel_count(load_tokenizer(tmp_path / "p")) == 0
    assert fingerprint(tmp_path / "s") != fingerprint(tmp_path / "p")
    # exported to Hugging Face as additional special tokens with nlm's ids
    from nlm.hf.tokenizer import fast_tokenizer

    fast = fast_tokenizer(loaded, "transformer", 64)
    assert fast.extra_special_tokens == ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
    assert fast(text)["input_ids"] == ids and len(fast) == tok.vocab_size


def test_corrupt_sentinel_file_is_one_line(tmp_path):
    with_sentinels(train_tokenizer("word", TEXTS), 2).save(tmp_path)
    (tmp_path / SENTINEL_FILE).write_text('{"count": -1}')
    with pytest.raises(NLMError, match=r"sentinels.json \(field 'count'\)"):
        load_tokenizer(tmp_path)


def test_old_span_checkpoint_loads_with_its_sentinels(tmp_path):
    """A checkpoint saved before the sentinels joined the tokenizer: the model's rows past the
    plain tokenizer's vocabulary are the sentinels."""
    plain = train_tokenizer("word", TEXTS)
    model = Transformer(
        TransformerConfig(
            vocab_size=plain.vocab_size + 4,
            max_positions=16,
            n_layer=1,
            n_head=2,
            n_embd=8,
            ffn_size=16,
            dropout=0.0,
        )
    )
    save_checkpoint(tmp_path / "old", model, plain)
    loaded = load_checkpoint(tmp_path / "old")
    assert loaded.tokenizer.vocab_size == model.config.vocab_size
    assert loaded.tokenizer.id_to_token(plain.vocab_size + 3) == "<extra_id_3>"
    assert not (tmp_path / "old" / "tokenizer" / SENTINEL_FILE).exists()


def test_cws_as_text_to_text(tmp_path):
    lines = ["共同 创造 美好 的 新 世纪 。", "迈向 充满 希望 的 新 世纪"] * 5
    (tmp_path / "gold.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    stats = convert_cws_seq2seq(
        tmp_path / "gold.txt", tmp_path / "train.jsonl", tmp_path / "test.jsonl", 0.2, 8
    )
    first = json.loads((tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert first == {"source": "共同创造美好的新", "target": "共同[SEP]创造[SEP]美好[SEP]的[SEP]新"}
    assert stats["max_chars"] == 8 and word_windows(["一二三四五"], 2) == [
        ["一二"],
        ["三四"],
        ["五"],
    ]
    tok = train_tokenizer("char", lines, segmented=True)
    assert tok.encode(first["target"]).count(SEP_ID) == 4
    torch.manual_seed(0)
    model = Transformer(
        TransformerConfig(
            vocab_size=tok.vocab_size,
            max_positions=16,
            n_layer=1,
            n_head=2,
            n_embd=16,
            ffn_size=32,
            dropout=0.0,
        )
    )
    segmenter = Seq2SeqSegmenter(model, tok)
    assert segmenter.max_chars == 8  # 8 characters + 7 separators + </s> = 16 positions
    text = "共同创造美好的新世纪。迈向充满希望的新世纪"
    words = segmenter.segment([text])[0]
    assert "".join(words) == text  # constrained: the characters, in order, whatever the model
    # the SIGHAN scorer takes it; an untrained model scores what it scores
    score = score_segmentation([lines[0].split()], segmenter.segment(["共同创造美好的新世纪。"]))
    assert 0 <= score["f1"] <= 1
