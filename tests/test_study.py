"""The word-vector comparison: metrics, report, `nlm compare` and the study plan."""

from __future__ import annotations

import json

import pytest
import torch

from nlm.errors import NLMError
from nlm.study import metrics
from nlm.study.compare import StudyModel, compare
from nlm.study.pipeline import StudyConfig, plan
from nlm.study.report import font_for, pca_2d, write_report
from nlm.tokenizers import train_tokenizer


def _rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed)))
    return q


@pytest.fixture(scope="module")
def table():
    return torch.randn(300, 12, generator=torch.Generator().manual_seed(1))


def test_model_against_itself_overlap_and_cka_are_one(table):
    ids = list(range(7, 300))
    n = metrics.neighbor_table(table, ids, 10, exclude_below=7)
    assert metrics.overlap_at_k(n, n).min() == 1.0
    assert metrics.linear_cka(table, table) == pytest.approx(1.0, abs=1e-9)
    assert metrics.similarity_spearman(table, table) == pytest.approx(1.0, abs=1e-9)
    assert metrics.procrustes_residual(table, table) == pytest.approx(0.0, abs=1e-9)


def test_rotated_table_has_zero_procrustes_residual_and_cka_one(table):
    rotated = table @ _rotation(12, seed=2) * 3.0 + 5.0  # rotation, scale and shift
    assert metrics.procrustes_residual(table, rotated) == pytest.approx(0.0, abs=1e-9)
    assert metrics.linear_cka(table, rotated) == pytest.approx(1.0, abs=1e-9)
    # a wider table holding the rotated one plus zero columns is the same geometry
    wider = torch.cat([table @ _rotation(12, seed=3), torch.zeros(300, 4)], dim=1)
    assert metrics.procrustes_residual(table, wider) == pytest.approx(0.0, abs=1e-9)
    assert metrics.linear_cka(table, wider) == pytest.approx(1.0, abs=1e-9)


def test_unrelated_tables_score_low(table):
    other = torch.randn(300, 12, generator=torch.Generator().manual_seed(9))
    ids = list(range(7, 300))
    a = metrics.neighbor_table(table, ids, 10, 7)
    b = metrics.neighbor_table(other, ids, 10, 7)
    assert metrics.overlap_at_k(a, b).mean() < 0.2
    assert metrics.linear_cka(table, other) < 0.3
    assert metrics.procrustes_residual(table, other) > 0.5
    assert abs(metrics.similarity_spearman(table, other)) < 0.1
    assert abs(metrics.mean_cosine(table)) < 0.05
    assert metrics.mean_cosine(table + 10.0) > 0.9  # one shared direction dominates


def test_spearman_uses_average_ranks_for_ties():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert metrics.spearman(x, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486833)
    i, j = metrics.pair_sample(1000, 5000, seed=0)  # sampled when there are too many pairs
    assert len(i) == 5000 and not (i == j).any()


def test_pca_signs_are_fixed(table):
    xy = pca_2d(table)
    assert xy.shape == (300, 2)
    assert torch.allclose(pca_2d(-table), xy)  # a flipped table gives the same picture
    assert font_for(["cat", "dog"]) == "default"


# ------------------------------------------------------------ compare + report (planted)

WORDS = "the cat dog sat on mat and red blue car ran fast slow big small".split()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 6
    tok = train_tokenizer("word", lines)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(tok.vocab_size, 6, generator=g)
    tables = {
        "fnn": base,
        "rnn": base @ _rotation(6, seed=5),  # same geometry as fnn
        "lstm": torch.randn(tok.vocab_size, 6, generator=g),  # unrelated
    }
    models = [
        StudyModel(name, f"runs/{name}", name, t, tok, "f" * 64, t.numel(), {"val_ppl": 9.5})
        for name, t in tables.items()
    ]
    return tok, models, tables


def test_compare_and_report(planted, tmp_path):
    tok, models, tables = planted
    data = compare(models, ["cat", "red", "big"], k=4, seed=3)
    pairs = {(p["a"], p["b"]): p for p in data["pairs"]}
    assert set(pairs) == {("fnn", "rnn"), ("fnn", "lstm"), ("rnn", "lstm")}
    same = pairs[("fnn", "rnn")]
    assert same["overlap_words"] == same["overlap_vocab"] == 1.0
    assert same["overlap_vocab_by_frequency"] == [1.0] * 4
    assert same["cka"] == pytest.approx(1.0) and same["procrustes"] == pytest.approx(0.0)
    assert pairs[("fnn", "lstm")]["cka"] < 0.9
    for word in data["words"]:
        for rows in data["neighbors"][word].values():
            assert len(rows) == 4 and word not in [t for t, _ in rows]

    ids = {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    md = write_report(data, tables, ids, tmp_path, title="planted")
    text = md.read_text(encoding="utf-8")
    assert text.startswith("# planted") and "| fnn – rnn | 1.000 | 1.000 |" in text
    assert "### 2. red" in text
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert saved["neighbors"]["cat"]["fnn"] == data["neighbors"]["cat"]["fnn"]
    for name in saved["figures"]:
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp"))


def test_chinese_labels_fall_back_to_numbers_without_a_cjk_font(planted, tmp_path):
    tok, models, tables = planted
    data = compare(models, ["cat"], k=3)
    data["words"] = ["经济"]  # relabel: only the glyphs matter here
    data["neighbors"] = {"经济": data["neighbors"]["cat"]}
    ids = {"经济": tok.token_to_id("cat")} | {tok.id_to_token(i): i for i in range(tok.vocab_size)}
    write_report(data, tables, ids, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    if font_for(["经济"]) is None:
        assert saved["labels"] == "numbers" and "label each chosen word by its number" in text
    else:
        assert saved["labels"] == "words"


# ------------------------------------------------------------ `nlm compare` on checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from nlm.checkpoint import save_checkpoint
    from nlm.models import build_model

    lines = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 6
    tok = train_tokenizer("word", lines)
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    paths = {}
    for family, fields in (
        ("fnn", {"n": 3, "hidden_size": 8}),
        ("rnn", {"hidden_size": 8, "n_layer": 1}),
        ("lstm", {"hidden_size": 8, "n_layer": 1}),
    ):
        model = build_model(family, vocab_size=tok.vocab_size, embed_dim=6, **fields)
        paths[family] = save_checkpoint(root / family / "model", model, tok)
    return root, paths


def test_compare_cli_writes_the_report(checkpoints, tmp_path, capsys):
    from nlm.cli import main

    root, _ = checkpoints
    runs = [str(root / f) for f in ("fnn", "rnn", "lstm")]  # run dirs: RUN/model is used
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "compare",
                *runs,
                "--random",
                "4",
                "--k",
                "3",
                "--min-count",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
    assert exit_.value.code == 0
    assert "fnn-rnn" in capsys.readouterr().out
    data = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in data["models"]] == ["fnn", "rnn", "lstm"]
    assert len(data["words"]) == 4 and len(data["pairs"]) == 3
    assert (tmp_path / "report.md").is_file() and (tmp_path / "overlap-heatmap.png").is_file()


def test_compare_a_model_with_itself(checkpoints, tmp_path):
    from nlm.study.compare import compare_checkpoints

    _, paths = checkpoints
    data = compare_checkpoints([paths["lstm"], paths["lstm"]], tmp_path, words=["cat", "red"], k=3)
    (pair,) = data["pairs"]
    assert pair["a"] != pair["b"]  # two names for the same family
    assert pair["overlap_words"] == pair["overlap_vocab"] == 1.0
    assert pair["cka"] == pytest.approx(1.0) and pair["procrustes"] == pytest.approx(0.0, abs=1e-6)


def test_compare_refuses_different_vocabularies(checkpoints, tmp_path, capsys):
    from nlm.checkpoint import save_checkpoint
    from nlm.cli import main
    from nlm.models import build_model

    _, paths = checkpoints
    other_tok = train_tokenizer("word", ["a different corpus with other words"])
    other = save_checkpoint(
        tmp_path / "other",
        build_model("rnn", vocab_size=other_tok.vocab_size, embed_dim=6, hidden_size=6, n_layer=1),
        other_tok,
    )
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(paths["fnn"]), str(other), "--out", str(tmp_path / "r")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "models must share a vocabulary" in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "report.md").exists()


# ------------------------------------------------------------ study plan


def test_study_plan_follows_the_clis(tmp_path, data_mirror):
    steps = plan(StudyConfig(corpus="pku", max_steps=50), tmp_path)
    assert [s.name for s in steps] == ["prepare", "train-fnn", "train-rnn", "train-lstm"]
    assert "--segmented" in steps[0].argv and steps[0].argv[0] == "prepare"
    assert steps[3].argv[:5] == ["train", "--data", str(tmp_path / "shards"), "--model", "lstm"]
    assert "--segmented" not in plan(StudyConfig(corpus="wt2-mini"), tmp_path)[0].argv


def test_study_configs_load_and_bad_fields_are_named(tmp_path):
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/study-*.yaml"))
    assert configs
    for path in configs:
        assert StudyConfig.load_yaml(path).models[:3] == ["fnn", "rnn", "lstm"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: pku\nmodels: [fnn, transformer]\n")
    with pytest.raises(NLMError, match=r"field 'models'"):
        StudyConfig.load_yaml(bad)
    bad.write_text("corpus: pku\nsteps: 3\n")
    with pytest.raises(NLMError, match=r"unknown field 'steps'"):
        StudyConfig.load_yaml(bad)


def test_study_skips_done_steps_and_writes_the_report(checkpoints, tmp_path, data_mirror):
    import shutil

    from nlm.study.pipeline import _stamp, run_study

    root, _ = checkpoints
    config = StudyConfig(corpus="wt2-mini", n_words=3, k=3, min_count=1)
    out = tmp_path / "study"
    for step in plan(config, out):  # every step already done with the same command
        if step.name == "prepare":
            step.output.parent.mkdir(parents=True)
            step.output.write_text("{}")
        else:
            shutil.copytree(root / step.name.removeprefix("train-"), step.output.parents[1])
        _stamp(out, step).parent.mkdir(parents=True, exist_ok=True)
        _stamp(out, step).write_text(json.dumps({"argv": step.argv}))
    data = run_study(config, out)
    assert [m["name"] for m in data["models"]] == ["fnn", "rnn", "lstm"]
    assert (
        (out / "report.md").read_text(encoding="utf-8").startswith("# Word-vector study: wt2-mini")
    )


def test_study_reports_a_failed_step(tmp_path, data_mirror):
    from nlm.study.pipeline import run_study

    config = StudyConfig(corpus="wt2-mini", prepare_args=["--no-such-flag"])
    with pytest.raises(NLMError, match=r"study step 'prepare' failed with exit status 2"):
        run_study(config, tmp_path / "study")
    assert not (tmp_path / "study" / "report.md").exists()
