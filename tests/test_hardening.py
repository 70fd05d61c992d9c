"""Issue 14: security and input-fault hardening. One section per numbered item."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SERVE_TOKEN

from nlm.sampling import filter_logits, sample_next

# --- 10. a tiny top_p is greedy ----------------------------------------------------------------


def test_tiny_top_p_keeps_the_most_likely_token():
    """1e-300 is 0 in float32: the old filter dropped every token and sampled the last id."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen)
    greedy = logits.argmax(dim=-1)
    for top_p in (1e-300, 1e-46, 5e-45, 1e-6):
        kept = filter_logits(logits, 1.0, None, top_p)
        assert torch.isfinite(kept).sum(dim=-1).tolist() == [1] * 6
        ids, logprobs = sample_next(logits, 1.0, None, top_p, generator=gen)
        assert torch.equal(ids, greedy), top_p
        assert torch.isfinite(logprobs).all()


def test_tiny_top_p_generate_equals_greedy():
    from nlm.models import build_model

    torch.manual_seed(0)
    model = build_model("gpt", "tiny", vocab_size=40).eval()
    prompt = torch.randint(7, 40, (2, 5))
    greedy = model.generate(prompt, 6, temperature=0)
    tiny = model.generate(prompt, 6, top_p=1e-300, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tiny[0], greedy[0])


# --- 11-13. corpus input faults --------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def nlm_cli(*args: str, timeout: float = 240, env: dict | None = None):
    run_env = dict(os.environ if env is None else env)
    run_env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "nlm", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=run_env,
        cwd=REPO,
    )


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("nlm: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _ptb_lines(data_mirror: Path, n: int) -> list[str]:
    return (data_mirror / "ptb" / "valid.txt").read_text(encoding="utf-8").splitlines()[:n]


def _unit_tables(path: Path, tokenizer: str, line_docs: bool, objective: str = "clm"):
    """What `nlm prepare` does with one file, minus Ray: the tokenizer trained on its sample
    and the actor's result for every unit."""
    from nlm.cluster.prepare.encode import process_unit
    from nlm.cluster.prepare.pipeline import PrepareConfig, check_training_text, train_on_sample
    from nlm.cluster.prepare.sources import Skips, find_sources, plan_units

    cfg = PrepareConfig(
        input=[str(path)], output="unused", tokenizer=tokenizer, line_docs=line_docs,
        objective=objective, seq_len=32, vocab_size=400 if tokenizer.startswith("spm") else None,
    )  # fmt: skip
    units = plan_units(
        find_sources(cfg.input),
        line_docs=line_docs,
        unit_bytes=1 << 20,
        max_doc_bytes=cfg.max_doc_bytes,
        text_column="text",
        skips=Skips(False),
    )
    check_training_text(cfg, units)
    tok = train_on_sample(cfg, units)
    tables = [process_unit(tok, u, cfg.worker_options()) for u in units]
    # The meta row holds the unit's byte count, which is the file's: the rest must be equal.
    return tok, [t.drop_columns(["meta"]) for t in tables]


@pytest.mark.parametrize(
    "tokenizer,line_docs,objective",
    [("word", False, "clm"), ("char", False, "clm"), ("word", True, "clm"),
     ("spm-bpe", False, "clm"), ("word", False, "mlm")],
)  # fmt: skip
def test_bom_and_crlf_give_identical_shards(tmp_path, data_mirror, tokenizer, line_docs, objective):
    lines = _ptb_lines(data_mirror, 400)
    plain, windows = tmp_path / "lf" / "c.txt", tmp_path / "crlf" / "c.txt"
    plain.parent.mkdir()
    windows.parent.mkdir()
    plain.write_bytes(("\n".join(lines) + "\n").encode())
    windows.write_bytes(b"\xef\xbb\xbf" + ("\r\n".join(lines) + "\r\n").encode())
    tok_a, tables_a = _unit_tables(plain, tokenizer, line_docs, objective)
    tok_b, tables_b = _unit_tables(windows, tokenizer, line_docs, objective)
    vocab_a = [tok_a.id_to_token(i) for i in range(tok_a.vocab_size)]
    vocab_b = [tok_b.id_to_token(i) for i in range(tok_b.vocab_size)]
    assert vocab_a == vocab_b
    assert not any("\ufeff" in t or "\r" in t for t in vocab_b)
    assert [t.to_pylist() for t in tables_a] == [t.to_pylist() for t in tables_b]


def test_jsonl_with_a_byte_order_mark(tmp_path):
    from nlm.cluster.prepare.sources import Skips, find_sources, plan_units, read_documents

    path = tmp_path / "c.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one\\r\\ntwo"}\r\n{"text": "three"}\r\n')
    (unit,) = plan_units(
        find_sources([str(path)]), line_docs=False, unit_bytes=1 << 20, max_doc_bytes=1 << 20,
        text_column="text", skips=Skips(False),
    )  # fmt: skip
    docs = list(
        read_documents(unit, line_docs=False, text_column="text", max_doc_bytes=1 << 20,
                       skips=Skips(False))
    )  # fmt: skip
    assert docs == [("one\ntwo", b"one\ntwo"), ("three", b"three")]


def test_train_tokenizer_ignores_bom_and_crlf():
    from nlm.tokenizers import train_tokenizer

    a = train_tokenizer("word", ["for the cat\nsat"])
    b = train_tokenizer("word", ["\ufefffor the cat\r\nsat"])
    assert [a.id_to_token(i) for i in range(a.vocab_size)] == [
        b.id_to_token(i) for i in range(b.vocab_size)
    ]
    c = train_tokenizer("char", ["\ufeffab\r\n"])
    assert "\r" not in [c.id_to_token(i) for i in range(c.vocab_size)]


def _val_only_line() -> str:
    """A one-line document whose content hash puts it in validation at the default 0.05."""
    from nlm.cluster.prepare.sources import is_val

    for n in range(2, 10_000):
        line = f"the cat sat on the mat {n}\n"  # the whole file is the document
        if is_val(line.encode(), 0.05):
            return line
    raise AssertionError("no line hashes into validation")


@pytest.mark.parametrize("tokenizer", ["word", "char", "spm-bpe"])
def test_one_document_in_validation_names_val_fraction(tmp_path, tokenizer):
    corpus = tmp_path / "one.txt"
    corpus.write_text(_val_only_line(), encoding="utf-8")
    out = tmp_path / "shards"
    result = nlm_cli("prepare", "--input", str(corpus), "--output", str(out),
                     "--tokenizer", tokenizer, "--no-progress")  # fmt: skip
    assert_one_line_error(result, "--val-fraction", "validation")
    assert not out.exists()


def test_every_accepted_document_trains_a_tokenizer(tmp_path):
    """Documents of special tokens only are accepted as text but give a trainer nothing."""
    from nlm.cluster.prepare.pipeline import PrepareConfig, check_training_text, train_on_sample
    from nlm.cluster.prepare.sources import Skips, find_sources, plan_units
    from nlm.errors import NLMError

    corpus = tmp_path / "c.txt"
    corpus.write_text("<unk> <unk>\n", encoding="utf-8")
    for kind in ("word", "char", "spm-bpe"):
        cfg = PrepareConfig(input=[str(corpus)], output="x", tokenizer=kind, val_fraction=0.0)
        units = plan_units(
            find_sources(cfg.input), line_docs=False, unit_bytes=1 << 20,
            max_doc_bytes=1 << 20, text_column="text", skips=Skips(False),
        )  # fmt: skip
        with pytest.raises(NLMError, match="special tokens"):
            check_training_text(cfg, units)
    # ...and a normal one-line document in the training split trains every kind.
    corpus.write_text("the cat sat on the mat 2\n", encoding="utf-8")
    for kind in ("word", "char", "spm-bpe", "spm-unigram"):
        cfg = PrepareConfig(input=[str(corpus)], output="x", tokenizer=kind, val_fraction=0.0)
        units = plan_units(
            find_sources(cfg.input), line_docs=False, unit_bytes=1 << 20,
            max_doc_bytes=1 << 20, text_column="text", skips=Skips(False),
        )  # fmt: skip
        check_training_text(cfg, units)
        assert train_on_sample(cfg, units).encode("the cat")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf\r\n"])
def test_empty_corpus_with_tokenizer_from(tmp_path, content):
    from nlm.tokenizers import train_tokenizer

    tok_dir = tmp_path / "tok"
    train_tokenizer("word", ["the cat sat on the mat"]).save(tok_dir)
    corpus = tmp_path / "empty.txt"
    corpus.write_bytes(content)
    out = tmp_path / "shards"
    result = nlm_cli("prepare", "--input", str(corpus), "--output", str(out),
                     "--tokenizer-from", str(tok_dir), "--no-progress")  # fmt: skip
    assert_one_line_error(result, str(corpus), "no text")
    assert not out.exists()


# --- 15. one atomic-write helper ---------------------------------------------------------------


def _tiny_checkpoint(path: Path, metrics: dict) -> Path:
    from nlm.checkpoint import save_checkpoint
    from nlm.models import build_model
    from nlm.tokenizers import train_tokenizer

    tok = train_tokenizer("word", ["the cat sat on the mat"])
    model = build_model("gpt", "tiny", vocab_size=tok.vocab_size)
    return save_checkpoint(path, model, tok, metrics=metrics)


def test_write_helpers_are_atomic(tmp_path):
    from nlm.files import atomic_open, write_json, write_text

    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write('{"v": 2, "half')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temp file left
    write_text(target, "x")
    assert target.read_text() == "x" and oct(target.stat().st_mode & 0o777) != "0o600"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_export_swaps_the_model_in_by_renames(tmp_path):
    """A crash between the two renames leaves the old model at its hidden name, and loading the
    run still finds a complete model (the old code deleted model/ first: nothing was left)."""
    import os as _os

    from nlm.checkpoint import load_checkpoint

    run = tmp_path / "run"
    _tiny_checkpoint(run / "model", {"which": "old"})
    _tiny_checkpoint(run / "model", {"which": "new"})
    assert load_checkpoint(run).metrics["which"] == "new"
    assert sorted(p.name for p in run.iterdir()) == ["model"]
    assert (run / "model").stat().st_mode & 0o777 == 0o777 & ~_umask()  # as mkdir makes it
    # The state a crash between the renames leaves: old set aside, new not yet renamed in.
    _os.rename(run / "model", run / ".model.old-deadbeef")
    assert load_checkpoint(run).metrics["which"] == "new"


_RECORD = """
import sys
from nlm.checkpoint import record_metrics
for i in range(40):
    record_metrics(sys.argv[1], {f"{sys.argv[2]}{i}": i})
"""


def test_eval_record_from_two_processes_keeps_both(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "model", {"steps": 1})
    procs = [
        subprocess.Popen([sys.executable, "-c", _RECORD, str(ckpt), name], stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert {f"{n}{i}" for n in "ab" for i in range(40)} <= set(metrics)
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]


def test_no_hand_written_temp_then_rename_is_left():
    """Every local write-to-temp-then-rename goes through nlm.files (pyarrow file systems, in
    nlm/shards.py, use fs.move with unique names)."""
    offenders = []
    for root in ("nlm", "cluster", "serve", "jobs", "scripts"):
        for path in (REPO / root).rglob("*.py"):
            if path.name == "files.py" and path.parent.name == "nlm":
                continue
            text = path.read_text(encoding="utf-8")
            for needle in (".rename(", "os.replace(", ".replace(path)", '.tmp"', ".tmp'"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    allowed = {
        "nlm/corpora.py: os.replace(",  # a verified download moved into the cache
        'nlm/shards.py: .tmp"',  # pyarrow file systems: unique temp names, fs.move
        'nlm/workflows/foundation_demo.py: .tmp"',  # an old run's leftover name, to clear it
    }
    assert set(offenders) <= allowed, offenders


# --- 16. metrics.jsonl after a kill and a resume --------------------------------------------------


def _steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if "event" not in r]


def test_metrics_log_after_kill_and_resume(tmp_path):
    from nlm.cluster.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    log.write({"event": "start", "step": 0, "resumed_from_step": None})
    for step in range(1, 11):
        log.write({"step": step, "loss": 10.0 - step})
    log.close()
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 11, "lo')  # the kill: half a line, no newline
    # The restart resumes from the checkpoint at step 6 and trains 7.. again.
    log = MetricsLog(tmp_path)
    log.write({"event": "start", "step": 6, "resumed_from_step": 6})
    for step in range(7, 13):
        log.write({"step": step, "loss": 100.0 + step})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # every line whole: nothing glued
    by_attempt = {a: _steps([r for r in parsed if r["attempt"] == a]) for a in (1, 2)}
    assert by_attempt == {1: list(range(1, 11)), 2: list(range(7, 13))}  # marked by attempt
    records = read_metrics(tmp_path)
    assert _steps(records) == list(range(1, 13))  # each step once...
    assert [r["loss"] for r in records if r.get("step") == 8 and "loss" in r] == [108.0]  # newest
    assert [r["resumed_from_step"] for r in records if r.get("event") == "start"] == [None, 6]
    assert _steps(read_metrics(tmp_path, every_attempt=True)) == by_attempt[1] + by_attempt[2]


def test_a_cut_line_does_not_swallow_the_next_record(tmp_path):
    from nlm.cluster.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 2, "loss": 0.')
    log.write({"step": 2, "loss": 0.5})
    log.close()
    assert _steps(read_metrics(tmp_path)) == [1, 2]


def test_read_metrics_of_an_old_log_with_replayed_steps(tmp_path):
    """A log written by the old append-only writer: duplicates and a glued line."""
    from nlm.cluster.train.metrics import read_metrics

    rows = [{"event": "start", "step": 0, "resumed_from_step": None}]
    rows += [{"step": s, "loss": float(s)} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    text += '{"step": 6, "lo' + json.dumps({"event": "start", "step": 3, "resumed_from_step": 3})
    text += "\n" + "".join(json.dumps({"step": s, "loss": -s}) + "\n" for s in range(4, 8))
    (tmp_path / "metrics.jsonl").write_text(text)
    records = read_metrics(tmp_path)
    assert _steps(records) == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in records if "loss" in r][3:] == [-4, -5, -6, -7]


# --- 14. resume with a different run ----------------------------------------------------------


@pytest.fixture(scope="module")
def clm_shards(tmp_path_factory, data_mirror) -> Path:
    from train_shards import corpus_lines, write_shards

    return write_shards(tmp_path_factory.mktemp("h14") / "clm", corpus_lines(data_mirror, 300),
                        seq_len=16)  # fmt: skip


def _recorded_run(shards: Path, run: Path) -> dict[str, bytes]:
    """A 2-layer gpt run as the driver records it (config.yaml, plan.json, metrics.jsonl) with
    one checkpoint's meta.json as the training loop writes it; returns every file's bytes."""
    from nlm.cluster.train.config import TrainConfig
    from nlm.cluster.train.plan import CHECKPOINT_META, CHECKPOINTS, plan_run
    from nlm.files import write_json

    config = TrainConfig.from_dict({"data": str(shards), "model": "gpt", "preset": "tiny",
                                    "out": str(run), "workers": 2,
                                    "model_overrides": {"n_layer": 2}, "max_steps": 20})  # fmt: skip
    plan = plan_run(config.check())
    run.mkdir()
    plan.train.save_yaml(run / "config.yaml")
    write_json(run / "plan.json", plan.to_dict())
    (run / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n{"step": 10}\n')
    step = run / CHECKPOINTS / "step_00000010"
    step.mkdir(parents=True)
    write_json(step / CHECKPOINT_META, {"step": 10, "epoch": 0, "tokens": 0, "model": "gpt",
                                        "preset": "tiny", "workers": 2, "zero_stage": 1})  # fmt: skip
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "flags,field",
    [
        (["--set", "n_layer=3"], "n_layer"),
        (["--set", "dropout=0.3"], "dropout"),
        (["--micro-batch", "4"], "micro_batch"),
        (["--lr", "0.5"], "lr"),
    ],
)
def test_resume_with_another_run_config_is_refused_up_front(tmp_path, clm_shards, flags, field):
    run = tmp_path / "run"
    before = _recorded_run(clm_shards, run)
    result = nlm_cli("train", "--model", "gpt", *flags, "--resume", "--out", str(run),
                     "--no-progress", timeout=120)  # fmt: skip
    assert_one_line_error(result, f"'{field}'" if field != "n_layer" else "n_layer")
    after = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before  # the run directory is untouched


def test_resume_may_extend_max_steps(tmp_path, clm_shards):
    from nlm.cluster.train.config import TrainConfig
    from nlm.cluster.train.plan import plan_run

    run = tmp_path / "run"
    _recorded_run(clm_shards, run)
    config = TrainConfig.load_yaml(run / "config.yaml").replace(resume=True, max_steps=40)
    plan = plan_run(config.check())
    assert plan.resume_from["step"] == 10 and plan.train.max_steps == 40


# --- 1. the embedded local Ray: loopback, a per-run token, no survivors ------------------------


def _is_loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(pid: int) -> list[tuple[str, str, int]]:
    """(process name, ip, port) of every listening TCP socket of a process and its descendants."""
    import psutil

    found = []
    for proc in _tree(pid):
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return found


def _probe_without_token(sockets, gcs: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env["RAY_AUTH_MODE"] = "disabled"  # a client that has no token
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    # A driver without the token, started first and run while the sockets are probed: Ray
    # retries the refused handshake, so bound the wait; it must not get as far as a task.
    join = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys; ray.init(address=sys.argv[1]); "
         "print('TASK', ray.get(ray.remote(lambda: 1).remote()))", gcs],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    started = time.monotonic()
    cmd = [sys.executable, str(REPO / "tests" / "ray_probe.py")]
    payload = json.dumps([[ip, port] for _, ip, port in sockets])
    done = subprocess.run(cmd, input=payload, capture_output=True, text=True, env=env,
                          timeout=240, cwd=REPO)  # fmt: skip
    if done.returncode != 0:
        os.killpg(join.pid, signal.SIGKILL)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    results["ray.init"] = _join_outcome(join, started + 30)
    return results


def _join_outcome(join: subprocess.Popen, deadline: float) -> dict:
    """Whether the tokenless driver ran its task by `deadline` (30 s after it started: a driver
    that may join does so in a few seconds; a refused one retries, or waits, forever)."""
    try:
        out, _ = join.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return {"joined": "TASK 1" in out, "error": out[-300:]}
    except subprocess.TimeoutExpired:
        os.killpg(join.pid, signal.SIGKILL)
        out, _ = join.communicate()
        return {"joined": False, "error": f"no task within 30 s: {out[-300:]}"}


NOT_GRPC = {"DEADLINE_EXCEEDED", "UNAVAILABLE"}  # no gRPC call answered at all


def _assert_unusable_without_token(sockets, results: dict, open_ok: set[int]) -> None:
    """Every Ray gRPC server says UNAUTHENTICATED, every HTTP server 401/403, except read-only
    Prometheus text on loopback and the ports in open_ok. A socket off loopback (Ray 2.60
    binds each Serve replica's inter-deployment gRPC server to [::]:0, hard-coded) is probed
    from the network side and must refuse the tokenless client."""
    assert sockets
    exposed = {(ip, port) for _, ip, port in sockets if not _is_loopback(ip)}
    for name, ip, port in sockets:
        answer = results[f"{ip} {port}"]
        if (ip, port) in exposed:
            assert answer["kind"] == "grpc" and "UNAUTHENTICATED" in answer["codes"], (
                f"{name} listens on {ip}:{port} and does not refuse a client without the token",
                answer,
            )
            continue
        if port in open_ok:
            continue
        if answer["kind"] == "http":
            prometheus = answer["status"] == 200 and answer["body"].startswith("# HELP")
            assert answer["status"] in (401, 403) or prometheus, (name, ip, port, answer)
        elif name == "ray::RayTrainWorker" and set(answer["codes"]) <= NOT_GRPC:
            # torch.distributed's own listeners in a Train worker (the TCPStore rendezvous,
            # gloo's pair listener): not gRPC services, without authentication by torch's
            # design, and here on loopback (nlm's embedded Ray runs on 127.0.0.1); a socket
            # off loopback was checked above. gloo's answers a probe by waiting for its
            # handshake (DEADLINE_EXCEEDED), the store by closing (UNAVAILABLE).
            continue
        else:
            assert "OK" not in answer["codes"], (name, ip, port, answer)
            assert "UNAUTHENTICATED" in answer["codes"] or set(answer["codes"]) == {
                "UNAVAILABLE"
            }, (name, ip, port, answer)
    assert results["ray.init"]["joined"] is False, results["ray.init"]


def _gcs_address(sockets) -> str:
    (port,) = {port for name, _, port in sockets if name == "gcs_server"}
    return f"127.0.0.1:{port}"


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return env


def test_train_listens_on_loopback_with_a_token_and_dies_with_its_driver(tmp_path, clm_shards):
    import psutil

    run = tmp_path / "run"
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nlm", "train", "--data", str(clm_shards), "--model", "gpt",
         "--preset", "tiny", "--workers", "1", "--micro-batch", "2", "--max-steps", "100000",
         "--eval-every", "100000", "--log-every", "1", "--out", str(run), "--no-progress"],
        stdout=log, stderr=subprocess.STDOUT, env=_cli_env(), cwd=REPO, start_new_session=True,
    )  # fmt: skip
    try:
        # plan.json is written once Ray is up and has placed the workers; Train starts next.
        assert _wait(lambda: (run / "plan.json").is_file() or proc.poll() is not None, 300)
        assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
        time.sleep(10)  # the Train controller and worker start, agents finish binding
        sockets = _listening(proc.pid)
        processes = [(p.pid, p.create_time()) for p in _tree(proc.pid)[1:]]
        results = _probe_without_token(sockets, _gcs_address(sockets))
        _assert_unusable_without_token(sockets, results, open_ok=set())
        # A killed driver takes the whole instance with it (agents included).
        proc.kill()
        proc.wait(timeout=30)

        def gone() -> bool:
            alive = []
            for pid, started in processes:
                try:
                    if psutil.Process(pid).create_time() == started:
                        alive.append(pid)
                except psutil.NoSuchProcess:
                    continue
            return not alive

        assert _wait(gone, 60), [p for p in processes if psutil.pid_exists(p[0])]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        log.close()


API_TOKEN = SERVE_TOKEN


@pytest.fixture(scope="module")
def one_server(served):
    """The session's `nlm serve` (tests/conftest.py): tiny checkpoints, NLM_API_TOKEN, 127.0.0.1."""
    main = served.main
    port = int(main.url.rsplit(":", 1)[1])
    return {"proc": main.proc, "port": port, "url": main.url, "log": main.log}


def test_serve_listens_on_loopback_with_a_token(one_server):
    time.sleep(3)
    sockets = _listening(one_server["proc"].pid)
    port = one_server["port"]
    assert ("127.0.0.1", port) in {(ip, p) for _, ip, p in sockets}
    results = _probe_without_token(sockets, _gcs_address(sockets))
    _assert_unusable_without_token(sockets, results, open_ok={port})
    text = one_server["log"].read_text()
    assert "Prometheus metrics at http://127.0.0.1:" in text or "Prometheus" not in text


# --- 2. browsers cannot drive the API ------------------------------------------------------------


def _client(server, **headers):
    import httpx

    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    return httpx.Client(base_url=server["url"], headers={**auth, **headers}, timeout=120)


def test_post_bodies_must_be_json(one_server):
    body = json.dumps({"model": "gpt", "text": "the cat"}).encode()
    with _client(one_server) as client:
        assert client.post("/v1/score", json={"model": "gpt", "text": "the cat"}).status_code == 200
        for ctype in ("application/x-www-form-urlencoded", "text/plain", "multipart/form-data",
                      None):  # fmt: skip
            headers = {"content-type": ctype} if ctype else {}
            response = client.post("/v1/score", content=body, headers=headers)
            assert response.status_code == 415, (ctype, response.text)
            assert response.json()["error"]["code"] == "unsupported_media_type"
        charset = client.post(
            "/v1/score", content=body, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert charset.status_code == 200, charset.text


def test_host_header_must_name_the_server(one_server):
    port = one_server["port"]
    with _client(one_server) as client:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
        for host in (f"attacker.example:{port}", "rebind.attacker.example", f"192.0.2.7:{port}"):
            response = client.get("/v1/models", headers={"host": host})
            assert response.status_code == 400, (host, response.text)
            assert response.json()["error"]["code"] == "invalid_host", response.text
            assert client.get("/healthz", headers={"host": host}).status_code == 400


def test_default_allowed_hosts():
    from nlm.serve.app import default_allowed_hosts

    assert set(default_allowed_hosts("127.0.0.1")) == {"127.0.0.1", "localhost", "::1"}
    assert default_allowed_hosts("10.1.2.3") == ["10.1.2.3"]
    assert socket.gethostname() in default_allowed_hosts("0.0.0.0")


# --- 3. the API token is never a pickled argument ---------------------------------------------------


def test_api_token_is_not_pickled_into_deployment_arguments(tmp_path, monkeypatch):
    from ray import cloudpickle

    from nlm.serve.app import build_app

    ckpt = _tiny_checkpoint(tmp_path / "gpt", {"steps": 1})
    monkeypatch.setenv("NLM_API_TOKEN", API_TOKEN)
    app = build_app({"checkpoints": [f"gpt={ckpt}"]})
    gateway = app._bound_deployment
    pickled = cloudpickle.dumps((gateway.init_args, gateway.init_kwargs))
    assert API_TOKEN.encode() not in pickled
    assert gateway.ray_actor_options["runtime_env"]["env_vars"]["NLM_API_TOKEN"] == API_TOKEN
    assert gateway.init_args[3] is True  # token_required: the replica fails closed without it


def test_api_token_guards_every_v1_endpoint(one_server):
    import httpx

    with httpx.Client(base_url=one_server["url"], timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/openapi.json").status_code == 200
        paths = [p for p in anonymous.get("/openapi.json").json()["paths"] if p.startswith("/v1/")]
        assert paths
        for path in paths:
            response = (
                anonymous.post(path, json={}) if path != "/v1/models" else anonymous.get(path)
            )
            assert response.status_code == 401, (path, response.text)


# --- 4. resume refuses checkpoint files the run did not write ------------------------------------


def test_resume_refuses_changed_or_planted_checkpoint_files(tmp_path):
    from nlm.cluster.train.checkpoint_digests import record_digests, verify_digests
    from nlm.errors import NLMError

    run, ckpt = tmp_path / "run", tmp_path / "storage" / "step_00000010"
    run.mkdir()
    staging = [tmp_path / "rank0", tmp_path / "rank1"]  # each rank's own staging directory
    for rank, directory in enumerate(staging):
        directory.mkdir()
        torch.save({"w": torch.ones(3) * rank}, directory / f"rank_{rank:05d}.pt")
        (directory / "t").mkdir()
        torch.save({"opt": rank}, directory / "t" / f"zero_pp_rank_{rank}_optim_states.pt")
        record_digests(run, 10, directory)
    # What Ray Train's storage holds after both uploads, plus meta.json (rank 0).
    import shutil

    for directory in staging:
        shutil.copytree(directory, ckpt, dirs_exist_ok=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 10}))
    verify_digests(run, ckpt)  # as written: accepted

    planted = ckpt / "t" / "mp_rank_00_model_states.pt"
    planted.write_bytes(b"\x80\x04cposix\nsystem\n.")  # a pickle that would run code
    with pytest.raises(NLMError, match="not written by this run"):
        verify_digests(run, ckpt)
    planted.unlink()
    torch.save({"opt": 99}, ckpt / "t" / "zero_pp_rank_1_optim_states.pt")
    with pytest.raises(NLMError, match="digest mismatch"):
        verify_digests(run, ckpt)
    (ckpt / "meta.json").write_text(json.dumps({"step": 20}))
    with pytest.raises(NLMError, match="no digests recorded"):
        verify_digests(run, ckpt)


def test_the_training_loop_checks_digests_before_deepspeed_loads():
    """The check sits in the loop's restore, before engine.load_checkpoint (the unpickling)."""
    source = (REPO / "cluster" / "train" / "loop.py").read_text()
    restore = source[source.index("def restore(") :]
    assert restore.index("verify_digests(") < restore.index("self.engine.load_checkpoint(")
    checkpoint = source[source.index("def checkpoint(") :]
    assert checkpoint.index("record_digests(") < checkpoint.index("barrier(self.device)")
