"""Start and stop the Serve application on a running Ray: what `nlm serve` and `nlm demo` call.

    how = ensure_ray()                      # nlm.cluster.launch: start a local Ray or join one
    url = deploy(build_app(app_args), host="127.0.0.1", port=8000)
    ...
    shutdown(how)

`app_args` is the application builder's `args` (`nlm.serve.app.AppArgs`, the `args` of
serve/config.yaml). `LOCAL_DEFAULTS` are the sizes `nlm serve` uses on one machine (a quarter of
a CPU per replica, so the demo's six models fit on two cores); a cluster's serve/config.yaml sets
its own. Ray is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from nlm.errors import NLMError

APP_NAME = "nlm"

# `nlm serve`'s flag defaults, in AppArgs terms.
LOCAL_DEFAULTS: dict[str, Any] = {
    "max_batch_size": 32,
    "batch_wait_timeout_s": 0.010,
    "num_cpus": 0.25,
    "torch_threads": None,
    "num_replicas": 1,
    "limits": {
        "max_input_tokens": 512,
        "max_new_tokens": 256,
        "max_items": 64,
        "max_request_cost": 2**17,
        "max_slice_cost": 2**14,
        "max_cache_bytes": 2**31,
    },
    "max_body_bytes": 4 * 1024 * 1024,
    "request_timeout_s": 300.0,
    "max_queued_requests": 256,
}


def local_app_args(checkpoints: list[str], **overrides: Any) -> dict[str, Any]:
    """`LOCAL_DEFAULTS` for these checkpoints ("path" or "name=path"), with `overrides` on top."""
    return {**LOCAL_DEFAULTS, "checkpoints": list(checkpoints), **overrides}


def check_port_free(host: str, port: int) -> None:
    """Fail before starting Ray rather than leave Serve's proxy retrying a taken port.

    Raises NLMError naming the address when `host` does not resolve or `host:port` is taken.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NLMError(f"--host {host}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise NLMError(f"{host}:{port} is already in use (choose another --port)") from None
            raise NLMError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def deploy(
    app: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = False,
) -> str:
    """Start Serve's HTTP proxy on host:port and run `app` (from `nlm.serve.app.build_app`, which
    checks the arguments and checkpoints before anything starts) under `APP_NAME` at route "/";
    returns the base URL. Ray must already be running.

    Raises NLMError (one line) when the application does not start.
    """
    from ray import serve

    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            app,
            name=APP_NAME,
            route_prefix="/",
            logging_config={"enable_access_log": bool(access_log)},
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NLMError(f"the application did not start: {first}") from None
    return f"http://{host}:{port}"


def metrics_url() -> str | None:
    """Where this node's Prometheus metrics (Ray's, Serve's included) are exported."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def shutdown(how: str) -> None:
    """Undo `deploy`: `how` is what `ensure_ray()` returned ("local" or "joined").

    A local instance is ours: it goes whole, so its actors need no graceful Serve shutdown (which
    waits up to 30 s for the controller on a busy machine). On a joined cluster only the
    application is removed. Never raises: a failed clean-up must not hide the caller's error.
    """
    import ray

    if not ray.is_initialized():
        return
    if how == "local":
        ray.shutdown()
        return
    from ray import serve

    try:
        serve.delete(APP_NAME)
        serve.shutdown()
    except Exception as exc:  # noqa: BLE001 - reported, never raised (see docstring)
        print(f"nlm: Serve shutdown: {type(exc).__name__}: {exc}", flush=True)
