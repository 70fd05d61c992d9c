"""The embedded default: one way to get a Ray cluster, whatever the caller runs under.

Every command (`nlm prepare`, `nlm train`, `nlm serve`, the jobs/ entrypoints) calls
`ensure_ray()` before touching Ray, and gets the same code path in three situations:

- Ray already initialised in this process (a test fixture, a notebook): use it as is.
- RAY_ADDRESS set (a cluster started with `ray up` / `ray start`, or a driver launched by
  `ray job submit`, which sets RAY_ADDRESS itself): join that cluster.
- Neither: start a local instance sized for a small machine, bound to loopback and guarded by
  a per-run token (nlm.cluster.local_ray; docs/OPERATIONS.md "Security model"), with a
  watchdog process that removes it if this driver is killed.

`check_resources()` then asks the cluster for the workers' resources up front, through a
placement group with a deadline, so an undersized cluster fails with one clear `NLMError`
instead of a job that waits forever for resources that never come (Ray queues an
unplaceable request without an error; on 2 cores a Train job and Ray Data can starve each other).
"""

from __future__ import annotations

import logging
import os
import socket
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group

from nlm.cluster.local_ray import is_secured, start_watchdog
from nlm.errors import NLMError

log = logging.getLogger(__name__)

# How long check_resources waits by default. On a cloud cluster the autoscaler may need
# several minutes to boot a GPU node, so jobs there raise it (NLM_RESOURCE_TIMEOUT_S=900).
DEFAULT_RESOURCE_TIMEOUT_S = float(os.environ.get("NLM_RESOURCE_TIMEOUT_S", "120"))
# A local instance started by ensure_ray has no autoscaler: what is not there now never
# comes, so there is no point waiting the full default.
LOCAL_RESOURCE_TIMEOUT_S = 15.0

_started_locally = False
_watchdog = None  # the process that cleans up after a killed driver (nlm.cluster.local_ray)


def local_num_cpus() -> int:
    """Logical CPUs for a local instance: more than the cores on purpose.

    Ray schedules logical CPUs. With exactly as many as cores, two Train workers hold the
    whole machine and Ray Data's tasks (or Serve's proxy) can never be scheduled, which hangs
    without an error. Two spare logical CPUs leave room for them; the OS shares the cores.
    """
    return max(4, (os.cpu_count() or 2) + 2)


def ensure_ray(num_cpus: int | None = None) -> str:
    """Make sure this process is connected to Ray; return how: "existing", "joined", "local".

    num_cpus only applies when a local instance is started (default: `local_num_cpus()`).
    Raises NLMError when RAY_ADDRESS names a cluster that cannot be reached.
    """
    global _started_locally
    if ray.is_initialized():
        return "existing"

    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        if address.startswith(("http://", "https://")):
            # The job server's address (what `ray job submit` wants) is not a driver address.
            raise NLMError(
                f"RAY_ADDRESS={address} is the job server's HTTP address; submit with "
                f"`ray job submit --address {address} --working-dir . -- python jobs/...`, or "
                "set RAY_ADDRESS to the cluster's GCS address (host:6379) or 'auto' on a node"
            )
        _probe(address)
        try:
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
            raise NLMError(
                f"cannot join the Ray cluster at RAY_ADDRESS={address}: {first_line}"
            ) from None
        return "joined"

    # Token authentication and loopback binding must be chosen before `import ray`
    # (nlm.cluster.local_ray, called by nlm.cli.main). A process that imported Ray first (a
    # notebook, a script) gets what its environment says; say so when that is unsecured.
    # The mode is never left unset: Ray 2.60 would write ~/.ray/auth_token, which turns token
    # auth on for every later `ray start` by this user.
    if not is_secured():
        log.warning(
            "the local Ray instance starts without nlm's per-run token and loopback binding "
            "(Ray was imported before nlm.cluster.local_ray.secure_environment() ran)"
        )
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        ray.init(
            address="local",  # never silently join a cluster some other `ray start` left running
            num_cpus=num_cpus or local_num_cpus(),
            include_dashboard=False,  # nothing listens on 8265 for a throwaway local instance
            log_to_driver=False,  # progress goes to tqdm / metrics files, not worker stdout
        )
    except Exception as exc:  # Ray raises a bare Exception when its node does not come up
        if "timed out during startup" not in str(exc):
            raise
        raise NLMError(
            "the local Ray instance did not start in time (Ray's node start-up timed out; "
            "on an overloaded machine, retry when the load is lower)"
        ) from None
    _started_locally = True
    global _watchdog
    _watchdog = start_watchdog()  # kills the instance's processes if this driver is killed
    log.info("started a local Ray instance (%s logical CPUs)", ray.cluster_resources().get("CPU"))
    return "local"


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """A plain TCP connect to host:port first: ray.init retries a dead address for minutes."""
    hostport = address.removeprefix("ray://")
    if hostport == "auto" or ":" not in hostport:
        return  # "auto" reads the local node's address file; ray.init reports that itself
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise NLMError(
            f"cannot join the Ray cluster at RAY_ADDRESS={address}: nothing answers there "
            f"({exc}); start it (`ray up cluster.yaml` / `ray start --head`) or unset "
            "RAY_ADDRESS to run on a local instance"
        ) from None


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in sorted(resources.items()) if not _is_internal(k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in keep.items()) + "}"


def _is_internal(name: str) -> bool:
    # Ray adds per-node resources ("node:10.0.0.1", "node:__internal_head__") and memory.
    return name.startswith("node:") or name in ("memory", "object_store_memory")


def check_resources(
    required: dict[str, float] | list[dict[str, float]],
    timeout_s: float | None = None,
    *,
    what: str = "the job",
    strategy: str = "PACK",
) -> None:
    """Fail fast, with a clear NLMError, if the cluster cannot place `required` in time.

    required: one bundle ({"CPU": 1, "trainer": 1}) or a list of bundles, one per worker
    (e.g. `[{"CPU": 0.5, "trainer": 0.5}] * num_workers`, plus a bundle for the data
    pipeline's CPUs if the job needs them held free). The bundles are reserved as a
    placement group (which also asks an autoscaler for nodes), waited on for at most
    timeout_s, then released again before the caller starts its real work.
    """
    bundles = [dict(required)] if isinstance(required, dict) else [dict(b) for b in required]
    bundles = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    bundles = [b for b in bundles if b]
    if not bundles:
        return
    if timeout_s is None:
        timeout_s = LOCAL_RESOURCE_TIMEOUT_S if _started_locally else DEFAULT_RESOURCE_TIMEOUT_S

    start = time.monotonic()
    group = placement_group(bundles, strategy=strategy)
    try:
        ready = group.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(group)
    if ready:
        log.info("resources for %s available after %.1f s", what, time.monotonic() - start)
        return

    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    same = all(b == bundles[0] for b in bundles)
    shape = f"{len(bundles)} x {_fmt(bundles[0])}" if same else ", ".join(map(_fmt, bundles))
    raise NLMError(
        f"the Ray cluster cannot place {what} within {timeout_s:g} s: needs {shape} "
        f"(total {_fmt(total)}); cluster has {_fmt(ray.cluster_resources())}, free "
        f"{_fmt(ray.available_resources())}. Use fewer or smaller workers, add nodes with "
        "those resources, or raise NLM_RESOURCE_TIMEOUT_S if an autoscaler is still adding them"
    )
