"""Word vectors and neighbours (nlm/wordvectors.py) and `nlm neighbors`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from nlm.errors import NLMError
from nlm.models.base import LanguageModel
from nlm.tokenizers import train_tokenizer
from nlm.tokenizers.base import SPECIAL_TOKENS
from nlm.wordvectors import is_wordlike, neighbors, sample_words, word_vectors

# "cat"/"dog" and "red"/"blue" get planted near-duplicate vectors below
TEXT = [
    "the cat sat on the mat , and the dog sat on the rug .",
    "a red car and a blue car ; the cat and the dog ran .",
    "the the the cat cat cat dog dog dog red red red blue blue blue 42 42 42 !",
    "经济 发展 人民 经济 发展 人民 经济 发展 , 。",
]


class Planted(LanguageModel):
    """A minimal LanguageModel whose tables the test sets directly."""

    family = "planted"

    def __init__(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        super().__init__(config=None)  # type: ignore[arg-type]
        self.embed = nn.Embedding(*inp.shape)
        self.embed.weight.data.copy_(inp)
        self.out = nn.Parameter(out if out is not None else inp.clone())

    def input_embeddings(self) -> nn.Embedding:
        return self.embed

    def output_embeddings(self) -> torch.Tensor:
        return self.out


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer("word", TEXT)


@pytest.fixture(scope="module")
def model(tok):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(tok.vocab_size + 3, 8, generator=g)  # padded rows beyond the vocab
    for a, b in (("cat", "dog"), ("red", "blue")):
        table[tok.token_to_id(b)] = table[tok.token_to_id(a)] * 2 + 0.01
    # a special token pointing exactly at "cat" must never show up as a neighbour
    table[1] = table[tok.token_to_id("cat")]
    return Planted(table, out=torch.randn(tok.vocab_size + 3, 8, generator=g))


def test_neighbors_exclude_self_and_specials_sorted_in_range(tok, model):
    for word in ("cat", "the", "red", "经济"):
        result = neighbors(model, tok, word, k=5)
        tokens = [t for t, _ in result]
        sims = [s for _, s in result]
        assert len(result) == 5
        assert word not in tokens
        assert not set(tokens) & set(SPECIAL_TOKENS)
        assert sims == sorted(sims, reverse=True)
        assert all(-1.0 <= s <= 1.0 for s in sims)


def test_planted_pairs_are_nearest(tok, model):
    assert neighbors(model, tok, "cat", k=1)[0][0] == "dog"
    top = neighbors(model, tok, "blue", k=3)[0]
    assert top[0] == "red" and top[1] == pytest.approx(1.0, abs=1e-3)


def test_which_tables(tok, model):
    inp = word_vectors(model, "input")
    out = word_vectors(model, "output")
    assert torch.equal(inp, model.embed.weight)
    assert torch.allclose(word_vectors(model, "average"), (inp + out) / 2)
    assert neighbors(model, tok, "cat", k=3, which="output") != neighbors(model, tok, "cat", k=3)
    with pytest.raises(NLMError, match="unknown embedding"):
        word_vectors(model, "hidden")  # type: ignore[arg-type]


def test_unknown_word_lists_close_matches(tok, model):
    with pytest.raises(NLMError, match=r"unknown word 'cats' \(close matches: cat"):
        neighbors(model, tok, "cats")
    with pytest.raises(NLMError, match=r"unknown word '经验' \(close matches: 经济"):
        neighbors(model, tok, "经验")
    with pytest.raises(NLMError, match=r"'<unk>' is a special token"):
        neighbors(model, tok, "<unk>")


def test_sample_words_reproducible_filtered_and_frequent(tok):
    first = sample_words(tok, 4, seed=7, min_count=3)
    assert first == sample_words(tok, 4, seed=7, min_count=3)
    assert len(set(first)) == 4
    counts = dict(zip(tok.tokens, tok.counts, strict=True))  # the word tokenizer keeps counts
    assert all(counts[w] >= 3 and is_wordlike(w) for w in first)
    pool = set(sample_words(tok, 8, seed=0, min_count=3))  # every word seen >= 3 times
    assert pool == {"the", "and", "cat", "dog", "red", "blue", "经济", "发展"}  # not 42, 人民 (2)
    draws = {tuple(sample_words(tok, 4, seed=s, min_count=3)) for s in range(5)}
    assert len(draws) > 1  # the seed matters
    with pytest.raises(NLMError, match="cannot draw 9 words"):
        sample_words(tok, 9, seed=0, min_count=3)


# ------------------------------------------------------------ `nlm neighbors` on a checkpoint


@pytest.fixture(scope="module")
def checkpoint(tok, tmp_path_factory):
    from nlm.checkpoint import save_checkpoint
    from nlm.models import build_model

    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=tok.vocab_size, embed_dim=8, hidden_size=8, n_layer=1)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lstm", model, tok)


def _nlm(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "nlm", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_neighbors_cli_is_byte_identical_across_runs(checkpoint):
    args = ("neighbors", "--checkpoint", str(checkpoint), "--random", "3", "--k", "4")
    args += ("--seed", "7", "--min-count", "3")
    first, second = _nlm(*args), _nlm(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    lines = first.stdout.splitlines()
    assert len(lines) == 3 * 5  # a word, then its 4 neighbours
    assert lines[1].split()[0] == "1" and -1 <= float(lines[1].split()[1]) <= 1


def test_neighbors_cli_words_and_unknown_word(checkpoint, capsys):
    from nlm.checkpoint import load_checkpoint
    from nlm.cli import main

    main_args = ["neighbors", "--checkpoint", str(checkpoint), "--words", "cat,经济", "--k", "2"]
    with pytest.raises(SystemExit) as exit_:
        main(main_args)
    assert exit_.value.code == 0
    out = capsys.readouterr().out.splitlines()
    ckpt = load_checkpoint(checkpoint)
    expected = neighbors(ckpt.model, ckpt.tokenizer, "经济", k=2)
    assert out[3] == "经济" and out[4] == f"   1  {expected[0][1]:+.4f}  {expected[0][0]}"

    with pytest.raises(SystemExit) as exit_:
        main(["neighbors", "--checkpoint", str(checkpoint), "--words", "cat,dgo"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("nlm: error: unknown word 'dgo' (close matches: dog")


@pytest.mark.parametrize("family", ["elmo", "transformer"])
def test_neighbors_cli_reads_the_static_input_vectors_of_elmo_and_the_transformer(
    tok, tmp_path, capsys, family
):
    """`nlm neighbors` on the two newer families: elmo's token layer (shared by both
    directions) and the transformer's source (encoder input) table, here untied from the
    target table; the span sentinels past the tokenizer's vocabulary are never neighbours."""
    import json

    from nlm.checkpoint import save_checkpoint
    from nlm.cli import main
    from nlm.models import build_model

    torch.manual_seed(0)
    extra = {"share_embeddings": False, "tie_weights": False} if family == "transformer" else {}
    model = build_model(family, "tiny", vocab_size=tok.vocab_size + 4, **extra)
    cat, dog, red = (tok.token_to_id(w) for w in ("cat", "dog", "red"))
    with torch.no_grad():
        table = model.input_embeddings().weight
        table[dog] = table[cat] * 2 + 0.01  # planted: dog is cat's nearest static vector
        table[tok.vocab_size] = table[cat]  # the first sentinel points exactly at cat
        if family == "transformer":
            assert model.target_tokens is not model.source_tokens
            model.target_tokens.weight[red] = model.target_tokens.weight[cat]  # not read
    path = save_checkpoint(tmp_path / family, model, tok)
    with pytest.raises(SystemExit) as exit_:
        main(["neighbors", "--checkpoint", str(path), "--words", "cat", "--k", "3", "--json"])
    assert exit_.value.code == 0
    (found,) = json.loads(capsys.readouterr().out).values()
    assert found[0][0] == "dog" and found[0][1] > 0.99  # not the sentinel's exact 1.0
    assert [t for t, _ in found] == [t for t, _ in neighbors(model, tok, "cat", k=3)]
