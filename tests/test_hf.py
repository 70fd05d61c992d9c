"""Hugging Face checkpoints both ways (nlm/hf/): `nlm export --format hf` and `nlm import`.

No network: every model is a tiny random one built here, every tokenizer is trained here on the
wt2-mini / pku-lm text of NLM_DATA_MIRROR. Export: gpt and bert with each tokenizer kind load
with the Auto classes, give nlm's logits on a padded batch, the same greedy continuation as
`nlm generate`, and the same ids on every line of the test file. Import: a GPT-2 (byte-level
BPE) and a BERT (WordPiece) round-trip to their original logits and ids, and the imported GPT-2
is evaluated, served, fine-tuned and trained on (`--init-from`, ZeRO-3, exported again).
lm-evaluation-harness' `hf` backend scores the exported gpt like `nlm eval`. Bad input is one
line, exit 2, and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlm.checkpoint import load_checkpoint, save_checkpoint
from nlm.errors import NLMError
from nlm.models.bert import BERT, BERTConfig
from nlm.models.gpt import GPT, GPTConfig
from nlm.tokenizers import load_tokenizer, train_tokenizer
from nlm.tokenizers.base import CLS_ID, EOS_ID, PAD_ID, SEP_ID, fingerprint

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
os.environ.update(OFFLINE)


def nlm(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nlm", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **OFFLINE, **(env or {})},
    )


def lines_of(path: Path) -> list[str]:
    """The documents nlm reads from a file: non-empty stripped lines."""
    return [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


@pytest.fixture(scope="module")
def corpus(data_mirror) -> dict[str, list[str]]:
    pku = lines_of(data_mirror / "pku" / "pku_test_gold.utf8")
    cut = int(len(pku) * 0.9)
    return {
        "wt2-train": lines_of(data_mirror / "wikitext-2" / "valid.txt"),
        "wt2-test": lines_of(data_mirror / "wikitext-2" / "test.txt"),
        "pku-train": pku[:cut],
        "pku-test": pku[cut:],
    }


# (name, tokenizer kind, corpus, model variant)
KINDS = {
    "word": ("word", "wt2", dict()),
    "char": ("char", "wt2", dict(positions="sinusoidal", bias=False)),
    "spm-bpe": ("spm-bpe", "wt2", dict(tie_weights=False)),
    "spm-unigram": ("spm-unigram", "wt2", dict(activation="gelu_tanh")),
    "word-pku": ("word", "pku", dict()),
}


def make_tokenizer(name: str, corpus: dict[str, list[str]]):
    kind, source, _ = KINDS[name]
    texts = corpus[f"{source}-train"]
    if kind.startswith("spm-"):
        return train_tokenizer(kind, texts, vocab_size=800, sample_size=3000)
    if kind == "word":
        return train_tokenizer(kind, texts, min_count=2, segmented=source == "pku")
    return train_tokenizer(kind, texts, segmented=source == "pku")


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights far from init (std 0.3): peaked distributions, so argmax has clear winners."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def tiny_gpt(vocab: int, seed: int = 0, **changes) -> GPT:
    fields = dict(vocab_size=vocab, block_size=128, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    model = GPT(GPTConfig(**{**fields, **changes}))
    randomize(model, seed)
    return model.eval()


def tiny_bert(vocab: int, seed: int = 0) -> BERT:
    config = BERTConfig(vocab_size=vocab, max_positions=64, n_layer=2, n_head=2, n_embd=32,
                        intermediate_size=64, dropout=0.0)  # fmt: skip
    model = BERT(config)
    randomize(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, corpus) -> dict[str, dict]:
    """Per tokenizer kind: an nlm gpt checkpoint and its export; bert for two kinds."""
    from nlm.hf import export_hf

    root = tmp_path_factory.mktemp("export")
    out = {}
    for i, name in enumerate(KINDS):
        tok = make_tokenizer(name, corpus)
        ckpt = save_checkpoint(
            root / f"gpt-{name}", tiny_gpt(tok.vocab_size, i, **KINDS[name][2]), tok
        )
        entry = {"tokenizer": tok, "gpt": ckpt, "gpt-hf": root / f"gpt-{name}-hf"}
        entry["gpt-summary"] = export_hf(ckpt, entry["gpt-hf"])
        if name in ("word", "spm-unigram"):
            bert = save_checkpoint(root / f"bert-{name}", tiny_bert(tok.vocab_size, i), tok)
            entry["bert"], entry["bert-hf"] = bert, root / f"bert-{name}-hf"
            entry["bert-summary"] = export_hf(bert, entry["bert-hf"])
        out[name] = entry
    return out


def short_lines(tok, lines: list[str]) -> list[str]:
    """Four lines of different lengths, all under 40 tokens: a batch that needs padding."""
    chosen, lengths = [], set()
    for line in lines:
        n = len(tok.encode(line))
        if 3 <= n <= 38 and n not in lengths:
            chosen.append(line)
            lengths.add(n)
        if len(chosen) == 4:
            return chosen
    raise AssertionError("no four short lines")


def test_test_lines(corpus, data_mirror):
    """The wt2-mini test file as nlm reads it (guards the fixtures, not the export)."""
    assert len(corpus["wt2-test"]) > 2000 and len(corpus["pku-test"]) > 100


# --- the nlm side: tokenizer file name, fingerprints, safetensors metadata, AutoConfig -------


def old_fingerprint(directory: Path) -> str:
    """fingerprint() as it was computed before the metadata file was renamed."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("kind", ["word", "char", "spm-bpe"])
def test_renamed_tokenizer_file_keeps_old_directories_and_fingerprints(kind, corpus, tmp_path):
    tok = train_tokenizer(
        kind, corpus["wt2-train"][:300], vocab_size={"char": 300, "spm-bpe": 600}.get(kind)
    )
    tok.save(tmp_path / "new")
    assert (tmp_path / "new" / "nlm-tokenizer.json").is_file()
    assert not (tmp_path / "new" / "tokenizer.json").exists()  # HF's file name stays free
    # A directory saved before the rename: the same files, the metadata as tokenizer.json.
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    (tmp_path / "old" / "nlm-tokenizer.json").rename(tmp_path / "old" / "tokenizer.json")
    recorded = old_fingerprint(tmp_path / "old")  # what its shards/checkpoints recorded
    assert fingerprint(tmp_path / "old") == recorded
    assert fingerprint(tmp_path / "new") == recorded  # re-saving does not invalidate them
    line = corpus["wt2-test"][5]
    assert load_tokenizer(tmp_path / "old").encode(line) == tok.encode(line)


def test_old_checkpoints_and_old_shards_still_load(corpus, tmp_path):
    from nlm.shards import check_tokenizer, read_manifest

    from train_shards import write_shards

    lines = corpus["wt2-train"][:300]
    shards = write_shards(tmp_path / "shards", lines, seq_len=16)
    # turn both into the old layout (metadata as tokenizer.json), fingerprints as recorded
    ckpt = save_checkpoint(tmp_path / "ckpt", tiny_gpt(load_tokenizer(shards / "tokenizer").vocab_size),
                           load_tokenizer(shards / "tokenizer"))  # fmt: skip
    for tok_dir in (shards / "tokenizer", ckpt / "tokenizer"):
        (tok_dir / "nlm-tokenizer.json").rename(tok_dir / "tokenizer.json")
    manifest = read_manifest(shards)
    assert manifest.tokenizer["fingerprint"] == old_fingerprint(shards / "tokenizer")
    check_tokenizer(manifest, str(shards / "tokenizer"))  # accepted, not a mismatch
    assert load_checkpoint(ckpt).tokenizer.encode(lines[0]) == load_tokenizer(
        shards / "tokenizer"
    ).encode(lines[0])
    (shards / "tokenizer" / "vocab.json").write_text('[["<pad>", 0]]\n', encoding="utf-8")
    with pytest.raises(NLMError, match="fingerprint"):
        check_tokenizer(manifest, str(shards / "tokenizer"))  # a real change is still caught


def test_checkpoints_carry_format_pt_and_autoconfig_does_not_guess(corpus, tmp_path):
    import transformers
    from safetensors import safe_open

    tok = train_tokenizer("word", corpus["wt2-train"][:200])
    for family, model in (("gpt", tiny_gpt(tok.vocab_size)), ("bert", tiny_bert(tok.vocab_size))):
        ckpt = save_checkpoint(tmp_path / f"runs-{family}-bert" / "model", model, tok)
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            assert f.metadata()["format"] == "pt"  # (save_model adds the tied names too)
        # The path contains "bert": AutoConfig used to build a BERT-base config from the name.
        for where in (ckpt, ckpt.parent):
            with pytest.raises((ValueError, OSError)) as err:
                transformers.AutoConfig.from_pretrained(str(where))
            assert "nlm-" in str(err.value) or "config.json" in str(err.value)
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == f"nlm-{family}"


# --- export -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_exported_gpt_matches_nlm(exported, corpus, name):
    import transformers

    entry = exported[name]
    tok, out = entry["tokenizer"], entry["gpt-hf"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (
        config["activation_function"]
        == {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[
            KINDS[name][2].get("activation", "gelu")
        ]
    )
    assert {"generation_config.json", "README.md", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "model.safetensors"} <= set(entry["gpt-summary"]["files"])  # fmt: skip
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card and "license:" in card

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert hf_tok.model_input_names == ["input_ids", "attention_mask"]  # no token_type_ids

    # the same ids on every line of the test file
    test = corpus[f"{KINDS[name][1]}-test"]
    assert hf_tok(test)["input_ids"] == tok.encode_batch(test)
    assert "token_type_ids" not in hf_tok(test[:2])

    # the same logits on a left-padded batch
    nlm_model = load_checkpoint(entry["gpt"]).model
    batch = hf_tok(short_lines(tok, test), padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert bool((mask[:, 0] == 0).any()) and ids[mask == 0].eq(PAD_ID).all()  # left padding
    with torch.no_grad():
        ours = nlm_model(ids, attention_mask=mask).logits
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (ours - theirs)[mask.bool()].abs().max().item() <= 1e-4

    # greedy generation: transformers' generate and `nlm generate` give the same 20 tokens
    words = test[3].split()[:4]
    prompt = " ".join(words) if KINDS[name][0] != "char" else test[3][:12]
    result = nlm("generate", "--checkpoint", entry["gpt"], "--prompt", prompt,
                 "--temperature", "0", "--max-tokens", "20", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout.strip().splitlines()[-1])["ids"]
    context = torch.tensor([[EOS_ID, *tok.encode(prompt)]])
    with torch.no_grad():
        new = model.generate(context, attention_mask=torch.ones_like(context), do_sample=False,
                             max_new_tokens=20)[0, context.size(1):].tolist()  # fmt: skip
    theirs = new[: new.index(EOS_ID)] if EOS_ID in new else new  # nlm stops at </s> too
    assert ours == theirs and (len(ours) == 20 or EOS_ID in new)


@pytest.mark.parametrize("name", ["word", "spm-unigram"])
def test_exported_bert_matches_nlm(exported, corpus, name):
    import transformers

    entry = exported[name]
    tok, out = entry["tokenizer"], entry["bert-hf"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertForPreTraining"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    test = corpus["wt2-test"]
    assert hf_tok(test)["input_ids"] == [[CLS_ID, *ids, SEP_ID] for ids in tok.encode_batch(test)]
    assert "token_type_ids" in hf_tok.model_input_names

    nlm_model = load_checkpoint(entry["bert"]).model
    batch = hf_tok(short_lines(tok, test), padding=True, return_tensors="pt")
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert bool((mask[:, -1] == 0).any())  # padded (on the right, as BERT is)
    with torch.no_grad():
        ours = nlm_model(ids, token_type_ids=types, attention_mask=mask)
        mlm = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
        pre = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
        by_mlm = mlm(**batch).logits
        by_pre = pre(**batch)
    real = mask.bool()
    assert type(mlm).__name__ == "BertForMaskedLM" and type(pre).__name__ == "BertForPreTraining"
    assert (ours.logits - by_mlm)[real].abs().max().item() <= 1e-4
    assert (ours.logits - by_pre.prediction_logits)[real].abs().max().item() <= 1e-4
    assert (ours.nsp_logits - by_pre.seq_relationship_logits).abs().max().item() <= 1e-4


def test_lm_eval_hf_backend_agrees_with_nlm_eval(exported, corpus, tmp_path):
    """lm-evaluation-harness (`--model hf`) scores one document by rolling log-likelihood: the
    document's tokens after </s>. `nlm eval` scores `</s> doc </s>`: the same predictions plus
    the final </s> (both in one window here)."""
    entry = exported["word"]
    doc = next(x for x in corpus["wt2-test"] if 60 <= len(entry["tokenizer"].encode(x)) <= 100)
    (tmp_path / "doc.txt").write_text(doc + "\n", encoding="utf-8")
    result = nlm("eval", "--checkpoint", entry["gpt"], "--input", tmp_path / "doc.txt",
                 "--seq-len", "128", "--no-progress")  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout.strip().splitlines()[-1])
    nlm_total = ours["nll"] * ours["tokens"]

    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf-home")}
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={entry['gpt-hf']},dtype=float32", "--tasks", "nlm_local_text",
         "--include_path", str(REPO / "tests" / "hf_tasks"), "--device", "cpu",
         "--batch_size", "1", "--output_path", str(tmp_path / "lm-eval")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "lm-eval").rglob("results_*.json")).read_text())
    bpb = results["results"]["nlm_local_text"]["bits_per_byte,none"]
    theirs_total = bpb * len(doc.encode("utf-8")) * math.log(2)  # -log-likelihood, nats

    model = load_checkpoint(entry["gpt"]).model
    ids = torch.tensor([[EOS_ID, *entry["tokenizer"].encode(doc), EOS_ID]])
    with torch.no_grad():
        last = -torch.log_softmax(model(ids[:, :-1]).logits[0, -1], -1)[EOS_ID].item()
    assert abs((nlm_total - last) - theirs_total) <= 0.005 * theirs_total
    assert abs(nlm_total - theirs_total) <= 0.05 * theirs_total  # the whole figure, too


# --- import -----------------------------------------------------------------------------------


def hf_gpt2(root: Path, lines: list[str]) -> Path:
    """A tiny random GPT-2 with a byte-level BPE tokenizer, saved as transformers does."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    backend.train_from_iterator(lines, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"],
    )  # fmt: skip
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=2, bos_token_id=eot, eos_token_id=eot)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    randomize(model, 1)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def hf_bert(root: Path, lines: list[str]) -> Path:
    """A tiny random BERT (pre-training heads) with a WordPiece tokenizer."""
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator(
        lines, trainers.WordPieceTrainer(vocab_size=700, special_tokens=specials)
    )
    cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )  # fmt: skip
    config = transformers.BertConfig(vocab_size=len(tok) + 3, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)  # fmt: skip
    model = transformers.BertForPreTraining(config).eval()
    randomize(model, 2)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def imported(tmp_path_factory, corpus) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("import")
    lines = corpus["wt2-train"][:2000]
    paths = {"gpt2": hf_gpt2(root / "hf-gpt2", lines), "bert": hf_bert(root / "hf-bert", lines)}
    for name in ("gpt2", "bert"):
        result = nlm("import", paths[name], root / f"nlm-{name}")
        assert result.returncode == 0, result.stderr
        paths[f"nlm-{name}"] = root / f"nlm-{name}"
        paths[f"{name}-summary"] = json.loads(result.stdout.strip().splitlines()[-1])
    paths["root"] = root
    return paths


def _hf_logits(model, family: str, batch) -> torch.Tensor:
    with torch.no_grad():
        if family == "gpt2":
            mask = batch["attention_mask"]
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            return model(input_ids=batch["input_ids"], attention_mask=mask,
                         position_ids=positions).logits  # fmt: skip
        return model(**batch).prediction_logits


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_import_then_export_reproduces_the_original(imported, corpus, name, tmp_path):
    import transformers

    family = "gpt" if name == "gpt2" else "bert"
    original = imported[name]
    ckpt = load_checkpoint(imported[f"nlm-{name}"])
    assert ckpt.family == family and ckpt.tokenizer.kind == "hf"
    summary = imported[f"{name}-summary"]
    if name == "gpt2":  # <|endoftext|> became </s>; GPT-2 has no other special token
        assert summary["added_special_rows"] == [
            "<pad>",
            "<unk>",
            "<s>",
            "[CLS]",
            "[SEP]",
            "[MASK]",
        ]
    else:
        assert summary["added_special_rows"] == ["<s>", "</s>"]

    hf_tok = transformers.AutoTokenizer.from_pretrained(original)
    hf_model = transformers.AutoModelForPreTraining.from_pretrained(original).eval()
    test = corpus["wt2-test"][:300]
    hf_ids = hf_tok(test, add_special_tokens=False)["input_ids"]
    ours = ckpt.tokenizer.encode_batch(test)
    assert [ckpt.tokenizer.to_hf[ids].tolist() for ids in ours] == hf_ids

    # the imported model's logits are the original's, over the original's ids
    if name == "gpt2":
        hf_tok.pad_token, hf_tok.padding_side = hf_tok.eos_token, "left"
    batch = hf_tok(test[5:9], padding=True, truncation=True, max_length=40, return_tensors="pt")
    expected = _hf_logits(hf_model, name, batch)
    mask = batch["attention_mask"]
    nlm_ids = torch.from_numpy(ckpt.tokenizer.from_hf)[batch["input_ids"]]
    with torch.no_grad():
        if family == "gpt":
            logits = ckpt.model(nlm_ids, attention_mask=mask).logits
        else:
            logits = ckpt.model(nlm_ids, token_type_ids=batch["token_type_ids"],
                                attention_mask=mask).logits  # fmt: skip
    over_hf = logits[..., torch.from_numpy(ckpt.tokenizer.from_hf)]
    assert (over_hf - expected)[mask.bool()].abs().max().item() <= 1e-4

    # export it again: the original model and tokenizer
    result = nlm("export", "--format", "hf", imported[f"nlm-{name}"], tmp_path / "again")
    assert result.returncode == 0, result.stderr
    again = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "again").eval()
    again_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "again")
    assert again.config.vocab_size == hf_model.config.vocab_size
    assert again_tok(test)["input_ids"] == hf_tok(test)["input_ids"]
    assert (_hf_logits(again, name, batch) - expected)[mask.bool()].abs().max().item() <= 1e-5


def test_imported_gpt2_evaluates_and_generates(imported, data_mirror):
    result = nlm("eval", "--checkpoint", imported["nlm-gpt2"], "--input",
                 data_mirror / "ptb" / "valid.txt", "--no-progress", "--seq-len", "64")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert math.isfinite(json.loads(result.stdout.strip().splitlines()[-1])["ppl"])
    result = nlm("generate", "--checkpoint", imported["nlm-gpt2"], "--prompt", "The game",
                 "--max-tokens", "5", "--seed", "1")  # fmt: skip
    assert result.returncode == 0 and result.stdout.startswith("The game"), result.stderr


# --- bad input ---------------------------------------------------------------------------------


def _left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def test_bad_input_is_one_line_exit_2_and_writes_nothing(exported, imported, corpus, tmp_path):
    import transformers

    cases = []
    # a family with no transformers class
    tok = exported["word"]["tokenizer"]
    from nlm.models import build_model

    fnn = save_checkpoint(
        tmp_path / "fnn", build_model("fnn", "tiny", vocab_size=tok.vocab_size), tok
    )
    cases.append((["export", "--format", "hf", fnn], "fnn has no transformers class"))
    # not a checkpoint / not a Hugging Face directory
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    cases.append((["export", "--format", "hf", tmp_path / "plain"], "not a checkpoint"))
    cases.append((["import", tmp_path / "plain"], "not a Hugging Face model directory"))
    cases.append((["import", exported["word"]["gpt"]], "already an nlm checkpoint"))
    # an architecture nlm does not compute
    llama = tmp_path / "llama"
    llama.mkdir()
    transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2).save_pretrained(llama)  # fmt: skip
    cases.append((["import", llama], "'llama' is not supported"))
    # GPT-2 with the tanh-free relu activation
    relu = tmp_path / "relu"
    shutil.copytree(imported["gpt2"], relu)
    config = json.loads((relu / "config.json").read_text())
    (relu / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    cases.append((["import", relu], "activation_function"))
    # tokenizer files of another model (more ids than the model has rows)
    mixed = tmp_path / "mixed"
    shutil.copytree(imported["gpt2"], mixed)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (imported["bert"] / name).exists():
            shutil.copy(imported["bert"] / name, mixed / name)
    cases.append((["import", mixed], "tokenizer files do not match the model"))
    # pickle-only weights are not loaded
    pickled = tmp_path / "pickled"
    shutil.copytree(imported["gpt2"], pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    cases.append((["import", pickled], "safetensors"))
    # an existing output directory
    cases.append((["export", "--format", "hf", exported["word"]["gpt"], exported["word"]["gpt-hf"]],
                  "already exists"))  # fmt: skip

    for args, message in cases:
        out = tmp_path / "out" if args[-1] != exported["word"]["gpt-hf"] else None
        full = args + ([out] if out is not None else [])
        result = nlm(*full)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        errors = [x for x in result.stderr.strip().splitlines() if x.startswith("nlm: error:")]
        assert len(errors) == 1 and message in errors[0], (message, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        if out is not None:
            assert not out.exists(), args
        assert (
            _left_behind(tmp_path) == [] and _left_behind(exported["word"]["gpt-hf"].parent) == []
        )
    # the existing export is untouched
    assert transformers.AutoConfig.from_pretrained(exported["word"]["gpt-hf"]).model_type == "gpt2"


@pytest.mark.parametrize("kind", ["spm-bpe", "spm-unigram"])
def test_spm_byte_fallback_exports_exactly(kind, corpus):
    """nlm's SentencePiece tokenizers have byte fallback (the default): the `tokenizers` backend
    gives the same ids, byte pieces of unseen characters included, and decodes them back."""
    from nlm.hf.tokenizer import backend_tokenizer

    tok = train_tokenizer(kind, corpus["wt2-train"][:500], vocab_size=400)
    backend = backend_tokenizer(tok)
    texts = [*corpus["wt2-train"][500:540], "the 日本語 text ☃ ends", "naïve  café "]
    for text in texts:
        assert backend.encode(text, add_special_tokens=False).ids == tok.encode(text), text
    ids = tok.encode("the 日本語 text ☃ ends")
    assert 1 not in ids and backend.decode(ids) == "the 日本語 text ☃ ends"


# --- the imported GPT-2 in the rest of nlm: serve, finetune, train --init-from -----------------


@pytest.mark.slow
def test_imported_gpt2_is_served(imported, served):
    """The imported checkpoint deployed by `nlm serve`'s application, next to the session's
    server (tests/conftest.py `served`): score and generate over real HTTP."""
    app = served.deploy("hf", {"gpt2": imported["nlm-gpt2"]}, [])
    with app.client() as client:
        score = client.post("/v1/score", json={"model": "gpt2", "text": "The game began"})
        assert score.status_code == 200, score.text
        assert score.json()["logprob"] < 0
        body = {"model": "gpt2", "prompt": "The game", "max_tokens": 4, "seed": 3,
                "stop_at_eos": False}  # fmt: skip
        gen = client.post("/v1/generate", json=body)
        assert gen.status_code == 200 and len(gen.json()["token_ids"]) == 4, gen.text


@pytest.mark.slow
def test_imported_gpt2_finetunes_one_step(imported, corpus, tmp_path):
    rows = [
        {"text": x, "label": "long" if len(x) > 300 else "short"} for x in corpus["wt2-train"][:80]
    ]
    for name, part in (("train", rows[:60]), ("eval", rows[60:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    result = nlm("finetune", "--checkpoint", imported["nlm-gpt2"], "--task", "classify",
                 "--train", tmp_path / "train.jsonl", "--eval", tmp_path / "eval.jsonl",
                 "--out", tmp_path / "ft", "--max-steps", "1", "--workers", "1",
                 "--cpus-per-worker", "1", "--micro-batch", "4", "--max-length", "32",
                 env={"RAY_ADDRESS": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ft" / "model" / "config.json").is_file()


def test_train_init_from_an_imported_gpt2_under_zero3_then_export(process_group, imported, corpus,
                                                                 tmp_path):  # fmt: skip
    import transformers

    from nlm.cluster.train.config import TrainConfig
    from nlm.cluster.train.loop import LocalSession, run_worker
    from nlm.cluster.train.plan import plan_run

    from train_shards import write_shards

    ckpt = load_checkpoint(imported["nlm-gpt2"])
    shards = write_shards(tmp_path / "shards", corpus["wt2-train"][:400], seq_len=32,
                          tokenizer=ckpt.tokenizer)  # fmt: skip
    cfg = TrainConfig.from_dict({
        "data": str(shards), "model": "gpt", "init_from": str(imported["nlm-gpt2"]),
        "out": str(tmp_path / "run"), "workers": 1, "micro_batch": 4, "max_steps": 2,
        "warmup_steps": 0, "eval_every": 2, "eval_rows": 8, "log_every": 1, "zero_stage": 3,
    })  # fmt: skip
    plan = plan_run(cfg.check())
    assert plan.model_config == ckpt.config["model"]  # the checkpoint's architecture
    trainer = run_worker(plan, LocalSession(plan))
    assert trainer.final["step"] == 2 and trainer.final["export_max_abs_logit_diff"] <= 1e-5
    trained = load_checkpoint(tmp_path / "run")
    assert (
        trained.tokenizer.kind == "hf" and trained.config["tokenizer"] == ckpt.config["tokenizer"]
    )
    moved = max((a - b).abs().max().item() for a, b in zip(
        trained.model.state_dict().values(), ckpt.model.state_dict().values(), strict=True))  # fmt: skip
    assert 0 < moved < 1  # trained from the imported weights, not from scratch
    # a ZeRO-3 run exports with no zero_to_fp32 step
    result = nlm("export", "--format", "hf", tmp_path / "run", tmp_path / "run-hf")
    assert result.returncode == 0, result.stderr
    assert transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "run-hf"
    ).config.vocab_size == (ckpt.tokenizer.hf_rows)

    # shards of another tokenizer are refused, naming the way out
    other = write_shards(tmp_path / "other", corpus["wt2-train"][:400], seq_len=32)
    with pytest.raises(NLMError, match="--tokenizer-from"):
        plan_run(cfg.replace(data=str(other), out=str(tmp_path / "run2")))
    with pytest.raises(NLMError, match="is a gpt checkpoint, not lstm"):
        plan_run(cfg.replace(model="lstm", zero_stage=1, out=str(tmp_path / "run3")))
