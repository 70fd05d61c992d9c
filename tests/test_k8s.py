"""The Kubernetes path (cluster/k8s/, Dockerfile): the manifests parse and name things that
exist in this repository, the RayService embeds serve/config.yaml (one source, generated), and
the image pins what pyproject.toml pins. No cluster is needed: what a manifest refers to is
checked against the repository and the schemas Ray ships."""

from __future__ import annotations

import re
import runpy
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "cluster" / "k8s"
IMAGE_ROOT = "/app"  # where the Dockerfile puts the repository


def manifests() -> dict[str, dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, path
        found[path.name] = docs[0]
    return found


def pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==([^,;\s]+)", requirement)
        if match:
            out[match[1].lower()] = match[2]
    return out


def in_repo(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT + "/"), path
    return REPO / path.removeprefix(IMAGE_ROOT + "/")


def test_every_manifest_parses_with_the_kinds_expected():
    found = manifests()
    kinds = {name: (m["apiVersion"], m["kind"]) for name, m in found.items()}
    assert kinds == {
        "raycluster.yaml": ("ray.io/v1", "RayCluster"),
        "rayjob-prepare.yaml": ("ray.io/v1", "RayJob"),
        "rayjob-pretrain.yaml": ("ray.io/v1", "RayJob"),
        "rayservice.yaml": ("ray.io/v1", "RayService"),
        "storage.yaml": ("v1", "PersistentVolumeClaim"),
    }
    for manifest in found.values():
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])


def test_cluster_has_gpu_workers_shared_storage_and_the_pinned_ray():
    found = manifests()
    spec = found["raycluster.yaml"]["spec"]
    assert spec["rayVersion"] == pins()["ray"]
    claim = found["storage.yaml"]["metadata"]["name"]
    assert "ReadWriteMany" in found["storage.yaml"]["spec"]["accessModes"]
    groups = {"head": spec["headGroupSpec"]} | {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    for name, group in groups.items():
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        # /mnt/nlm: the cluster configs' shards and runs; /srv/nlm: serve/config.yaml's checkpoints
        for path in ("/mnt/nlm", "/srv/nlm"):
            assert claims[mounts[path]] == claim, (name, path)
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits, name  # Guaranteed QoS
        if name == "gpu-trainer":
            assert int(limits["nvidia.com/gpu"]) >= 1
            assert group["rayStartParams"]["resources"] == '"{\\"trainer\\": 1}"'
        else:
            assert "nvidia.com/gpu" not in limits, name
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # The custom resources the cluster configs ask for exist on some group.
    offered = {yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"])).popitem()[0]
               for g in spec["workerGroupSpecs"]}  # fmt: skip
    for config in ("cluster-prepare-wt2.yaml", "cluster-pretrain-gpt.yaml"):
        wanted = yaml.safe_load((REPO / "configs" / config).read_text()).get("worker_resources", {})
        assert set(wanted) <= offered, config


@pytest.mark.parametrize(
    "manifest, job",
    [("rayjob-prepare.yaml", "prepare_corpus.py"), ("rayjob-pretrain.yaml", "pretrain.py")],
)
def test_jobs_run_the_jobs_entrypoints_with_configs_on_the_shared_volume(manifest, job):
    found = manifests()
    spec = found[manifest]["spec"]
    assert spec["clusterSelector"] == {
        "ray.io/cluster": found["raycluster.yaml"]["metadata"]["name"]
    }
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and words[2] == "--config" and len(words) == 4
    script, config = in_repo(words[1]), in_repo(words[3])
    assert script == REPO / "jobs" / job and script.is_file()
    assert config.is_file() and config.parent == REPO / "configs"
    settings = yaml.safe_load(config.read_text())
    for key in ("output", "data", "out"):
        if key in settings:
            assert settings[key].startswith("/mnt/nlm/"), (config, key)


def test_rayservice_is_generated_from_serve_config_and_the_cluster():
    render = runpy.run_path(str(K8S / "render.py"))
    assert (K8S / "rayservice.yaml").read_text() == render["render"](), (
        "cluster/k8s/rayservice.yaml is out of date: run python cluster/k8s/render.py"
    )
    found = manifests()
    spec = found["rayservice.yaml"]["spec"]
    assert spec["rayClusterConfig"] == found["raycluster.yaml"]["spec"]
    embedded = yaml.safe_load(spec["serveConfigV2"])
    shipped = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    assert embedded["http_options"]["host"] == "0.0.0.0"  # the one difference (render.py)
    embedded["http_options"]["host"] = shipped["http_options"]["host"]
    assert embedded == shipped
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    for path in config.applications[0].args["checkpoints"]:
        assert path.startswith("/srv/nlm/"), path  # on the shared volume


def test_image_is_the_official_ray_image_with_pyprojects_pins():
    dockerfile = (REPO / "Dockerfile").read_text()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu", base)
    assert match, base
    wanted = pins()
    assert match[1] == wanted["ray"]
    python = f"{match[2]}.{match[3]}"
    assert project["requires-python"] == f">={python},<{match[2]}.{int(match[3]) + 1}"
    pinned = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', dockerfile))
    assert pinned and all(wanted[name.lower()] == version for name, version in pinned.items())
    assert {"torch", "deepspeed"} <= set(pinned)
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), path
    # Every manifest runs this image (one tag to replace when pushing it).
    images = set(re.findall(r"image:\s*(\S+)", (K8S / "raycluster.yaml").read_text()))
    assert len(images) == 1
