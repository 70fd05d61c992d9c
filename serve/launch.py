"""Start and stop the Serve application on a running Ray: what `nlm serve` and `nlm demo` call.

    how = ensure_ray()                      # nlm.cluster.launch: start a local Ray or join one
    url = deploy(build_app(app_args), host="127.0.0.1", port=8000)
    ...
    shutdown(how)

`app_args` is the application builder's `args` (`nlm.serve.app.AppArgs`, the `args` of
serve/config.yaml). `local_defaults()` are the sizes `nlm serve` uses on one machine (AppArgs'
defaults with `LOCAL_OVERRIDES`); a cluster's serve/config.yaml sets its own. Ray is imported
inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from nlm.errors import NLMError

APP_NAME = "nlm"

# Where one machine's `nlm serve` differs from the application's defaults (AppArgs, Limits):
# a quarter of a CPU per replica, so the demo's eight models fit on two cores.
LOCAL_OVERRIDES: dict[str, Any] = {"num_cpus": 0.25, "num_replicas": 1}


def local_defaults() -> dict[str, Any]:
    """`nlm serve`'s flag defaults, in AppArgs terms: AppArgs' and Limits' own defaults (one
    place each) with `LOCAL_OVERRIDES` on top. Imports the application (and Ray)."""
    from nlm.inference import Limits
    from nlm.serve.app import AppArgs

    return {**AppArgs().to_dict(), "limits": Limits().to_dict(), **LOCAL_OVERRIDES}


def local_app_args(checkpoints: list[str], **overrides: Any) -> dict[str, Any]:
    """`local_defaults()` for these checkpoints ("path" or "name=path"), `overrides` on top."""
    return {**local_defaults(), "checkpoints": list(checkpoints), **overrides}


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
