"""The serving checkpoint: save -> load gives the same model for all five families, tied weights
stay tied, a run directory loads, and every kind of broken checkpoint is a one-line NLMError.
Loading never unpickles."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open

from nlm.checkpoint import load_checkpoint, save_checkpoint
from nlm.errors import NLMError
from nlm.models import FAMILIES, build_model
from nlm.tokenizers import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(data_mirror):
    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    return train_tokenizer("word", lines[:300], vocab_size=500)


def _model(family: str, vocab_size: int):
    torch.manual_seed(0)
    return build_model(family, "tiny", vocab_size=vocab_size).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def lstm_checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("ckpt") / "lstm"
    save_checkpoint(path, _model("lstm", tokenizer.vocab_size), tokenizer, metrics={"ppl": 1.5})
    return path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_identical(family, tokenizer, tmp_path):
    model = _model(family, tokenizer.vocab_size)
    ids = torch.tensor([tokenizer.encode("the game was released in the United States")])
    path = save_checkpoint(tmp_path / family, model, tokenizer, metrics={"steps": 3})

    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "tokenizer",
    ]
    assert [p.name for p in tmp_path.iterdir()] == [family]  # no temporary directory left
    loaded = load_checkpoint(path)
    assert loaded.family == family and loaded.metrics == {"steps": 3}
    assert not loaded.model.training
    assert loaded.tokenizer.encode("the game") == tokenizer.encode("the game")
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids), rtol=0, atol=0)

    # Tied weights: stored once in the file, one shared tensor again after loading.
    if model.config.tie_weights:
        assert loaded.model.output_embeddings() is loaded.model.input_embeddings().weight
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            stored = sum(
                f.get_slice(k).get_shape()
                == [tokenizer.vocab_size, model.input_embeddings().weight.shape[1]]
                for k in f.keys()
            )
        assert stored == 1


def test_run_directory_and_overwrite(tokenizer, tmp_path):
    model = _model("gpt", tokenizer.vocab_size)
    save_checkpoint(tmp_path / "run" / "model", model, tokenizer)
    save_checkpoint(tmp_path / "run" / "model", model, tokenizer, metrics={"again": True})
    loaded = load_checkpoint(tmp_path / "run")  # a run dir holding model/
    assert loaded.family == "gpt" and loaded.metrics == {"again": True}
    assert loaded.path == tmp_path / "run" / "model"


def test_family_mismatch(lstm_checkpoint):
    with pytest.raises(NLMError, match="is a lstm checkpoint, not gpt"):
        load_checkpoint(lstm_checkpoint, family="gpt")
    assert load_checkpoint(lstm_checkpoint, family="lstm").family == "lstm"


def _broken(lstm_checkpoint, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(lstm_checkpoint, path)
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate-weights", "model.safetensors: unreadable weights"),
        ("pickle-weights", "model.safetensors: unreadable weights"),
        ("no-weights", "no model.safetensors"),
        ("corrupt-config", "config.json: unreadable config.json"),
        ("unknown-family", "field 'family' is 'transformer-xl'"),
        ("unknown-config-field", "unknown field 'hidden_sise'"),
        ("other-shape", "weights do not match the lstm config"),
        ("other-tokenizer", "does not match the fingerprint"),
        ("corrupt-metrics", "metrics.json: unreadable metrics"),
        ("missing", "no such checkpoint"),
    ],
)
def test_broken_checkpoints(damage, message, lstm_checkpoint, tokenizer, tmp_path):
    path = _broken(lstm_checkpoint, tmp_path)
    weights, config_path = path / "model.safetensors", path / "config.json"
    config = json.loads(config_path.read_text())
    if damage == "truncate-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "pickle-weights":  # a torch.save pickle posing as safetensors
        torch.save(_model("lstm", tokenizer.vocab_size).state_dict(), weights)
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "corrupt-config":
        config_path.write_text(config_path.read_text()[:40])
    elif damage == "unknown-family":
        config["family"] = "transformer-xl"
    elif damage == "unknown-config-field":
        config["model"]["hidden_sise"] = config["model"].pop("hidden_size")
    elif damage == "other-shape":
        config["model"]["hidden_size"] = 48
    elif damage == "other-tokenizer":
        train_tokenizer("word", ["a b c"]).save(path / "tokenizer")
    elif damage == "corrupt-metrics":
        (path / "metrics.json").write_text("{")
    elif damage == "missing":
        path = tmp_path / "nowhere"
    if damage in ("unknown-family", "unknown-config-field", "other-shape"):
        config_path.write_text(json.dumps(config))
    with pytest.raises(NLMError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


def test_loading_never_unpickles(lstm_checkpoint, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load_checkpoint(lstm_checkpoint).family == "lstm"


def test_an_fnn_saved_before_combine_and_activation_loads(tokenizer, tmp_path):
    """fnn's `combine` and `activation` came later: a config.json without them is the model
    every fnn was then (concatenation, tanh), and loads as that."""
    model = _model("fnn", tokenizer.vocab_size)
    path = save_checkpoint(tmp_path / "fnn", model, tokenizer)
    config = json.loads((path / "config.json").read_text())
    assert (config["model"].pop("combine"), config["model"].pop("activation")) == ("concat", "tanh")
    (path / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(path).model
    assert (loaded.config.combine, loaded.config.activation) == ("concat", "tanh")
    ids = torch.tensor([tokenizer.encode("the game was released in the United States")])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
