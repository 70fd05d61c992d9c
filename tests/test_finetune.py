"""Fine-tuning without Ray: the B/M/E/S converter and its repair policy, SIGHAN scoring, the
maximum-matching baseline, JSONL checking, the task heads (λ·L1), padding, checkpoints and the
predictor. Tiny models, plain torch; one `nlm finetune` subprocess for the CLI's error path."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nlm.checkpoint import save_checkpoint
from nlm.errors import NLMError
from nlm.finetune.cws import (
    BMES,
    MaxMatch,
    convert_cws,
    first_invalid_bmes,
    repair_bmes,
    score_segmentation,
    split_words,
    tags_to_words,
    viterbi_bmes,
    words_to_tags,
)
from nlm.finetune.data import (
    TagExample,
    build_label_map,
    check_labels,
    collate,
    encode_examples,
    read_examples,
)
from nlm.finetune.heads import TaskModel, lm_targets, load_task_checkpoint, save_task_checkpoint
from nlm.finetune.metrics import classification_counts, classification_metrics, spans
from nlm.finetune.predict import Predictor
from nlm.models import build_model
from nlm.tokenizers import train_tokenizer
from nlm.tokenizers.base import BOS_ID, EOS_ID, SEP_ID

REPO = Path(__file__).resolve().parents[1]
PKU = "pku/pku_test_gold.utf8"


@pytest.fixture(scope="module")
def pku_lines(data_mirror) -> list[str]:
    return (data_mirror / PKU).read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def char_tokenizer(pku_lines):
    return train_tokenizer("char", pku_lines[:400], segmented=True)


def write(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- the converter and the repair policy ------------------------------------------------------


def test_cws_round_trip_on_all_of_pku(pku_lines, data_mirror, tmp_path):
    for line in pku_lines:
        words = split_words(line)
        tags = words_to_tags(words)
        assert first_invalid_bmes(tags) is None
        assert tags_to_words("".join(words), tags) == words
        assert repair_bmes(tags) == tags
    stats = convert_cws(data_mirror / PKU, tmp_path / "train.jsonl", tmp_path / "test.jsonl")
    cut = int(len(pku_lines) * 0.9)  # the pku-lm split: first 90 % of lines train
    test = [json.loads(x) for x in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert stats[str(tmp_path / "test.jsonl")]["examples"] == len(test)
    expected = [split_words(x) for x in pku_lines[cut:] if x.strip()]
    assert [tags_to_words(r["tokens"], r["tags"]) for r in test] == expected


def test_invalid_sequences_are_repaired_by_one_rule_and_decoding_never_makes_them():
    assert first_invalid_bmes(list("BE")) is None
    assert first_invalid_bmes(list("BB")) == 1
    assert first_invalid_bmes(list("SME")) == 1
    assert first_invalid_bmes(list("SB")) == 1  # ends inside a word
    # The reading rule: B/S start a word, E/S end one, a stray M/E starts one.
    assert tags_to_words("abcd", list("BBEM")) == ["a", "bc", "d"]
    assert repair_bmes(list("BBEM")) == list("SBES")
    rng = random.Random(0)
    for _ in range(300):
        tags = [rng.choice(BMES) for _ in range(rng.randint(1, 9))]
        fixed = repair_bmes(tags)
        assert first_invalid_bmes(fixed) is None and repair_bmes(fixed) == fixed
        chars = "abcdefghi"[: len(tags)]
        assert tags_to_words(chars, tags) == tags_to_words(chars, fixed)
    # Constrained decoding: the best valid sequence (brute force over all 4^5).
    for seed in range(5):
        scores = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
        best = max(
            (
                seq
                for seq in itertools.product(range(4), repeat=5)
                if first_invalid_bmes([BMES[i] for i in seq]) is None
            ),
            key=lambda seq: sum(float(scores[t, i]) for t, i in enumerate(seq)),
        )
        assert viterbi_bmes(scores) == list(best)


def test_invalid_gold_tags_are_rejected_naming_line_and_position(tmp_path):
    path = write(
        tmp_path / "bad.jsonl",
        [
            {"tokens": ["我", "们"], "tags": ["B", "E"]},
            {"tokens": ["我", "们", "好"], "tags": ["B", "S", "S"]},
        ],
    )
    examples = read_examples(path, "tag")
    with pytest.raises(
        NLMError, match=r"bad\.jsonl:2 \(field 'tags'\): invalid B/M/E/S sequence at item 1"
    ):
        check_labels(examples, build_label_map(examples, path), path)


# --- scoring and the baseline -----------------------------------------------------------------


def test_sighan_scores_and_maximum_matching():
    gold = [["共同", "创造", "美好", "的", "新", "世纪"]]
    pred = [["共同", "创", "造", "美好的", "新", "世纪"]]
    score = score_segmentation(gold, pred, train_words={"共同", "美好", "的", "新"})
    # correct: 共同, 新, 世纪 = 3 of 6 gold and 6 predicted
    assert score["precision"] == 0.5 and score["recall"] == 0.5 and score["f1"] == 0.5
    assert score["oov_rate"] == round(2 / 6, 4) and score["oov_recall"] == 0.5  # 创造 no, 世纪 yes
    with pytest.raises(NLMError, match="line 1"):
        score_segmentation(gold, [["共同"]])
    mm = MaxMatch({"研究", "研究生", "生命", "起源"})
    assert mm.segment("研究生命起源") == ["研究生", "命", "起源"]
    assert mm.segment("研究生命起源", backward=True) == ["研究", "生命", "起源"]


def test_metrics_macro_f1_and_spans():
    counts = classification_counts([0, 0, 1, 2], [0, 1, 1, 1], num_labels=3)
    metrics = classification_metrics(counts, 3)
    # F1: label 0 = 2/3, label 1 = 2/4, label 2 = 0
    assert metrics["accuracy"] == 0.5
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3, abs=1e-5)
    assert spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC"], "bio") == {
        (0, 2, "PER"),
        (3, 4, "LOC"),
        (4, 5, "LOC"),
    }
    assert spans(list("BESBME"), "bmes") == {(0, 2, ""), (2, 3, ""), (3, 6, "")}


# --- JSONL checking ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, line, pattern",
    [
        ("classify", "{not json", r":2: invalid JSON"),
        ("classify", {"label": "a"}, r":2 \(field 'text'\): missing"),
        ("classify", {"text": "x"}, r":2 \(field 'label'\): missing"),
        ("classify", {"text_a": "x", "label": "a"}, r":2 \(field 'text_b'\): missing"),
        (
            "classify",
            {"text": "x", "label": True},
            r":2 \(field 'label'\): expected a string or an integer",
        ),
        ("tag", {"tokens": ["a", "b"], "tags": ["S"]}, r":2 \(field 'tags'\): 1 tags for 2 tokens"),
        ("tag", {"tags": ["S"]}, r":2 \(field 'tokens'\): missing"),
    ],
)
def test_bad_jsonl_lines_are_named(tmp_path, task, line, pattern):
    good = {"text": "ok", "label": "a"} if task == "classify" else {"tokens": ["a"], "tags": ["S"]}
    path = write(tmp_path / "data.jsonl", [good, line])
    with pytest.raises(NLMError, match=r"data\.jsonl" + pattern):
        read_examples(path, task)


def test_unknown_eval_label_is_named(tmp_path):
    train = write(
        tmp_path / "train.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    )
    test = write(
        tmp_path / "test.jsonl",
        [{"text": "c", "label": "neg"}, "", {"text": "d", "label": "neutral"}],
    )
    labels = build_label_map(read_examples(train, "classify"), train)
    assert labels == ["neg", "pos"]
    with pytest.raises(NLMError, match=r"test\.jsonl:3 \(field 'label'\): unknown label 'neutral'"):
        check_labels(read_examples(test, "classify"), labels, test)


def test_cli_reports_bad_jsonl_in_one_line_before_starting_anything(tmp_path):
    train = write(
        tmp_path / "train.jsonl",
        [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"}],
    )
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlm",
            "finetune",
            "--checkpoint",
            str(tmp_path),
            "--task",
            "classify",
            "--train",
            str(train),
            "--eval",
            str(train),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert (
        lines[0].startswith("nlm: error: ") and "train.jsonl:3 (field 'label'): missing" in lines[0]
    )
    assert not (tmp_path / "run").exists()


# --- heads, padding, checkpoints --------------------------------------------------------------


def tiny_task_model(
    family: str, task: str, labels: list, vocab: int, lm_weight: float = 0.0, seed: int = 0
):
    torch.manual_seed(seed)
    return TaskModel(build_model(family, "tiny", vocab_size=vocab), task, labels, lm_weight).eval()


def classify_rows(
    model: TaskModel, tokenizer, texts: list[tuple[str, str | None]], labels: list[int]
):
    from nlm.finetune.data import ClassifyExample

    examples = [ClassifyExample(a, label, b) for (a, b), label in zip(texts, labels, strict=True)]
    rows, _ = encode_examples(examples, tokenizer, model.family, 64, [0, 1, 2])
    return rows


TEXTS = [
    ("共同创造美好的新世纪", None),
    ("新年", "贺词"),
    ("人类社会前进的航船就要驶入二十一世纪", None),
]


def test_lm_weight_zero_is_the_pure_task_loss_and_otherwise_adds_lambda_l1(char_tokenizer):
    vocab = char_tokenizer.vocab_size
    batch = None
    grads = {}
    for lam in (0.0, 0.5):
        model = tiny_task_model("gpt", "classify", [0, 1, 2], vocab, lm_weight=lam)
        rows = classify_rows(model, char_tokenizer, TEXTS, [0, 2, 1])
        # The notes' layout: <s> text </s>, pairs joined by the separator: <s> a [SEP] b </s>.
        a, b = (char_tokenizer.encode(t) for t in TEXTS[1])
        assert rows[1]["input_ids"] == [BOS_ID, *a, SEP_ID, *b, EOS_ID]
        batch = collate(rows, pad_left=True)
        out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        task = F.cross_entropy(out.logits, batch["labels"])
        assert torch.equal(out.task_loss, task)
        if lam == 0.0:
            assert out.lm_loss is None and torch.equal(out.loss, task)
        else:
            # L1 by hand: every row alone, unpadded, each next token scored once.
            nll, count = 0.0, 0
            with torch.no_grad():
                for row in rows:
                    ids = torch.tensor([row["input_ids"]])
                    logp = model.backbone(ids).logits[0, :-1].log_softmax(-1)
                    nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
                    count += ids.size(1) - 1
            assert out.lm_loss.item() == pytest.approx(nll / count, rel=1e-5)
            assert out.loss.item() == pytest.approx(task.item() + lam * nll / count, rel=1e-5)
        out.loss.backward()
        grads[lam] = model.head.weight.grad.clone()
    # L1 reaches the head only through shared layers: the head's gradient is the task's alone.
    assert torch.allclose(grads[0.0], grads[0.5], atol=1e-6)
    targets = lm_targets(batch["input_ids"], batch["attention_mask"])
    assert bool((targets[batch["attention_mask"] == 0] == -100).all())
    with pytest.raises(NLMError, match="applies to gpt"):
        TaskModel(build_model("bert", "tiny", vocab_size=vocab), "classify", [0, 1], lm_weight=0.5)


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_padded_batches_answer_as_one_example_at_a_time(char_tokenizer, family, tmp_path):
    model = tiny_task_model(family, "classify", [0, 1, 2], char_tokenizer.vocab_size)
    rows = classify_rows(model, char_tokenizer, TEXTS, [0, 1, 2])
    together = model(
        **{k: v for k, v in collate(rows, model.pad_left).items() if k != "labels"}
    ).logits
    for i, row in enumerate(rows):
        alone = model(
            **{k: v for k, v in collate([row], model.pad_left).items() if k != "labels"}
        ).logits
        assert torch.allclose(together[i], alone[0], atol=1e-5)
    # gpt reads the last position (</s>), bert the first ([CLS]).
    ids = torch.tensor([rows[0]["input_ids"]])
    hidden = model.backbone(ids).hidden
    expected = model.head(hidden[:, -1] if family == "gpt" else hidden[:, 0])
    assert torch.allclose(model(ids).logits, expected, atol=1e-6)


@pytest.mark.parametrize(
    "family, task, labels",
    [
        ("bert", "tag", list(BMES)),
        ("gpt", "classify", ["neg", "pos", "zero"]),
        ("bert", "classify", [3, 7]),
    ],
)
def test_label_map_and_head_survive_save_and_load(char_tokenizer, tmp_path, family, task, labels):
    model = tiny_task_model(family, task, labels, char_tokenizer.vocab_size, seed=3)
    with torch.no_grad():
        model.head.bias.copy_(torch.arange(len(labels)) * 0.1)  # something a fresh head lacks
    path = save_task_checkpoint(tmp_path / "ckpt", model, char_tokenizer, metrics={"test_f1": 0.5})
    config = json.loads((path / "config.json").read_text())
    assert config["task"] == task and config["labels"] == labels and config["family"] == family
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "metrics.json",
        "model.safetensors",
        "tokenizer",
    ]
    loaded = load_task_checkpoint(path)
    assert loaded.labels == labels and type(loaded.labels[0]) is type(labels[0])
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    assert torch.equal(loaded.model(ids).logits, model(ids).logits)
    # A hand-edited label map that no longer fits the head is refused, not silently misread.
    config["labels"] = labels + ["extra"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NLMError, match="do not match config.json"):
        load_task_checkpoint(path)


def test_predictor_windows_long_text_and_segments_raw_text(char_tokenizer, pku_lines, tmp_path):
    model = tiny_task_model("bert", "tag", list(BMES), char_tokenizer.vocab_size)
    path = save_task_checkpoint(tmp_path / "seg", model, char_tokenizer)
    predictor = Predictor(load_task_checkpoint(path))
    long_words = [w for line in pku_lines[3:8] for w in split_words(line)]
    tokens = [c for w in long_words for c in w]
    assert len(tokens) > 3 * predictor.max_length  # several windows
    example = TagExample(tokens, words_to_tags(long_words))
    rows, stats = encode_examples([example], char_tokenizer, "bert", 64, list(BMES))
    assert stats["windows"] > 3 and all(len(r["input_ids"]) <= 64 for r in rows)
    starts = {r["span"][0] for r in rows}  # windows were cut at word ends
    assert starts <= {sum(map(len, long_words[:i])) for i in range(len(long_words))}
    (tags,) = predictor.tag([tokens])
    assert len(tags) == len(tokens) and first_invalid_bmes(tags) is None
    (answer,) = predictor.segment(["共同创造 美好的新世纪"])
    assert "".join(answer["words"]) == "共同创造美好的新世纪"
    cut = 0  # the space is a word boundary whatever the model says
    boundaries = {cut := cut + len(w) for w in answer["words"]}
    assert 4 in boundaries and first_invalid_bmes(answer["tags"]) is None
    # A plain (non-task) checkpoint is refused by name.
    save_checkpoint(
        tmp_path / "plain",
        build_model("bert", "tiny", vocab_size=char_tokenizer.vocab_size),
        char_tokenizer,
    )
    with pytest.raises(NLMError, match="not a fine-tuned checkpoint"):
        load_task_checkpoint(tmp_path / "plain")
