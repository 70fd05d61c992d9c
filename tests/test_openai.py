"""The OpenAI-compatible API (and the playground page) with the clients people use: the `openai` Python client and
EleutherAI's lm-evaluation-harness (`local-completions`) against a real `nlm serve` (Ray Serve
on 127.0.0.1, tiny checkpoints of every family, a bearer token set; the session's server from
tests/conftest.py, shared with test_serve).

Covers models.list, completions (one prompt, a list, token ids, n > 1, stop, echo + logprobs,
seed reproducibility, the same tokens as /v1/generate), streaming (chunks arrive before the end;
the text equals the non-streamed answer for the same seed), embeddings, the tokenizer endpoints,
the error cases in OpenAI's shape, the Prometheus metrics, cancellation of streams whose client
left (the replica's decode-step counter stops), and lm-eval's perplexity against `nlm eval`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import REPO, SERVE_MAX_NEW_TOKENS, SERVE_TOKEN, SERVED_NEWER, Server
from test_inference import FAMILIES

from nlm.tokenizers.base import EOS_ID

pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")
TOKEN = SERVE_TOKEN
MODELS = (*FAMILIES, *SERVED_NEWER)  # what the shared server serves
LM_EVAL_DIR = Path(__file__).resolve().parent / "lm_eval"
# New tokens of a long generation (lstm: no position limit), seconds of decoding.
LONG = SERVE_MAX_NEW_TOKENS
MIN_TOKENS = 20  # the playground test: tokens (words) streamed into the page at least


@pytest.fixture(scope="module")
def server(served) -> Server:
    """The session's `nlm serve` (tests/conftest.py, shared with test_serve): every tiny
    checkpoint, the bearer token, --max-new-tokens for LONG generations."""
    return served.main


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with server.client(TOKEN) as c:
        yield c


def generate_stats(http: httpx.Client, model: str) -> dict:
    entries = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    return entries[model]["replica"]["stats"]["generate"]


def test_models_list(client, http):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == set(MODELS)
    gpt = models["gpt"]
    assert gpt.object == "model" and gpt.owned_by == "nlm" and gpt.created > 0
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    entry = {m["id"]: m for m in raw["data"]}["gpt"]
    assert entry["family"] == "gpt" and entry["vocab_size"] == 256 and entry["parameters"] > 0
    assert entry["test_ppl"] == pytest.approx(253.0)  # recorded figures (test_inference)
    assert entry["tokenizer"] == "word" and "generate" in entry["endpoints"]
    one = http.get("/models/lstm/v1/models").json()
    assert [m["id"] for m in one["data"]] == ["lstm"]


def test_openapi_declares_the_openai_bodies(http):
    # The routes read their bodies themselves (for OpenAI's error shape); /openapi.json still
    # says what they take, so generated clients and the fuzz test (test_serve.py) see them.
    document = http.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, name in [("/v1/completions", "CompletionRequest"),
                       ("/models/{name}/v1/embeddings", "EmbeddingRequest"),
                       ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")]:  # fmt: skip
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{name}"}
        assert schemas[name]["additionalProperties"] is False
    completion = schemas["CompletionRequest"]
    assert {"prompt", "max_tokens", "stream", "logprobs", "echo"} <= set(completion["properties"])
    assert completion["required"] == ["model", "prompt"]


def test_completions_single_list_ids_seed(client, http):
    one = client.completions.create(model="gpt", prompt="The lobster", max_tokens=12, seed=1)
    assert one.object == "text_completion" and one.id and one.model == "gpt"
    (choice,) = one.choices
    assert choice.index == 0 and choice.finish_reason in ("length", "stop")
    assert one.usage.prompt_tokens == 2 and one.usage.completion_tokens <= 12
    assert one.usage.total_tokens == one.usage.prompt_tokens + one.usage.completion_tokens
    again = client.completions.create(model="gpt", prompt="The lobster", max_tokens=12, seed=1)
    assert again.choices[0].text == choice.text  # seed: reproducible
    # A list of prompts, and the same prompt as token ids.
    ids = http.post("/models/gpt/tokenize", json={"prompt": "The lobster"}).json()["tokens"]
    many = client.completions.create(
        model="gpt", prompt=["The lobster", "the lobster is"], max_tokens=12, seed=1
    )
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == choice.text  # whatever else is in the batch
    as_ids = client.completions.create(model="gpt", prompt=ids, max_tokens=12, seed=1)
    assert as_ids.choices[0].text == choice.text
    nested = client.completions.create(model="gpt", prompt=[ids, ids], max_tokens=12, seed=1)
    assert [c.text for c in nested.choices] == [choice.text] * 2
    # The same tokens as nlm's own /v1/generate (one engine path) for a greedy request.
    native = http.post(
        "/v1/generate",
        json={"model": "gpt", "prompt": "The lobster", "max_tokens": 12, "temperature": 0.0},
    ).json()
    greedy = client.completions.create(
        model="gpt", prompt="The lobster", max_tokens=12, temperature=0.0, logprobs=0
    )
    lp = greedy.choices[0].logprobs
    # Logprobs also list the </s> that ends a choice (as vLLM's do); /v1/generate does not.
    ended = native["finish_reason"] == "end_of_document"
    assert ended == (greedy.choices[0].finish_reason == "stop")
    assert lp.tokens == native["tokens"] + ["</s>"] * ended
    assert lp.token_logprobs[: len(native["logprobs"])] == pytest.approx(
        native["logprobs"], abs=1e-4
    )


def test_n_choices_have_their_own_seeds(client):
    answer = client.completions.create(
        model="lstm",
        prompt="The lobster",
        max_tokens=16,
        n=3,
        seed=5,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in answer.choices] == [0, 1, 2]
    texts = [c.text for c in answer.choices]
    assert len(set(texts)) > 1  # different seeds (5, 6, 7), different samples
    single = client.completions.create(
        model="lstm", prompt="The lobster", max_tokens=16, seed=6, extra_body={"ignore_eos": True}
    )
    assert single.choices[0].text == texts[1]  # choice i samples with seed + i
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_stop_strings(client):
    base = client.completions.create(
        model="lstm", prompt="The", max_tokens=24, seed=3, extra_body={"ignore_eos": True}
    )
    words = base.choices[0].text.split()
    assert len(words) >= 6
    stop = " " + words[4]
    cut = client.completions.create(
        model="lstm",
        prompt="The",
        max_tokens=24,
        seed=3,
        stop=[stop, "zzz-never"],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == base.choices[0].text[: base.choices[0].text.index(stop)]


def test_echo_logprobs_for_scoring(client, http):
    text = "the lobster is blue"
    answer = client.completions.create(
        model="gpt", prompt=text, max_tokens=0, echo=True, logprobs=3
    )
    (choice,) = answer.choices
    lp = choice.logprobs
    assert choice.text == text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert [t if t == "<unk>" else t for t in lp.tokens] == [
        w if w in lp.tokens else "<unk>" for w in text.split()
    ]
    assert all(
        len(top) <= 3 and max(top.values()) >= tl - 1e-5
        for top, tl in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    # The sum is nlm's own /v1/score of the text.
    score = http.post("/v1/score", json={"model": "gpt", "text": text}).json()
    assert sum(lp.token_logprobs) == pytest.approx(score["logprob"], abs=1e-3)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # lm-evaluation-harness's shape: </s> context first (no log-prob), one generated token.
    ids = http.post("/models/gpt/tokenize", json={"prompt": "</s> " + text}).json()["tokens"]
    lm = http.post(
        "/models/gpt/v1/completions",
        json={
            "model": "gpt",
            "prompt": ids,
            "temperature": 0,
            "max_tokens": 1,
            "logprobs": 1,
            "echo": True,
            "seed": 1234,
        },
    ).json()
    got = lm["choices"][0]["logprobs"]
    assert got["token_logprobs"][0] is None and len(got["token_logprobs"]) == len(ids) + 1
    assert sum(got["token_logprobs"][1:-1]) == pytest.approx(score["logprob"], abs=1e-3)


def test_streaming_first_token_before_the_end_and_same_text(client, server):
    kwargs = dict(
        model="lstm",
        prompt="The lobster",
        max_tokens=LONG,
        seed=11,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kwargs).choices[0].text
    started = time.monotonic()
    arrivals, texts = [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        arrivals.append(time.monotonic() - started)
        texts.append(chunk.choices[0].text if chunk.choices else "")
    assert len(arrivals) > 20  # token by token (or small groups), not one answer
    assert "".join(texts) == full
    # The first token reached the client well before the generation ended.
    assert arrivals[0] < 0.5 * arrivals[-1], arrivals[:3] + arrivals[-3:]
    # Raw SSE: data: lines, [DONE] last, usage on request.
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={
            "model": "gpt",
            "prompt": ["a", "b"],
            "max_tokens": 4,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=60,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    pieces = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["index"] for p in pieces for c in p["choices"]} == {0, 1}
    assert pieces[-1]["usage"]["total_tokens"] > 0 and pieces[-1]["choices"] == []


def test_stream_cancellation_frees_rows(server, http):
    before = generate_stats(http, "lstm")
    body = {
        "model": "lstm",
        "prompt": "The lobster",
        "max_tokens": LONG,
        "stream": True,
        "ignore_eos": True,
        "seed": 1,
    }
    streams = []
    for _ in range(4):
        c = httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )
        cm = c.stream("POST", "/v1/completions", json=body)
        response = cm.__enter__()
        lines = response.iter_lines()
        got = 0
        while got < 2:  # two chunks of each stream, then the client leaves
            if next(lines).startswith("data: {"):
                got += 1
        streams.append((c, cm))
    for c, cm in streams:
        cm.__exit__(None, None, None)
        c.close()
    at_hang_up = generate_stats(http, "lstm")
    time.sleep(3)
    settled = generate_stats(http, "lstm")
    time.sleep(2)
    after = generate_stats(http, "lstm")
    assert after["steps"] == settled["steps"]  # nothing decodes for clients that left
    assert after["cancelled"] - before["cancelled"] >= 4
    # Had any row run to its end, the rows (decoded in the same steps) would have taken LONG
    # steps; they left when their clients did (a quiet machine decodes ~2000 steps while the
    # four streams open one after another, so a tighter bound measures the machine).
    assert after["steps"] - before["steps"] < LONG
    # and within a few steps of the last client leaving, as test_serve_abuse's non-streamed rows
    assert after["steps"] - at_hang_up["steps"] <= 16, (before, at_hang_up, after)


def test_embeddings(client):
    answer = client.embeddings.create(model="bert", input=["one text", "another"])
    assert [d.index for d in answer.data] == [0, 1]
    assert len(answer.data[0].embedding) == 32 and answer.usage.prompt_tokens > 0
    single = client.embeddings.create(model="gpt", input="one text", encoding_format="float")
    assert len(single.data) == 1 and len(single.data[0].embedding) == 32
    # The client asks for base64 by default: the same vector either way.
    floats = client.embeddings.create(model="bert", input="one text", encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(answer.data[0].embedding, abs=1e-6)


def test_tokenizer_endpoints(http):
    info = http.get("/models/gpt/tokenizer_info").json()
    assert info["eos_token"] == "</s>"
    ids = http.post(
        "/models/gpt/tokenize", json={"prompt": "the lobster </s>", "add_special_tokens": False}
    ).json()["tokens"]
    assert ids[-1] == EOS_ID
    back = http.post("/models/gpt/detokenize", json={"tokens": ids}).json()["prompt"]
    assert http.post("/models/gpt/tokenize", json={"prompt": back}).json()["tokens"] == ids
    # Several models: the unprefixed route wants a model.
    response = http.get("/tokenizer_info")
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model"),
        ({"model": "bert", "prompt": "x"}, 400, "model"),
        ({"model": "gpt", "prompt": "x", "best_of": 3}, 400, "best_of"),
        ({"model": "gpt", "prompt": "x", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
        ({"model": "gpt", "prompt": "x", "suffix": "y"}, 400, "suffix"),
        ({"model": "gpt", "prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"model": "gpt", "prompt": "x", "made_up": 1}, 400, "made_up"),
        ({"model": "gpt", "prompt": "x", "n": 0}, 400, "n"),
        ({"model": "gpt", "prompt": [1, 99999]}, 400, "prompt"),
        ({"model": "gpt", "prompt": "   "}, 400, "prompt"),
        ({"model": "gpt", "prompt": "x", "max_tokens": 100}, 400, "max_tokens"),  # 64 positions
        ({"model": "gpt", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
        ({"model": "gpt", "prompt": []}, 400, "prompt"),
        ({"model": "gpt"}, 400, "prompt"),
    ],
)
def test_errors_in_openai_shape(http, body, status, param):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    stream = http.post("/v1/completions", json={**body, "stream": True})
    assert stream.status_code == status


def test_errors_from_the_client_and_auth(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="gpt", prompt="x", best_of=2)
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    bad_json = httpx.post(
        server.url + "/v1/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    # nlm's own routes keep nlm's error shape.
    native = httpx.post(
        server.url + "/v1/generate",
        json={"model": "nope", "prompt": "x"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert native.status_code == 404 and set(native.json()["error"]) == {"code", "message"}


def test_prometheus_metrics(server, client):
    client.completions.create(model="gpt", prompt="The lobster", max_tokens=8)
    for _ in range(2):
        list(client.completions.create(model="gpt", prompt="The", max_tokens=8, stream=True))
    wanted = [
        "nlm_requests_total",
        "nlm_time_to_first_token_seconds_bucket",
        "nlm_time_per_output_token_seconds_bucket",
        "nlm_queue_wait_seconds_bucket",
        "nlm_decode_step_rows_bucket",
        "nlm_output_tokens_total",
    ]
    found = re.search(r"Prometheus metrics at (\S+)", server.log.read_text())
    assert found, server.tail()
    deadline = time.monotonic() + 60  # Ray exports metrics every few seconds
    while True:
        try:
            text = httpx.get(found.group(1), timeout=10).text
        except httpx.HTTPError:
            text = ""
        missing = [w for w in wanted if w not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing
    counted = [
        line
        for line in text.splitlines()
        if "nlm_requests_total{" in line and 'model="gpt"' in line and 'status="200"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 3, counted


def test_lm_eval_perplexity_matches_nlm_eval(server, tmp_path):
    """lm-evaluation-harness scores a local text through /models/gpt/v1/completions with the
    model's own tokenizer (its remote-tokenizer probe); its perplexities equal `nlm eval`'s."""
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OPENAI_API_KEY": TOKEN,
        "HF_HOME": str(tmp_path / "hf"),
    }
    base = f"{server.url}/models/gpt/v1/completions"
    out = tmp_path / "lm-eval"
    run = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions"]
        + [
            "--model_args",
            f"model=gpt,base_url={base},tokenized_requests=False,max_length=63,auth_token={TOKEN},num_concurrent=1",
        ]
        + [
            "--tasks",
            "nlm_local_text",
            "--include_path",
            str(LM_EVAL_DIR),
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=LM_EVAL_DIR,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = out.rglob("results_*.json")
    metrics = json.loads(result_file.read_text())["results"]["nlm_local_text"]
    ours = subprocess.run(
        [sys.executable, "-m", "nlm", "eval", "--checkpoint", str(server.paths["gpt"])]
        + ["--input", str(LM_EVAL_DIR / "nlm_text.txt"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert ours.returncode == 0, ours.stderr
    mine = json.loads(ours.stdout)
    total_logprob = -mine["nll"] * mine["tokens"]
    # lm-eval divides the same log-likelihood by the words and bytes of its target text.
    target = (LM_EVAL_DIR / "nlm_text.txt").read_text().strip() + " </s>"
    words, nbytes = len(re.split(r"\s+", target)), len(target.encode("utf-8"))
    assert metrics["word_perplexity,none"] == pytest.approx(
        math.exp(-total_logprob / words), rel=0.005
    )
    assert metrics["byte_perplexity,none"] == pytest.approx(
        math.exp(-total_logprob / nbytes), rel=0.005
    )


# ---------------------------------------------------------------- the playground page
# A real headless browser: Debian's chromium driven by selenium through chromium-driver (the
# Makefile installs both when missing).


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # `make test` installs them (as root); a run without them fails here rather than skipping.
    assert shutil.which("chromedriver") and shutil.which("chromium"), (
        "needs chromium and chromium-driver: apt-get install -y chromium chromium-driver"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_streams_a_completion(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(f"{server.url}/?token={TOKEN}")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    options = [
        o.get_attribute("value") for o in Select(browser.find_element(By.ID, "model")).options
    ]
    assert set(options) == set(MODELS)
    Select(browser.find_element(By.ID, "model")).select_by_value("lstm")
    browser.find_element(By.ID, "prompt").clear()
    browser.find_element(By.ID, "prompt").send_keys("The lobster")
    for field, value in (("max_tokens", "400"), ("seed", "4")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "complete").click()
    output = browser.find_element(By.ID, "output")
    seen = []  # chunk counts observed while the stream runs
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        chunks = int(output.get_attribute("data-chunks") or 0)
        seen.append(chunks)
        status = browser.find_element(By.ID, "status").text
        if status.startswith("finished") or status == "done":
            break
        time.sleep(0.05)
    assert browser.find_element(By.ID, "error").text == ""
    final = int(output.get_attribute("data-chunks") or 0)
    # Chunks may group tokens (--stream-batching-interval-ms): count the words it streamed.
    assert final >= 2, final
    assert len(output.text.split()) >= MIN_TOKENS, output.text
    # Tokens appeared over time: the page saw partial counts before the last one, or (when the
    # browser's first look came after the end, on a loaded machine) its reader got the stream
    # in several network reads, where an unstreamed answer arrives in one.
    reads = int(output.get_attribute("data-reads") or 0)
    assert any(0 < c < final for c in seen) or reads >= 2, (seen[-10:], reads)
