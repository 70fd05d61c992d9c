"""Real Ray nodes for the cluster tests: `ray start --block` processes we own and clean up.

Several helpers share this machine, so nothing here may touch a Ray instance it did not start:
every node gets its own --temp-dir and free ports, and teardown signals only the process group
of our own `ray start` (TERM, ~10 s grace, then KILL: TERM alone leaves gcs_server and the
autoscaler monitor behind), then any leftover process that names our temp dir. Never `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: ray, python
RAY = str(BIN / "ray")


def free_ports(n: int) -> list[int]:
    """n distinct ports nobody listens on right now (held open together, so no duplicates)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def node_env(**extra: str) -> dict[str, str]:
    """Environment for nodes and CLI calls: the venv first on PATH (job entrypoints run the
    `python` found there), token auth off (decided explicitly), no usage stats."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["DS_ACCELERATOR"] = "cpu"
    env.update(extra)
    return env


@dataclass
class Node:
    proc: subprocess.Popen
    pgid: int
    log: Path
    args: list[str]
    name: str
    restarts: int = 0


@dataclass
class LocalCluster:
    """A head node plus workers on this machine, each a `ray start --block` process group."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @classmethod
    def create(cls, **env: str) -> LocalCluster:
        # Short path: Ray's unix sockets live under it and must fit in 107 bytes.
        temp_dir = Path(tempfile.mkdtemp(prefix="nlmray-", dir="/tmp"))
        gcs, dash = free_ports(2)
        return cls(temp_dir, gcs, dash, node_env(**env))

    def _start(self, args: list[str], name: str) -> Node:
        log = self.temp_dir / f"{name}.log"
        ports = free_ports(7)
        cmd = [
            RAY, "start", "--block", "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--node-manager-port={ports[0]}",
            f"--object-manager-port={ports[1]}",
            f"--dashboard-agent-listen-port={ports[2]}",
            f"--dashboard-agent-grpc-port={ports[3]}",
            f"--runtime-env-agent-port={ports[4]}",
            f"--metrics-export-port={ports[5]}",
            "--object-store-memory=150000000",
            *args,
        ]  # fmt: skip
        with open(log, "wb") as out:
            # start_new_session: the node and everything it spawns share one process group.
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(proc, os.getpgid(proc.pid), log, args, name)
        self.nodes.append(node)
        return node

    def start_head(self, *args: str) -> None:
        client_port = free_ports(1)[0]
        self._start(
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                *args,
            ],
            "head",
        )

    def start_worker(self, *args: str) -> None:
        self._start([f"--address={self.gcs_address}", *args], f"worker{len(self.nodes)}")

    def ray(self, *args: str, timeout: float = 120, check: bool = False):
        """Run the real `ray` CLI against this cluster (from the repository root)."""
        return subprocess.run(
            [RAY, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )

    def nodes_alive(self) -> list[dict]:
        """`ray list nodes` as dicts (state, node_id, resources_total)."""
        out = self.ray(
            "list", "nodes", "--address", self.gcs_address, "--format", "json", "--limit", "100"
        )
        if out.returncode != 0 or not out.stdout.lstrip().startswith("["):
            return []  # not up yet ("No resource in the cluster", connection refused)
        return [n for n in json.loads(out.stdout) if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 90) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_running()
            nodes = self.nodes_alive()
            if len(nodes) >= count:
                return nodes
            time.sleep(1)
        raise TimeoutError(f"{count} nodes not up after {timeout} s; logs in {self.temp_dir}")

    def check_running(self) -> None:
        for i, node in enumerate(self.nodes):
            if node.proc.poll() is None:
                continue
            tail = node.log.read_text(errors="replace")[-3000:]
            # On a loaded 2-core machine a raylet can miss Ray's fixed 30 s registration
            # window ("timed out during startup"); the node gets another try (the head only
            # while it is alone: start workers after wait_for_nodes(1)).
            alone = len(self.nodes) == 1
            retry = not node.name.startswith("head") or alone
            if retry and "timed out during startup" in tail and node.restarts < 2:
                _signal_group(node.pgid, signal.SIGKILL)
                self.nodes.pop(i)
                again = self._start(node.args, f"{node.name}-retry{node.restarts + 1}")
                again.restarts = node.restarts + 1
                return
            raise RuntimeError(f"ray start exited ({node.proc.returncode}):\n{tail}")

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            _signal_group(node.pgid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_group_alive(n.pgid) for n in self.nodes):
            time.sleep(0.5)
        for node in self.nodes:
            _signal_group(node.pgid, signal.SIGKILL)
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # Fake autoscaled nodes run under the monitor; they name our GCS port, if not our dir.
        _kill_leftovers([str(self.temp_dir), f"gcs-address=127.0.0.1:{self.gcs_port}"])
        self.nodes.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) process left in the group."""
    out = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == str(pgid) and not fields[1].startswith("Z"):
            return True
    return False


def _kill_leftovers(markers: list[str]) -> None:
    """KILL processes (by pid) whose command line names our temp dir: a Ray process that left
    our process group still belongs to this cluster and to no one else."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        if any(m in args for m in markers) and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


def fake_autoscaling_config(cluster_yaml: Path, gcs_address: str) -> dict:
    """cluster.yaml's trainer node type, scaled down for Ray's fake multi-node provider.

    Same cluster name, same custom resource label, same node type name, so the jobs and
    configs that target the real cluster target this one; the head keeps CPU 0 (as in
    cluster.yaml) and the trainer type shrinks to 1 CPU, min 0, max 2, a 15 s idle timeout.
    The fake head type must be called "ray.head.default" (the provider hard-codes it).
    """
    import yaml

    real = yaml.safe_load(cluster_yaml.read_text())
    types = real["available_node_types"]
    trainer = next(name for name, t in types.items() if "trainer" in t.get("resources", {}))
    label = {k: v for k, v in types[trainer]["resources"].items() if k not in ("CPU", "GPU")}
    empty_lists = [
        "cluster_synced_files",
        "rsync_exclude",
        "rsync_filter",
        "initialization_commands",
        "setup_commands",
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ]
    return {
        "cluster_name": f"{real['cluster_name']}-fake",
        "max_workers": 2,
        "upscaling_speed": real.get("upscaling_speed", 1.0),
        "idle_timeout_minutes": 0.25,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {},
        "available_node_types": {
            "ray.head.default": {
                "resources": dict(types[real["head_node_type"]]["resources"]),
                "node_config": {},
                "max_workers": 0,
            },
            trainer: {
                "resources": {"CPU": 1, **label},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
        **{key: [] for key in empty_lists},
    }
