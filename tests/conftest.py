"""Shared fixtures. Ray is started once per test session (every ray.init costs seconds)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # decided explicitly: tests use no token auth
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Absolute: `ray job submit` runs its entrypoint in an unpacked copy of the working dir, where
# CI's relative "../shared/data" would point nowhere.
os.environ["NLM_DATA_MIRROR"] = str(
    Path(
        os.environ.get("NLM_DATA_MIRROR") or Path(__file__).resolve().parents[2] / "shared" / "data"
    ).resolve()
)


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    path = Path(os.environ["NLM_DATA_MIRROR"])
    assert path.is_dir(), f"NLM_DATA_MIRROR={path} is not a directory"
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session.

    4 logical CPUs on a 2-core machine on purpose: Train workers and Serve replicas take
    fractional CPUs and Ray Data still needs room to schedule its tasks (see the field notes).
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo group in the test process, as torchrun would set it up.

    One per session, never torn down between modules: DeepSpeed caches its groups in module
    globals (deepspeed.utils.groups), so a second init_process_group after a destroy leaves it
    holding the first world's group ("Group ... is not registered").
    """
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    # The trainer's own extension cache (cluster/train/loop.py): DeepSpeed JIT-builds its CPU
    # communication op on init_distributed, and the shared default cache may be locked.
    from nlm.corpora import cache_dir

    env["TORCH_EXTENSIONS_DIR"] = os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(cache_dir() / "torch_extensions")
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------- served applications
# One `nlm serve` for the session, started as a user starts it (its own local Ray, polled on
# /healthz, SIGTERMed at the end): test_openai, test_serve and test_hardening share its
# application; test_serve_abuse deploys a second application with tight bounds into the same
# Serve instance (`Served.deploy`), under its own route prefix. Starting Ray and the replicas is
# most of what these modules cost, so it happens once, and the tests that use it run last
# (`pytest_collection_modifyitems` below).

SERVE_TOKEN = "test-token-123"
SERVE_MAX_ITEMS = 16
SERVE_MAX_NEW_TOKENS = 4000  # test_openai's long generations (lstm: no position limit)
SERVE_START_TIMEOUT_S = 300  # a loaded 2-core machine starts Ray + the replicas slowly
# Served beside the five families of `tiny_checkpoints` (the endpoint-by-endpoint tests'): a
# bidirectional clm family and the encoder-decoder, checked against the library's Engine in
# test_serve.py::test_elmo_and_the_transformer_are_served.
SERVED_NEWER = ("elmo", "transformer")
REPO = Path(__file__).resolve().parents[1]

# Deploys one more application onto the running Ray of `Served` (argv: name, route prefix,
# `nlm serve` flags as JSON). The flags go through the CLI's own parser, so the application is
# exactly what `nlm serve <flags>` builds.
_DEPLOY = """
import argparse, json, os, sys
import ray
from ray import serve
from nlm.cli.serve import add_arguments, app_args, check_args
from nlm.serve.app import build_app
parser = argparse.ArgumentParser()
add_arguments(parser)
args = parser.parse_args(json.loads(sys.argv[3]))
check_args(args)
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
serve.run(build_app(app_args(args)), name=sys.argv[1], route_prefix=sys.argv[2])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc) -> None:
    """SIGTERM the process group (what a user's kill sends), then SIGKILL it if it lingers."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class Server:
    """A served application: base URL (its route prefix included), the `nlm serve` process
    and log it runs in, and its checkpoints by model name."""

    def __init__(self, url: str, proc, log: Path, paths: dict[str, Path]):
        self.url, self.proc, self.log, self.paths = url, proc, log, paths

    def client(self, token: str | None = SERVE_TOKEN, timeout: float = 120):
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_healthy(self, timeout_s: float = SERVE_START_TIMEOUT_S) -> None:
        """Poll GET /healthz until it answers 200; fail with the log's tail if the server exits
        or `timeout_s` passes."""
        import time

        import httpx

        deadline = time.monotonic() + timeout_s
        with self.client(timeout=5) as c:
            while True:
                assert self.proc.poll() is None, f"nlm serve exited early:\n{self.tail()}"
                assert time.monotonic() < deadline, f"no /healthz in {timeout_s} s:\n{self.tail()}"
                try:
                    if c.get("/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(1)


# What `nlm serve` says when Ray's own start-up gave up: Ray waits a fixed 30 s for its raylet
# to register (ray/_private/node.py), which a loaded machine can exceed. Setup, not the test.
RAY_START_FAILED = "could not start Ray: The current node timed out during startup"


def start_server(
    paths: dict[str, Path], flags: list[str], log: Path, env: dict, attempts: int = 3
) -> Server:
    """`nlm serve name=path... --port P flags` in the background, in its own process group
    (so `stop` takes its Ray with it), once /healthz answers. Stops it if it never does; starts
    it again (up to `attempts` times) only when Ray's start-up timed out (RAY_START_FAILED)."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_server(paths, flags, log, env)
        except AssertionError:
            if attempt == attempts or RAY_START_FAILED not in log.read_text(errors="replace"):
                raise
    raise AssertionError("unreachable")


def _start_server(paths: dict[str, Path], flags: list[str], log: Path, env: dict) -> Server:
    import subprocess
    import sys

    port = free_port()
    specs = [f"{name}={path}" for name, path in paths.items()]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nlm", "serve", *specs, "--port", str(port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, paths)
    try:
        server.wait_healthy()
    except BaseException:
        stop(proc)
        raise
    return server


class Served:
    """The session's `nlm serve` (`main`: every tiny checkpoint, `SERVE_TOKEN`) and the
    applications deployed next to it."""

    def __init__(self, main: Server, ray_env: dict[str, str], root: Path):
        self.main, self.ray_env, self.root = main, ray_env, root
        self.apps: dict[str, Server] = {}

    def deploy(self, name: str, paths: dict[str, Path], flags: list[str]) -> Server:
        """Run `nlm serve`'s application for these checkpoints and flags as one more
        application `name` at route prefix /name of the same Serve instance (once)."""
        import json
        import subprocess
        import sys

        if name not in self.apps:
            specs = [f"{n}={p}" for n, p in paths.items()]
            log = self.root / f"{name}.log"
            with log.open("w") as out:
                done = subprocess.run(
                    [sys.executable, "-c", _DEPLOY, name, f"/{name}", json.dumps(specs + flags)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.ray_env,
                    cwd=REPO,
                    timeout=SERVE_START_TIMEOUT_S,
                )
            assert done.returncode == 0, log.read_text(errors="replace")[-3000:]
            app = Server(f"{self.main.url}/{name}", self.main.proc, log, paths)
            app.wait_healthy()
            self.apps[name] = app
        return self.apps[name]

    def close(self) -> None:
        stop(self.main.proc)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, data_mirror) -> dict[str, Path]:
    """One untrained tiny checkpoint per family (test_inference.build_tiny_checkpoints), built
    once per session. Read-only: a test that changes one copies it first."""
    from test_inference import build_tiny_checkpoints

    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny-ckpt"), data_mirror)


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_checkpoints):
    """The session's `nlm serve` of every tiny checkpoint (see `Served`)."""
    import secrets

    import torch

    from nlm.checkpoint import load_checkpoint, save_checkpoint
    from nlm.models import build_model

    root = tmp_path_factory.mktemp("served")
    paths = dict(tiny_checkpoints)
    tokenizer = load_checkpoint(paths["gpt"]).tokenizer
    for i, family in enumerate(SERVED_NEWER):
        torch.manual_seed(10 + i)
        model = build_model(family, "tiny", vocab_size=256)
        paths[family] = save_checkpoint(root / "ckpt" / family, model, tokenizer)
    gcs_port = free_port()
    ray_token = secrets.token_hex(16)  # nlm.cluster.local_ray keeps a token it is given
    env = {**os.environ, "NLM_API_TOKEN": SERVE_TOKEN, "RAY_AUTH_TOKEN": ray_token}
    env["RAY_GCS_SERVER_PORT"] = str(gcs_port)  # where `Served.deploy` finds this Ray
    env.pop("RAY_ADDRESS", None)
    flags = ["--max-items", str(SERVE_MAX_ITEMS), "--max-new-tokens", str(SERVE_MAX_NEW_TOKENS)]
    flags += ["--batch-wait-ms", "20"]
    main = start_server(paths, flags, root / "serve.log", env)
    # `Served.deploy`'s driver joins with what nlm.cluster.local_ray gave the instance: its
    # token, loopback addresses. (The applications it deploys also see NLM_API_TOKEN: Ray's
    # workers inherit the environment of the `nlm serve` that started Ray.)
    ray_env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}", "RAY_AUTH_MODE": "token"}
    ray_env.update(RAY_AUTH_TOKEN=ray_token, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    served = Served(main, ray_env, root)
    try:
        yield served
    finally:
        served.close()


def pytest_collection_modifyitems(session, config, items) -> None:
    """The tests on the served applications run last, together (each module in its order):
    the server is started once, and its Ray never shares the cores with the Ray Train and
    Ray Data tests."""
    items.sort(key=lambda item: "served" in getattr(item, "fixturenames", ()))
