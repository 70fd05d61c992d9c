"""The embedded local Ray instance, made unreachable from other machines and other users.

Importable without Ray: `secure_environment()` must run before anything imports `ray`, because
Ray reads its authentication mode once, at import time (setting it later fails with
"RAY_AUTH_MODE is currently 'disabled'"). `nlm.cli.main` calls it first thing, so every command
(`nlm prepare/train/finetune/serve/demo/bench/study`, and the jobs/ entrypoints, which call
that main) gets it.

What it sets, only when no cluster is named (RAY_ADDRESS unset) and Ray is not yet imported:

- `RAY_AUTH_MODE=token` and a fresh random `RAY_AUTH_TOKEN` (128 bits, `secrets`) per command:
  every gRPC server of the instance (GCS, raylet, object manager, core workers, agents) and the
  dashboard agent's HTTP API refuse a client without it. Ray hands it to the processes it
  starts; child processes nlm starts inherit it through the environment. A token already in
  the environment is kept (a parent passing its own down). Nothing is written to ~/.ray.
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`: Ray then takes 127.0.0.1 as the node's address (what
  it does on a laptop), and with it every server it starts binds to loopback: GCS, raylet,
  workers, agents and the Prometheus exporters. `_node_ip_address` and RAY_NODE_IP_ADDRESS do
  not do this in Ray 2.60 (the raylet still bound `*`). The token still matters on loopback:
  other users of the same machine can reach it.

`start_watchdog()` (called by `nlm.cluster.launch.ensure_ray` once it has started the
instance) ties the instance's lifetime to the command: a small process that notices the
driver's death (its stdin pipe closes when the driver exits, however it exits, SIGKILL
included) and then kills every process of the instance that is still running. Without it a
SIGKILLed driver left DashboardAgent and RuntimeEnvAgent running and holding ports.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from typing import Any

TOKEN_ENV = "RAY_AUTH_TOKEN"
MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def secure_environment(environ: Any = os.environ) -> bool:
    """Set token auth and loopback binding for a local instance (see the module docstring).

    Returns True when the environment is set for a secured local instance; False when a
    cluster is named (RAY_ADDRESS: joining it is unchanged) or Ray is already imported in
    this process (too late to choose the mode; `ensure_ray` then warns).
    """
    if environ.get("RAY_ADDRESS", "").strip():
        return False
    if "ray" in sys.modules:
        return is_secured(environ)
    environ[MODE_ENV] = "token"
    if len(environ.get(TOKEN_ENV, "")) < 32:
        environ[TOKEN_ENV] = secrets.token_hex(16)
    environ[LOOPBACK_ENV] = "0"
    return True


def is_secured(environ: Any = os.environ) -> bool:
    return (
        environ.get(MODE_ENV) == "token"
        and len(environ.get(TOKEN_ENV, "")) >= 32
        and environ.get(LOOPBACK_ENV) == "0"
    )


def start_watchdog() -> subprocess.Popen:
    """Start the watchdog for this driver's local instance (see the module docstring)."""
    return subprocess.Popen(
        [sys.executable, "-m", "nlm.cluster.local_ray", str(os.getpid())],
        stdin=subprocess.PIPE,  # our end is close-on-exec: Ray's processes never hold it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the command's group must not kill it first
        close_fds=True,
    )


def _watch(driver_pid: int, poll_s: float = 0.5) -> None:
    """Until the driver is gone: remember its descendants (Ray's processes); then kill those
    still alive (the same processes: pid and start time), and their children."""
    import select
    import signal

    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return
    seen: dict[int, float] = {}
    while True:
        readable, _, _ = select.select([sys.stdin], [], [], poll_s)
        if readable and not os.read(sys.stdin.fileno(), 4096):
            break  # EOF: the driver exited
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():
                    seen.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            break
    survivors = []
    for pid, started in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == started:
                survivors.append(proc)
                survivors.extend(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    for proc in survivors:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(survivors, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
