"""`nlm finetune` on real Ray Train + DeepSpeed (gloo, CPU): a bert word segmenter on pku text
with two data-parallel workers, and a gpt classifier trained on L = L2 + λ·L1. Tiny models and a
few steps: this checks the loop, the export and the metrics, not the quality."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest
import torch

from nlm.checkpoint import save_checkpoint
from nlm.cluster.finetune.loop import finetune
from nlm.cluster.train.metrics import read_metrics
from nlm.errors import NLMError
from nlm.finetune.config import FinetuneConfig
from nlm.finetune.cws import convert_cws, first_invalid_bmes, write_jsonl
from nlm.finetune.heads import load_task_checkpoint
from nlm.finetune.predict import Predictor
from nlm.models import build_model
from nlm.tokenizers import train_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_mirror) -> dict[str, Path]:
    """Tiny gpt and bert 'pretrained' checkpoints on a char vocabulary of pku + msr, and data."""
    root = tmp_path_factory.mktemp("finetune")
    pku = (data_mirror / "pku" / "pku_test_gold.utf8").read_text(encoding="utf-8").splitlines()
    msr = (data_mirror / "msr" / "msr_test_gold.utf8").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer("char", pku[:1000] + msr[:1000], segmented=True)
    paths = {}
    for family in ("gpt", "bert"):
        torch.manual_seed(0)
        model = build_model(family, "tiny", vocab_size=tokenizer.vocab_size)
        paths[family] = save_checkpoint(root / family, model, tokenizer)
    sample = root / "pku-sample.txt"
    sample.write_text("\n".join(pku[:160]) + "\n", encoding="utf-8")
    convert_cws(sample, root / "cws-train.jsonl", root / "cws-test.jsonl", test_fraction=0.2)

    # A real two-class task: which corpus (People's Daily or MSR) a sentence comes from.
    def rows(lines, label):
        return [{"text": "".join(x.split()), "label": label} for x in lines if x.strip()]

    write_jsonl(root / "src-train.jsonl", rows(pku[200:260], "pku") + rows(msr[200:260], "msr"))
    write_jsonl(root / "src-test.jsonl", rows(pku[300:315], "pku") + rows(msr[300:315], "msr"))
    paths["root"] = root
    return paths


@pytest.fixture(scope="module")
def runs(ray_local, pretrained) -> dict[str, FinetuneConfig]:
    """Both fine-tuning runs (the tests below check them, the serving test serves them)."""
    root = pretrained["root"]
    bert = FinetuneConfig.from_dict(
        dict(
            checkpoint=str(pretrained["bert"]),
            task="tag",
            train=str(root / "cws-train.jsonl"),
            eval=str(root / "cws-test.jsonl"),
            out=str(root / "bert-cws"),
            max_steps=6,
            eval_every=3,
            log_every=2,
            micro_batch=16,
            lr=2e-3,
            workers=2,
            cpus_per_worker=0.5,
            zero_stage=2,
            max_length=48,
        )
    )
    gpt = FinetuneConfig.from_dict(
        dict(
            checkpoint=str(pretrained["gpt"]),
            task="classify",
            lm_weight=0.5,
            train=str(root / "src-train.jsonl"),
            eval=str(root / "src-test.jsonl"),
            out=str(root / "gpt-src"),
            max_steps=4,
            log_every=2,
            micro_batch=16,
            lr=2e-3,
            workers=1,
            cpus_per_worker=1.0,
        )
    )
    return {
        "bert": bert,
        "bert_summary": finetune(bert, progress=False),
        "gpt": gpt,
        "gpt_summary": finetune(gpt, progress=False),
        "root": root,
    }


def test_bert_segmenter_on_two_workers(runs):
    root, config, summary = runs["root"], runs["bert"], runs["bert_summary"]
    assert summary["export_max_abs_logit_diff"] <= 1e-4
    for key in (
        "test_word_f1",
        "test_word_precision",
        "test_word_recall",
        "test_oov_recall",
        "test_tag_accuracy",
        "eval_span_f1",
    ):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["test_examples"] == sum(1 for _ in open(root / "cws-test.jsonl"))
    records = read_metrics(root / "bert-cws")
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "eval_loss" in r and "event" not in r] == [3, 6]
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2
    assert records[-1]["event"] == "end"
    # The exported segmenter: label map intact, answers valid segmentations.
    loaded = load_task_checkpoint(root / "bert-cws")
    assert loaded.labels == ["B", "M", "E", "S"] and loaded.task == "tag"
    (answer,) = Predictor(loaded).segment(["人类社会前进的航船就要驶入21世纪的新航程。"])
    assert "".join(answer["words"]) == "人类社会前进的航船就要驶入21世纪的新航程。"
    assert first_invalid_bmes(answer["tags"]) is None
    # The run refuses to overwrite itself unless asked.
    with pytest.raises(NLMError, match="already holds a run"):
        finetune(config, progress=False)


def test_gpt_classifier_with_lm_loss(runs):
    root, summary = runs["root"], runs["gpt_summary"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and 0.0 <= summary["test_macro_f1"] <= 1.0
    losses = [r for r in read_metrics(root / "gpt-src") if "loss" in r]
    for r in losses:  # the logged L is L2 + λ·L1 of the same batches
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.5 * r["lm_loss"], abs=1e-4)
    config_json = json.loads((root / "gpt-src" / "model" / "config.json").read_text())
    assert config_json["labels"] == ["msr", "pku"] and config_json["finetune"]["lm_weight"] == 0.5
    answers = Predictor(load_task_checkpoint(root / "gpt-src")).classify(["新年贺词", "我们的"])
    assert all(
        a["label"] in ("msr", "pku") and abs(sum(a["probs"].values()) - 1) < 1e-4 for a in answers
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_answers_classify_and_tag(runs):
    """Both fine-tuned checkpoints and a pretrained one in one Serve application, real HTTP on
    127.0.0.1: answers, and the 4xx of each wrong request."""
    from ray import serve

    from nlm.serve.app import build_app

    root, port = runs["root"], free_port()
    checkpoints = [
        f"seg={root / 'bert-cws'}",
        f"src={root / 'gpt-src'}",
        f"base={runs['bert'].checkpoint}",
    ]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"checkpoints": checkpoints}), name="finetune-test", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            text = "人类社会前进的航船就要驶入21世纪的新航程。"
            seg = client.post("/v1/tag", json={"model": "seg", "text": text})
            assert seg.status_code == 200, seg.text
            body = seg.json()
            assert "".join(body["words"]) == text and first_invalid_bmes(body["tags"]) is None
            # The same answer as the library's, one request or many.
            expected = Predictor(load_task_checkpoint(root / "bert-cws")).segment([text])[0]
            assert body["words"] == expected["words"]
            many = client.post("/v1/tag", json={"model": "seg", "tokens": [["新", "年"], ["好"]]})
            assert [len(r["tags"]) for r in many.json()["results"]] == [2, 1]
            cls = client.post("/v1/classify", json={"model": "src", "text": ["新年贺词", "今天"]})
            assert cls.status_code == 200, cls.text
            assert {r["label"] for r in cls.json()["results"]} <= {"msr", "pku"}
            # A model asked for what it does not do: a tagger to classify, a classifier to tag,
            # a pretrained bert (no head) either, a segmenter to fill masks.
            for path, model in (
                ("/v1/classify", "seg"),
                ("/v1/tag", "src"),
                ("/v1/tag", "base"),
                ("/v1/classify", "base"),
            ):
                wrong = client.post(path, json={"model": model, "text": "新年"})
                assert wrong.status_code == 400, (path, model, wrong.text)
                assert wrong.json()["error"]["code"] == "wrong_family", (path, model)
            wrong = client.post("/v1/fill-mask", json={"model": "seg", "text": "新[MASK]"})
            assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_family"
            unknown = client.post("/v1/tag", json={"model": "nope", "text": "新年"})
            assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
            empty = client.post("/v1/tag", json={"model": "seg", "text": "  "})
            assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_input"
            empty = client.post("/v1/tag", json={"model": "seg", "text": ["新年", ""]})
            assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_input"
            assert "item 1" in empty.json()["error"]["message"]
            empty = client.post("/v1/classify", json={"model": "src", "text": " "})
            assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_input"
            # The pretrained model still answers its own endpoints beside the task models.
            filled = client.post("/v1/fill-mask", json={"model": "base", "text": "新[MASK]"})
            assert filled.status_code == 200, filled.text
            both = client.post("/v1/tag", json={"model": "seg", "text": "a", "tokens": ["a"]})
            assert both.status_code == 422
            models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
            assert models["seg"]["endpoints"] == ["tag"] and models["src"]["endpoints"] == [
                "classify"
            ]
            assert "tag" not in models["base"]["endpoints"]
    finally:
        serve.shutdown()
