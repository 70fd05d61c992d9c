"""The shipped cluster files validate against Ray's own schema, keep the dashboard on the head's
loopback, and carry the labels the jobs use; the embedded default (nlm.cluster.launch) joins,
starts or refuses Ray as documented."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from nlm.cluster.launch import check_resources, ensure_ray
from nlm.errors import NLMError

from ray_nodes import fake_autoscaling_config, free_ports

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster.yaml"
ONPREM = REPO / "cluster" / "onprem.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def validated(path: Path) -> dict:
    """What `ray up` does before touching a cloud: fill in defaults, then Ray's schema."""
    config = prepare_config(load(path))
    validate_config(config)
    return config


def start_commands(config: dict) -> str:
    return "\n".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=["cloud", "onprem"])
def test_cluster_files_validate_against_rays_schema(path):
    config = validated(path)
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=["cloud", "onprem"])
def test_a_misspelt_key_is_rejected_by_the_same_check(path):
    config = load(path)
    config["idle_timout_minutes"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timout_minutes"):
        validate_config(prepare_config(config))


def test_cloud_cluster_node_types_and_labels():
    config = validated(CLUSTER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head runs no tasks"
    by_label = {
        label: [name for name, t in types.items() if label in t["resources"]]
        for label in ("data", "trainer")
    }
    assert len(by_label["data"]) == 1 and len(by_label["trainer"]) == 1
    data, trainer = types[by_label["data"][0]], types[by_label["trainer"][0]]
    for node_type in (data, trainer):
        assert node_type["min_workers"] == 0 < node_type["max_workers"]
    assert trainer["node_config"]["InstanceType"].startswith(("g", "p")), "a GPU instance"
    assert not data["node_config"]["InstanceType"].startswith(("g", "p"))
    assert 0 < config["idle_timeout_minutes"] <= 30


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=["cloud", "onprem"])
def test_dashboard_stays_on_the_head_and_auth_is_explicit(path):
    config = validated(path)
    head = "\n".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in start_commands(config)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in commands[-1]
    assert "~/.ray/auth_token" in config["file_mounts"], "every node gets the shared token"


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=["cloud", "onprem"])
def test_setup_installs_a_pinned_revision(path):
    config = validated(path)
    setup = "\n".join(load(path)["setup_commands"])
    assert "git clone" in setup and 'git checkout --quiet --detach "$NLM_REVISION"' in setup
    assert "NLM_REVISION=" in setup
    assert "make .venv/bin/nlm" in setup
    # The venv's bin is on PATH for `ray start`: job entrypoints run the `python` found there.
    assert "nlm/.venv/bin:$PATH" in start_commands(config)


@pytest.mark.parametrize("path", [CLUSTER, ONPREM], ids=["cloud", "onprem"])
def test_every_shell_command_parses(path):
    config = load(path)
    keys = [k for k in config if k.endswith("_commands")]
    for key in keys:
        for command in config[key]:
            check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
            assert check.returncode == 0, f"{path.name} {key}: {command!r}: {check.stderr}"


def test_onprem_lists_fixed_machines_and_labels_them_by_hardware():
    config = validated(ONPREM)
    raw = load(ONPREM)
    assert config["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and len(raw["provider"]["worker_ips"]) >= 1
    (node_type,) = config["available_node_types"].values()
    assert (
        node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])
    )
    worker = "\n".join(config["worker_start_ray_commands"])
    assert '\\"trainer\\"' in worker and '\\"data\\"' in worker


def test_fake_autoscaling_config_is_derived_from_cluster_yaml():
    config = fake_autoscaling_config(CLUSTER, "127.0.0.1:6379")
    validate_config(copy.deepcopy(config))
    worker = {k: v for k, v in config["available_node_types"].items() if k != "ray.head.default"}
    ((name, node_type),) = worker.items()
    assert name in load(CLUSTER)["available_node_types"]
    assert node_type["resources"]["trainer"] == 1
    assert node_type["min_workers"] == 0 and node_type["max_workers"] == 2


# --- the embedded default -------------------------------------------------------------------


def run_ensure_ray(address: str) -> subprocess.CompletedProcess:
    """ensure_ray() in a fresh process (this one may already have Ray initialised)."""
    code = (
        "import sys\n"
        "from nlm.cluster.launch import ensure_ray\n"
        "from nlm.errors import NLMError\n"
        "try:\n    ensure_ray()\n"
        "except NLMError as e:\n    print(f'nlm: error: {e}', file=sys.stderr); sys.exit(2)\n"
    )
    env = dict(os.environ, RAY_ADDRESS=address)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


def test_ray_address_nobody_answers_fails_at_once_with_one_line():
    (port,) = free_ports(1)
    result = run_ensure_ray(f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"cannot join the Ray cluster at RAY_ADDRESS=127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_job_server_url_as_ray_address_is_explained():
    result = run_ensure_ray("http://127.0.0.1:8265")
    assert result.returncode == 2
    assert "job server's HTTP address" in result.stderr and "ray job submit" in result.stderr


def test_ensure_ray_keeps_an_existing_instance(ray_local):
    assert ensure_ray() == "existing"


def test_check_resources_passes_when_the_cluster_has_room(ray_local):
    check_resources([{"CPU": 0.5}] * 2, timeout_s=30, what="two small workers")


def test_check_resources_fails_clearly_instead_of_hanging(ray_local):
    with pytest.raises(NLMError) as info:
        check_resources([{"CPU": 1, "trainer": 1}] * 3, timeout_s=2, what="3 training workers")
    message = str(info.value)
    assert "cannot place 3 training workers within 2 s" in message
    assert "3 x {CPU: 1, trainer: 1}" in message and "trainer: 3" in message
    # The probe's placement group is gone again: nothing stays reserved.
    assert ray_local.available_resources().get("CPU") == ray_local.cluster_resources()["CPU"]


# --- jobs/: one YAML config -> an `nlm` command ----------------------------------------------

sys.path.insert(0, str(REPO / "jobs"))
from config_args import config_argv  # noqa: E402


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_keys_become_the_subcommands_flags(tmp_path):
    config = write(
        tmp_path / "deploy.yaml",
        "checkpoints: [gpt=runs/gpt, runs/lstm]\nport: 8123\nmax_batch_size: 16\n"
        "no_batching: false\naccess-log: true\n",
    )
    argv = config_argv("serve", str(config))
    assert argv == [
        "gpt=runs/gpt", "runs/lstm", "--port", "8123", "--max-batch-size", "16", "--access-log",
    ]  # fmt: skip


def test_an_unknown_key_names_file_line_and_field(tmp_path):
    config = write(tmp_path / "eval.yaml", "checkpoint: runs/x\nbatch_sise: 4\n")
    with pytest.raises(NLMError, match=r"eval\.yaml:2 \(field 'batch_sise'\): not an option"):
        config_argv("eval", str(config))


def test_broken_yaml_is_one_line_with_its_line_number(tmp_path):
    config = write(tmp_path / "eval.yaml", "checkpoint: runs/x\ninput: [unclosed\n")
    with pytest.raises(NLMError, match=r"eval\.yaml:\d+: invalid YAML"):
        config_argv("eval", str(config))


@pytest.fixture(scope="module")
def lstm_checkpoint(tmp_path_factory, data_mirror):
    import torch

    from nlm.checkpoint import save_checkpoint
    from nlm.models import build_model
    from nlm.tokenizers import train_tokenizer

    lines = (data_mirror / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer("word", lines[:300], vocab_size=500)
    torch.manual_seed(0)
    model = build_model("lstm", "tiny", vocab_size=tokenizer.vocab_size).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "lstm", model, tokenizer)


def test_evaluate_job_scores_a_checkpoint_from_its_config(lstm_checkpoint, data_mirror, tmp_path):
    text = tmp_path / "test.txt"
    text.write_text(
        "\n".join((data_mirror / "wikitext-2" / "test.txt").read_text().splitlines()[:40])
    )
    config = write(
        tmp_path / "evaluate.yaml",
        f"checkpoint: {lstm_checkpoint}\ninput: {text}\nbatch_size: 4\nno_progress: true\n",
    )
    result = subprocess.run(
        [sys.executable, "jobs/evaluate.py", str(config), "--seq-len", "32"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["input"] == str(text) and scores["ppl"] > 1


def test_evaluate_job_with_a_bad_config_exits_2_with_one_line(tmp_path):
    config = write(tmp_path / "evaluate.yaml", "checkpoint: /nonexistent\nsteps: 3\n")
    result = subprocess.run(
        [sys.executable, "jobs/evaluate.py", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"nlm: error: {config}:2 (field 'steps'): not an option of `nlm eval`")
    assert "Traceback" not in result.stderr


def test_cluster_job_configs_load_with_their_commands_own_loaders():
    """configs/cluster-*.yaml are what the docs submit: each must load as its command would."""
    from ray.serve.schema import ServeDeploySchema

    from nlm.cluster.prepare.pipeline import PrepareConfig
    from nlm.cluster.train.config import TrainConfig
    from nlm.serve.app import AppArgs

    configs = REPO / "configs"
    prepare = PrepareConfig.from_dict(load(configs / "cluster-prepare-wt2.yaml"))
    train = TrainConfig.from_dict(load(configs / "cluster-pretrain-gpt.yaml"))
    assert train.data == prepare.output and train.shared_fs and train.scale.device == "cuda"
    evaluate = config_argv("eval", str(configs / "cluster-evaluate-wt2.yaml"))
    assert evaluate[evaluate.index("--checkpoint") + 1] == train.out
    deploy = config_argv("serve", str(configs / "cluster-deploy.yaml"))
    assert deploy[0] == f"gpt={train.out}" and deploy[deploy.index("--host") + 1] == "127.0.0.1"
    serve = ServeDeploySchema.model_validate(load(configs / "cluster-serve.yaml"))
    assert serve.http_options.host == "127.0.0.1"
    AppArgs.from_dict(serve.applications[0].args)
