"""The serving issue end to end: `nlm serve` on tiny checkpoints of all seven families, real Ray
Serve, real HTTP on 127.0.0.1. The session's server (`served` in tests/conftest.py, shared with
test_openai: started like the acceptance script does, in the background, polled on /healthz,
killed after the last test that uses it).

Covers every endpoint for every family it applies to, batching (fewer batched executions than
requests, and the same answers as one at a time), the error cases, bearer-token auth, a killed
replica being replaced, client cancellations, a schemathesis fuzz pass over the served OpenAPI
schema, and serve/config.yaml against Ray's own config schema.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from conftest import REPO, SERVED_NEWER, Server
from conftest import SERVE_MAX_ITEMS as MAX_ITEMS
from conftest import SERVE_TOKEN as TOKEN
from test_inference import CAUSAL, FAMILIES, TEXTS

from nlm.checkpoint import load_checkpoint
from nlm.inference import Engine

# Ray's own Serve config models use a pydantic idiom that pydantic 2.14 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")


def nlm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nlm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or os.environ.copy(),
        cwd=REPO,
    )


@pytest.fixture(scope="module")
def server(served) -> Server:
    """The session's `nlm serve` of every family (tests/conftest.py), shared with test_openai."""
    return served.main


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def stats(client: httpx.Client, model: str, endpoint: str) -> dict:
    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    return models[model]["replica"]["stats"][endpoint]


def post_ok(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- health, auth, models


def test_healthz_is_open_and_api_needs_the_token(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok", "models": 7}
    with server.client(token=None) as anonymous, server.client(token="wrong") as wrong:
        for c in (anonymous, wrong):
            # nlm's routes answer nlm's error shape, the OpenAI routes OpenAI's (test_openai.py).
            for response, code in (
                (c.get("/v1/models"), "invalid_api_key"),
                (c.post("/v1/score", json={"model": "gpt", "text": "a"}), "unauthorized"),
            ):
                assert response.status_code == 401
                assert response.json()["error"]["code"] == code
        assert anonymous.get("/openapi.json").status_code == 200


def test_models_lists_every_checkpoint(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {*FAMILIES, *SERVED_NEWER}
    for i, family in enumerate(FAMILIES):
        info = models[family]
        assert info["family"] == family
        assert info["parameters"] > 1000 and info["vocab_size"] == 256
        assert info["tokenizer"] == "word"
        assert info["test_ppl"] == 250.0 + i and info["bits_per_byte"] == 2.0 + i
        assert info["replica"]["pid"] > 0
    assert models["gpt"]["max_positions"] == 64 and models["lstm"]["max_positions"] is None
    assert (
        "fill-mask" in models["bert"]["endpoints"] and "generate" not in models["bert"]["endpoints"]
    )


# ---------------------------------------------------------------- every endpoint, every family


@pytest.mark.parametrize("family", FAMILIES)
def test_score(client, family):
    one = post_ok(client, "/v1/score", {"model": family, "text": TEXTS[0]})
    assert one["model"] == family and one["num_tokens"] == 4 and one["num_bytes"] == len(TEXTS[0])
    assert one["logprob"] < 0 and one["ppl"] == pytest.approx(math.exp(-one["logprob"] / 4))
    many = post_ok(client, "/v1/score", {"model": family, "text": TEXTS})
    assert [r["num_tokens"] for r in many["results"]] == [4, 12, 7]
    assert many["results"][0]["logprob"] == pytest.approx(one["logprob"], abs=1e-3)
    # bits/byte: none for bert's pseudo-log-likelihood; else open vocabulary, each <unk> (the
    # 256-word vocabulary lacks "blue") paying its spelling on top of the closed figure
    assert one["unk_tokens"] == 1 and one["unk_bytes"] == len("blue")
    if family == "bert":
        assert one["bits_per_byte"] is None and one["bits_per_byte_closed_vocab"] is None
    else:
        closed = -one["logprob"] / math.log(2) / one["num_bytes"]
        assert one["bits_per_byte_closed_vocab"] == pytest.approx(closed, rel=1e-6)
        assert one["bits_per_byte"] > closed + 8 / one["num_bytes"]


@pytest.mark.parametrize("family", FAMILIES)
def test_embed(client, family):
    answer = post_ok(client, "/v1/embed", {"model": family, "texts": TEXTS})
    assert answer["dim"] == 32 and len(answer["embeddings"]) == 3
    assert all(len(v) == 32 and all(math.isfinite(x) for x in v) for v in answer["embeddings"])
    single = post_ok(client, "/v1/embed", {"model": family, "texts": TEXTS[1]})
    assert single["embeddings"][0] == pytest.approx(answer["embeddings"][1], abs=1e-5)


def test_embed_per_token(client):
    for family in ("gpt", "bert"):  # a causal and a bidirectional family, one request each
        body = {"model": family, "texts": TEXTS[:2], "granularity": "token"}
        answer = post_ok(client, "/v1/embed", body)
        assert answer["granularity"] == "token" and answer["dim"] == 32
        first, second = answer["embeddings"]
        assert len(first["tokens"]) == len(first["embeddings"]) == 4
        assert len(second["tokens"]) == 12 and all(len(v) == 32 for v in second["embeddings"])
        pooled = post_ok(client, "/v1/embed", {"model": family, "texts": TEXTS[0]})
        mean = [sum(col) / 4 for col in zip(*first["embeddings"], strict=True)]
        assert pooled["granularity"] == "pooled"
        assert pooled["embeddings"][0] == pytest.approx(mean, abs=1e-5)
    bad = client.post("/v1/embed", json={"model": "gpt", "texts": "a", "granularity": "word"})
    assert bad.status_code == 422 and "granularity" in bad.json()["error"]["message"]


@pytest.mark.parametrize("family", FAMILIES)
def test_neighbors(client, family):
    answer = post_ok(client, "/v1/neighbors", {"model": family, "word": "lobster", "k": 4})
    cosines = [n["cosine"] for n in answer["neighbors"]]
    assert len(cosines) == 4 and cosines == sorted(cosines, reverse=True)
    assert "lobster" not in [n["token"] for n in answer["neighbors"]]


def test_elmo_and_the_transformer_are_served(server, client):
    """/v1/models metadata, /v1/embed (pooled and per token), /v1/neighbors and the bad inputs
    of the two newer families answer over HTTP what the library's Engine gives in-process."""
    listed = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    for family in SERVED_NEWER:
        local = Engine(load_checkpoint(server.paths[family]))
        info, expected = listed[family], local.info()
        for key in ("family", "endpoints", "parameters", "vocab_size", "max_positions"):
            assert info[key] == expected[key], (family, key)
        assert info["replica"]["pid"] > 0
        for granularity in ("pooled", "token"):
            body = {"model": family, "texts": TEXTS[:2], "granularity": granularity}
            answer = post_ok(client, "/v1/embed", body)
            want = local.embed([local.embed_job(t, granularity) for t in TEXTS[:2]])
            assert answer["dim"] == local.model.hidden_size
            if granularity == "pooled":
                assert all(a == pytest.approx(w, abs=1e-5) for a, w in
                           zip(answer["embeddings"], want, strict=True))  # fmt: skip
            else:
                for a, w in zip(answer["embeddings"], want, strict=True):
                    assert a["tokens"] == w["tokens"] and len(a["tokens"]) > 1
                    assert torch.allclose(torch.tensor(a["embeddings"]),
                                          torch.tensor(w["embeddings"]), atol=1e-5)  # fmt: skip
        answer = post_ok(client, "/v1/neighbors", {"model": family, "word": "lobster", "k": 4})
        assert [n["token"] for n in answer["neighbors"]] == [
            n["token"] for n in local.neighbors("lobster", 4)
        ]
    assert listed["elmo"]["endpoints"] == ["score", "embed", "neighbors"]
    assert listed["elmo"]["max_positions"] is None
    assert listed["transformer"]["endpoints"] == ["generate", "score", "embed", "neighbors"]
    assert listed["transformer"]["max_positions"] == 64

    long_source = " ".join(["the"] * 64)  # + </s>: past the encoder's 64 positions
    for path, body, status, phrase in (
        ("/v1/score", {"model": "transformer", "text": "the lobster"}, 422, "field 'source'"),
        ("/v1/generate", {"model": "transformer", "prompt": long_source, "max_tokens": 2}, 400,
         "input too long"),
        ("/v1/score", {"model": "transformer", "text": "a", "source": long_source}, 400,
         "input too long"),
        ("/v1/generate", {"model": "elmo", "prompt": "the lobster"}, 400, "does not apply"),
        ("/v1/score", {"model": "elmo", "text": "a", "source": "b"}, 422, "field 'source'"),
    ):  # fmt: skip
        response = client.post(path, json=body)
        assert response.status_code == status, (path, body, response.text)
        assert phrase in response.json()["error"]["message"] and "\n" not in response.text


@pytest.mark.parametrize("family", CAUSAL)
def test_generate(client, family):
    body = {
        "model": family,
        "prompt": "the lobster",
        "max_tokens": 6,
        "seed": 7,
        "stop_at_eos": False,
    }
    answer = post_ok(client, "/v1/generate", body)
    assert len(answer["tokens"]) == len(answer["token_ids"]) == len(answer["logprobs"]) == 6
    assert all(lp <= 0 for lp in answer["logprobs"]) and answer["seed"] == 7
    assert answer["finish_reason"] == "length" and answer["prompt_tokens"] == 2
    assert post_ok(client, "/v1/generate", body)["token_ids"] == answer["token_ids"]
    listed = post_ok(client, "/v1/generate", {**body, "prompt": ["the lobster", "blue"]})
    assert listed["results"][0]["token_ids"] == answer["token_ids"]


def test_fill_mask(client):
    answer = post_ok(
        client, "/v1/fill-mask", {"model": "bert", "text": "the [MASK] is [MASK]", "top_k": 3}
    )
    assert [m["position"] for m in answer["masks"]] == [0, 1]
    assert all(len(m["candidates"]) == 3 for m in answer["masks"])
    many = post_ok(client, "/v1/fill-mask", {"model": "bert", "text": ["a [MASK]", "[MASK] b"]})
    assert len(many["results"]) == 2 and len(many["results"][0]["masks"][0]["candidates"]) == 5


# ---------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_answer_as_alone(client):
    prompts = [f"{w} lobster" for w in ("the", "a", "blue", "In", "It", "life", "red", "sea")]
    bodies = [
        {
            "model": "gpt",
            "prompt": p,
            "max_tokens": 40,
            "seed": i,
            "temperature": 0.9,
            "stop_at_eos": False,
        }
        for i, p in enumerate(prompts)
    ]
    alone = [post_ok(client, "/v1/generate", b) for b in bodies]  # sequential: batches of one
    before = stats(client, "gpt", "generate")
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post_ok(client, "/v1/generate", b), bodies))
    after = stats(client, "gpt", "generate")
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(bodies)
    assert batches < requests, f"{requests} concurrent requests ran as {batches} batches"
    assert after["largest_batch"] >= 2
    for a, b in zip(alone, together, strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)

    texts = [f"{w} lobster is blue" for w in ("the", "a", "one", "In", "It", "red")]
    alone = [post_ok(client, "/v1/score", {"model": "lstm", "text": t}) for t in texts]
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(
            pool.map(lambda t: post_ok(client, "/v1/score", {"model": "lstm", "text": t}), texts)
        )
    for a, b in zip(alone, together, strict=True):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_mixed_models_concurrently_get_their_own_answers(client):
    expected = {
        f: post_ok(client, "/v1/score", {"model": f, "text": TEXTS[1]})["logprob"] for f in FAMILIES
    }
    with ThreadPoolExecutor(10) as pool:
        answers = list(
            pool.map(
                lambda f: (f, post_ok(client, "/v1/score", {"model": f, "text": TEXTS[1]})),
                list(FAMILIES) * 2,
            )
        )
    for family, answer in answers:
        assert answer["model"] == family
        assert answer["logprob"] == pytest.approx(expected[family], abs=1e-4)


# ---------------------------------------------------------------- errors


ERRORS = [
    ("/v1/score", {"model": "nope", "text": "a"}, 404, "unknown_model"),
    ("/v1/generate", {"model": "bert", "prompt": "a"}, 400, "wrong_family"),
    ("/v1/fill-mask", {"model": "gpt", "text": "a [MASK]"}, 400, "wrong_family"),
    ("/v1/score", {"model": "gpt", "text": ""}, 400, "empty_input"),
    ("/v1/embed", {"model": "rnn", "texts": ["a", " "]}, 400, "empty_input"),
    ("/v1/score", {"model": "gpt", "text": "lobster " * 100}, 400, "input_too_long"),
    ("/v1/score", {"model": "gpt", "text": 5}, 422, "invalid_request"),
    ("/v1/score", {"model": "gpt", "text": "a", "extra": 1}, 422, "invalid_request"),
    ("/v1/score", {"model": "gpt"}, 422, "invalid_request"),
    ("/v1/generate", {"model": "gpt", "prompt": "a", "max_tokens": "5"}, 422, "invalid_request"),
    ("/v1/generate", {"model": "gpt", "prompt": "a", "temperature": -1}, 422, "invalid_request"),
    (
        "/v1/generate",
        {"model": "lstm", "prompt": "a", "max_tokens": 10_000},
        400,
        "too_many_tokens",
    ),
    (
        "/v1/generate",
        {"model": "gpt", "prompt": "the lobster", "max_tokens": 63},
        400,
        "too_many_tokens",
    ),
    ("/v1/score", {"model": "fnn", "text": ["a"] * (MAX_ITEMS + 1)}, 400, "too_many_inputs"),
    ("/v1/fill-mask", {"model": "bert", "text": "no mask"}, 400, "no_mask"),
    ("/v1/neighbors", {"model": "lstm", "word": "qwertyuiop"}, 404, "unknown_word"),
    ("/v1/nothing", {}, 404, "not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), ERRORS)
def test_errors_are_json_4xx(client, path, body, status, code):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_malformed_json_and_curl_style_bodies(client):
    bad = client.post(
        "/v1/score", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    # A form body (what curl -d and any web page can send without a CORS preflight) is
    # refused, never read as JSON (issue 14 item 2)
    form = client.post(
        "/v1/score",
        content=json.dumps({"model": "fnn", "text": "a lobster"}).encode(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415, form.text
    assert form.json()["error"]["code"] == "unsupported_media_type"


# ---------------------------------------------------------------- robustness


def test_client_cancellations_leave_batching_working(server, client):
    body = {"model": "gpt", "prompt": "the lobster", "max_tokens": 40, "stop_at_eos": False}

    def impatient(i: int) -> None:
        with server.client(timeout=0.05) as c:
            try:
                c.post("/v1/generate", json={**body, "seed": i})
            except httpx.TimeoutException:
                pass

    for _ in range(3):
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(impatient, range(12)))
    # The batched deployment still serves a concurrent burst afterwards (ray #50046 hung here).
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda i: post_ok(client, "/v1/generate", {**body, "seed": i}), range(6))
        )
    assert all(len(a["token_ids"]) == 40 for a in answers)


def test_killed_replica_is_replaced_under_load(server, client):
    old_pid = {m["name"]: m for m in client.get("/v1/models").json()["data"]}["lstm"]["replica"][
        "pid"
    ]
    statuses: list[int] = []
    done = threading.Event()

    def load() -> None:
        with server.client(timeout=60) as c:
            while not done.is_set():
                try:
                    statuses.append(
                        c.post("/v1/score", json={"model": "lstm", "text": TEXTS[1]}).status_code
                    )
                except httpx.HTTPError:
                    statuses.append(-1)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        os.kill(old_pid, signal.SIGKILL)
        deadline = time.monotonic() + 180
        while True:
            assert time.monotonic() < deadline, f"no new lstm replica; statuses {statuses[-20:]}"
            response = client.get("/v1/models")
            if response.status_code == 200:
                lstm = {m["name"]: m for m in response.json()["data"]}["lstm"]
                pid = lstm["replica"]["pid"] if lstm.get("available", True) else old_pid
                if (
                    pid != old_pid
                    and client.post("/v1/score", json={"model": "lstm", "text": "a"}).status_code
                    == 200
                ):
                    break
            time.sleep(1)
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    assert 200 in statuses
    assert set(statuses) <= {200, 503}, f"unexpected statuses {sorted(set(statuses))}"
    assert post_ok(client, "/v1/score", {"model": "lstm", "text": TEXTS[1]})["num_tokens"] == 12


def test_fuzz_openapi_finds_no_server_error(server, client, tmp_path):
    """schemathesis over the served schema, model names narrowed to real ones so inputs reach the
    replicas (a random name only ever meets the 404 of the gateway)."""
    schema = client.get("/openapi.json").json()
    for component in schema["components"]["schemas"].values():
        props = component.get("properties", {})
        if "model" in props and component.get("additionalProperties") is False:
            props["model"] = {"type": "string", "enum": list(FAMILIES)}
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(schema))
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", str(path), "--url", server.url]
        + ["--checks", "not_a_server_error", "--max-examples", "12", "--phases", "examples,fuzzing"]
        + ["--header", f"Authorization: Bearer {TOKEN}", "--request-timeout", "120"]
        + ["--seed", "1", "--no-color", "--generation-database", "none", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "/v1/generate" in result.stdout


def test_prometheus_metrics_are_exported(server):
    lines = [
        line for line in server.log.read_text().splitlines() if "Prometheus metrics at" in line
    ]
    assert lines, server.tail()
    url = lines[0].split("Prometheus metrics at ")[1].strip()
    deadline = time.monotonic() + 60
    while True:
        try:
            response = httpx.get(url, timeout=10)
            if response.status_code == 200 and "ray_" in response.text:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"no Ray metrics at {url}"
        time.sleep(2)


# ---------------------------------------------------------------- CLI and config


def test_cli_refuses_bad_input_in_one_line(server, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    cases = [
        (["serve", str(tmp_path / "missing")], "no such checkpoint"),
        (["serve", str(server.paths["gpt"]), str(server.paths["gpt"])], "two models named"),
        (["serve", str(server.paths["gpt"]), "--port", port], "already in use"),
        (["serve", str(server.paths["gpt"]), "--max-batch-size", "0"], "--max-batch-size"),
    ]
    for args, message in cases:
        result = nlm(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("nlm: error:") and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_config_yaml_is_a_valid_serve_deploy_config(server, tmp_path):
    from ray.serve._private.build_app import build_app as build_serve_app
    from ray.serve.schema import ServeDeploySchema

    from nlm.serve.app import build_app

    config = ServeDeploySchema.model_validate(
        yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    )
    (application,) = config.applications
    assert application.import_path == "nlm.serve.app:build_app"
    assert config.http_options.host == "127.0.0.1"
    # The builder accepts the file's args (checkpoint paths swapped for real ones) and makes
    # exactly the deployments the file sizes, each with autoscaling and room for full batches.
    links = []
    for spec in application.args["checkpoints"]:
        link = tmp_path / Path(spec).name
        link.symlink_to(server.paths[Path(spec).name.split("-")[0]])
        links.append(str(link))
    built = build_serve_app(
        build_app({**application.args, "checkpoints": links}), name=application.name
    )
    names = {d.name for d in built.deployments}
    assert names == {d.name for d in application.deployments}
    for deployment in application.deployments:
        auto = deployment.autoscaling_config
        assert auto["min_replicas"] >= 1 and auto["max_replicas"] >= auto["min_replicas"]
        assert auto["target_ongoing_requests"] > 0
        if deployment.name != "Gateway":
            assert deployment.max_ongoing_requests >= deployment.user_config["max_batch_size"]
