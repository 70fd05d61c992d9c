"""Evaluation: windowed/stateful scoring equals a brute-force score, bits/byte is open-vocabulary
(each <unk> pays its spelling), bert's pseudo-perplexity and MLM accuracy, and bad text is a clear NLMError."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nlm.errors import NLMError
from nlm.evaluation import (
    evaluate_documents,
    metrics_to_record,
    read_documents,
    text_bytes,
    token_stream,
)
from nlm.models import build_model
from nlm.tokenizers import load_tokenizer, train_tokenizer
from nlm.tokenizers.base import UNK_ID
from nlm.tokenizers.spelling import SpellingModel


@pytest.fixture(scope="module")
def documents(data_mirror) -> list[str]:
    return read_documents(data_mirror / "wikitext-2" / "test.txt")[:6]


@pytest.fixture(scope="module")
def tokenizer(data_mirror):
    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    return train_tokenizer("word", lines[:400], vocab_size=400)


def _model(family: str, vocab_size: int):
    torch.manual_seed(0)
    return build_model(family, "tiny", vocab_size=vocab_size).eval()


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
    ).item()


def test_read_documents_and_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(" first line \n\n   \nzweite Zeile – ü\n", encoding="utf-8")
    docs = read_documents(path)
    assert docs == ["first line", "zweite Zeile – ü"]
    # one newline per document; "–" is 3 UTF-8 bytes and "ü" 2
    assert text_bytes(docs) == len("first line\n") + len("zweite Zeile  \n") + 3 + 2


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"", "no text to evaluate"),
        (b"  \n\n \t\n", "no text to evaluate"),
        (b"good line\nbad \xff byte\n", r"t.txt:2: not UTF-8 \(byte 0xff at byte offset 14\)"),
        ("dir", "t.txt: is a directory, not a text file"),
    ],
)
def test_read_documents_errors(content, message, tmp_path):
    path = tmp_path / "t.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(NLMError, match=message):
        read_documents(path)


@pytest.mark.parametrize("family", ["fnn", "rnn", "lstm", "gpt"])
def test_causal_score_equals_brute_force(family, documents, tokenizer):
    """Every prediction of `</s> doc1 </s> doc2 ...` is scored once, with the context the
    scheme promises: fnn exact (n-1 overlap), rnn/lstm exact with one stream (state carried),
    gpt the window each token falls in (checked token by token)."""
    docs = [" ".join(doc.split()[:25]) for doc in documents[:3]]  # ~80 predictions
    model = _model(family, tokenizer.vocab_size)
    stream = token_stream(tokenizer, docs)
    n = len(stream) - 1
    seq_len, stride = 16, 8
    result = evaluate_documents(
        model, tokenizer, docs, batch_size=3, seq_len=seq_len, stride=stride
    )
    if family in ("rnn", "lstm"):  # one stream: the state carries over every window boundary
        result = evaluate_documents(model, tokenizer, docs, batch_size=1, seq_len=seq_len)
    with torch.no_grad():
        if family == "gpt":
            expected = 0.0
            for j in range(1, n + 1):  # prediction j is scored in window ceil((j - L) / stride)
                start = max(0, math.ceil((j - seq_len) / stride)) * stride
                logits = model(stream[None, start:j]).logits[0, -1]
                expected += _nll(logits[None], stream[j : j + 1])
        else:
            expected = _nll(model(stream[None, :-1]).logits, stream[None, 1:])
    assert result["tokens"] == n
    assert result["nll"] == pytest.approx(expected / n, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(expected / n), rel=1e-5)
    assert result["bits_per_byte_closed_vocab"] == pytest.approx(
        expected / math.log(2) / text_bytes(docs), rel=1e-5
    )


def test_recurrent_parallel_streams_score_every_token(documents, tokenizer):
    model = _model("lstm", tokenizer.vocab_size)
    one = evaluate_documents(model, tokenizer, documents, batch_size=1, seq_len=32)
    many = evaluate_documents(model, tokenizer, documents, batch_size=5, seq_len=32)
    assert many["tokens"] == one["tokens"] == len(token_stream(tokenizer, documents)) - 1
    # streams 2..5 start without context: close to, not equal to, the one-stream score
    assert many["nll"] != one["nll"]
    assert many["nll"] == pytest.approx(one["nll"], rel=0.05)


def test_bits_per_byte_is_open_vocabulary(documents, tokenizer, tmp_path):
    """A 400-word vocabulary maps many test words to <unk>: the open-vocabulary bits/byte adds
    each one's spelling to the closed figure, and reports how much of the text that was."""
    char = train_tokenizer("char", documents)
    by_word = evaluate_documents(_model("gpt", tokenizer.vocab_size), tokenizer, documents)
    by_char = evaluate_documents(_model("gpt", char.vocab_size), char, documents)
    assert by_word["bytes"] == by_char["bytes"] == text_bytes(documents)
    assert by_char["tokens"] > 3 * by_word["tokens"]
    # gpt's default windows: 3/4 of the 64 tiny positions, a context floor of a quarter
    assert (by_word["seq_len"], by_word["stride"], by_word["context_floor"]) == (64, 48, 16)
    for r in (by_word, by_char):
        assert r["bits_per_byte_closed_vocab"] == pytest.approx(
            r["nll"] * r["tokens"] / math.log(2) / r["bytes"]
        )
    # the char tokenizer was trained on this text: nothing to spell, one figure; the text's
    # own literal <unk> markers are <unk> tokens for every tokenizer, but no bytes to spell
    literal = sum(doc.count("<unk>") for doc in documents)
    assert by_char["unk_tokens"] == literal > 0 and by_char["unk_bytes"] == 0
    assert by_char["bits_per_byte"] == by_char["bits_per_byte_closed_vocab"]
    # an untrained model is near-uniform: about log2(V) bits per token
    assert by_char["nll"] == pytest.approx(math.log(char.vocab_size), rel=0.1)

    words = [w for doc in documents for part in doc.split("<unk>") for w in part.split()]
    unknown = [w for w in words if tokenizer.token_to_id(w) is None]
    stream = token_stream(tokenizer, documents)
    assert by_word["unk_tokens"] == int((stream[1:] == UNK_ID).sum()) > len(unknown) > 0
    assert by_word["unk_rate"] == by_word["unk_tokens"] / by_word["tokens"]
    assert by_word["unk_bytes"] == sum(len(w.encode()) for w in unknown)
    assert by_word["unk_byte_share"] == by_word["unk_bytes"] / by_word["bytes"]
    spelling = sum(tokenizer.spelling.bits(w) for w in unknown)
    assert by_word["spelling_bits"] == pytest.approx(spelling)
    assert by_word["bits_per_byte"] == pytest.approx(
        by_word["bits_per_byte_closed_vocab"] + spelling / by_word["bytes"]
    )
    assert spelling / by_word["bytes"] > 0.5  # a large part of this text is out of vocabulary

    # a tokenizer saved before spelling models existed: the closed figure only, and a note
    tokenizer.save(tmp_path / "old")
    (tmp_path / "old" / "spelling.json").unlink()
    old = load_tokenizer(tmp_path / "old")
    assert old.spelling is None
    result = evaluate_documents(_model("gpt", old.vocab_size), old, documents)
    assert result["bits_per_byte"] is None and "no spelling model" in result["bits_per_byte_note"]
    assert result["bits_per_byte_closed_vocab"] == pytest.approx(
        by_word["bits_per_byte_closed_vocab"]
    )
    assert metrics_to_record(result)["test_bits_per_byte_closed_vocab"] == pytest.approx(
        result["bits_per_byte_closed_vocab"]
    )
    assert "test_bits_per_byte" not in metrics_to_record(result)


def test_spelling_model_is_a_distribution():
    """p_spell sums to at most 1 over all strings (the escape's share goes to unseen
    characters); seen, common spellings are cheaper than unseen characters."""
    speller = SpellingModel.estimate({"ab": 3, "ba": 1, "abc": 2})
    mass = sum(
        2 ** -speller.bits("".join(t)) for n in range(9) for t in itertools.product("abc", repeat=n)
    )
    assert 0.9 < mass < 1.0
    assert speller.bits("ab") < speller.bits("cc") < speller.bits("xy")
    assert speller.bits("日") > 3 * 8  # escape + three UTF-8 bytes at 8 bits


def test_bert_pseudo_perplexity_and_mlm(documents, tokenizer):
    model = _model("bert", tokenizer.vocab_size)
    result = evaluate_documents(model, tokenizer, documents, max_pll_tokens=5, seq_len=32, seed=1)
    assert result["ppl_kind"] == "pseudo" and result["bits_per_byte"] is None
    assert result["bits_per_byte_closed_vocab"] is None and result["unk_tokens"] > 0
    assert result["pll_tokens"] == 5 and result["mlm_masked"] > 0
    assert 0.0 <= result["mlm_accuracy"] <= 1.0
    assert result == evaluate_documents(
        model, tokenizer, documents, max_pll_tokens=5, seq_len=32, seed=1
    )

    # brute force: mask each of the first five ordinary tokens of the first sequence alone
    ids = [i for doc in tokenizer.encode_batch(documents) for i in doc][:30]
    sequence = torch.tensor([4, *ids, 5])  # [CLS] ... [SEP]
    positions = [p for p in range(1, len(sequence) - 1) if sequence[p] >= 7][:5]
    total = 0.0
    with torch.no_grad():
        for p in positions:
            masked = sequence.clone()
            masked[p] = 6
            logits = model(masked[None]).logits[0, p]
            total += _nll(logits[None], sequence[p : p + 1])
    assert result["pll_nll"] == pytest.approx(total / 5, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(total / 5), rel=1e-5)


def test_bad_options(documents, tokenizer):
    gpt = _model("gpt", tokenizer.vocab_size)  # tiny: 64 positions
    with pytest.raises(NLMError, match="--seq-len 65: exceeds the gpt model's 64 positions"):
        evaluate_documents(gpt, tokenizer, documents, seq_len=65)
    with pytest.raises(NLMError, match="--stride 40"):
        evaluate_documents(gpt, tokenizer, documents, seq_len=32, stride=40)
    with pytest.raises(NLMError, match="--stride 0: must be between 1"):  # not the default
        evaluate_documents(gpt, tokenizer, documents, seq_len=32, stride=0)
    with pytest.raises(NLMError, match="fnn's 3-token context"):
        evaluate_documents(_model("fnn", tokenizer.vocab_size), tokenizer, documents, seq_len=3)
    with pytest.raises(NLMError, match="--batch-size 0"):
        evaluate_documents(gpt, tokenizer, documents, batch_size=0)


def test_recorded_test_metrics_keep_pseudo_perplexity_apart():
    causal = {"ppl": 120.0, "ppl_kind": "causal", "bits_per_byte": 1.5, "tokens": 900}
    bert = {"ppl": 40.0, "ppl_kind": "pseudo", "bits_per_byte": None, "mlm_accuracy": 0.3}
    assert metrics_to_record(causal) == {
        "test_ppl": 120.0,
        "test_bits_per_byte": 1.5,
        "test_tokens": 900,
    }
    assert metrics_to_record(bert) == {"test_pseudo_ppl": 40.0, "test_mlm_accuracy": 0.3}


@pytest.mark.parametrize("family", ["fnn", "lstm", "gpt"])
def test_forward_calls_cut_to_the_logits_budget_score_the_same(
    family, documents, tokenizer, monkeypatch
):
    """Scoring cuts its forward calls so their (rows, V) logits stay under LOGITS_BUDGET (the
    page-fault cost of big blocks, nlm/evaluation.py); windows split across calls and
    recurrent windows cut shorter (the state carried) give the same score."""
    import nlm.evaluation as evaluation

    model = _model(family, tokenizer.vocab_size)
    whole = evaluate_documents(model, tokenizer, documents, batch_size=8, seq_len=32)
    monkeypatch.setattr(evaluation, "LOGITS_BUDGET", 5 * tokenizer.vocab_size)  # 5 rows a call
    cut = evaluate_documents(model, tokenizer, documents, batch_size=8, seq_len=32)
    assert cut["tokens"] == whole["tokens"]
    assert cut["nll"] == pytest.approx(whole["nll"], rel=1e-6)


def test_gpt_logits_to_keep_is_the_tail_of_the_full_forward(tokenizer):
    model = _model("gpt", tokenizer.vocab_size)
    ids = torch.randint(
        7, tokenizer.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1)
    )
    targets = torch.randint(7, tokenizer.vocab_size, (3, 12))
    with torch.no_grad():
        full = model(ids, targets=targets)
        tail = model(ids, targets=targets, logits_to_keep=5)
    assert tail.logits.shape == (3, 5, tokenizer.vocab_size)
    assert torch.allclose(tail.logits, full.logits[:, -5:], atol=1e-6)
    expected = F.cross_entropy(
        full.logits[:, -5:].reshape(-1, tokenizer.vocab_size), targets[:, -5:].reshape(-1)
    )
    assert tail.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_keep_freed_memory_applies_under_glibc():
    import platform

    from nlm.device import keep_freed_memory

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc
