"""`nlm serve`: serve checkpoints over HTTP with Ray Serve (the application in serve/app.py).

    nlm serve runs/gpt-small runs/bert-small runs/lstm runs/rnn runs/fnn
    nlm serve chat=runs/gpt-small --port 8765

Without RAY_ADDRESS it starts a local Ray instance, serves until interrupted (Ctrl-C or SIGTERM)
and then shuts everything down. With RAY_ADDRESS it deploys the application onto that cluster
and returns; the application keeps running there (`serve shutdown` removes it). The cluster's
own way is `serve deploy serve/config.yaml`, which builds the same application.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import threading

APP_NAME = "nlm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CHECKPOINT",
        help="checkpoint or run directory, or name=path (default name: the directory's name)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument(
        "--allowed-host",
        dest="allowed_hosts",
        action="append",
        metavar="NAME",
        help="Host header value to accept (repeatable; '*' any). Default: the bind address, "
        "plus localhost/127.0.0.1/::1 when it is loopback (guards against DNS rebinding)",
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    batching = parser.add_argument_group("batching")
    batching.add_argument(
        "--max-batch-size", type=int, default=32, help="requests merged into one run (default 32)"
    )
    batching.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long a batch waits to fill (default 10)",
    )
    batching.add_argument(
        "--no-batching", action="store_true", help="max batch size 1: every request runs alone"
    )
    sizing = parser.add_argument_group("replicas")
    sizing.add_argument(
        "--replica-cpus",
        type=float,
        default=0.25,
        help="logical CPUs reserved per replica (default 0.25: five models fit on 2 cores)",
    )
    sizing.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per model replica (default: its whole reserved CPUs, at least 1)",
    )
    sizing.add_argument("--replicas", type=int, default=1, help="replicas per model (default 1)")
    limits = parser.add_argument_group("request limits")
    limits.add_argument("--max-input-tokens", type=int, default=512)
    limits.add_argument("--max-new-tokens", type=int, default=256)
    limits.add_argument("--max-items", type=int, default=64, help="inputs per request")
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs throughput)"
    )


def app_args(args: argparse.Namespace) -> dict:
    """The application builder's args (serve/config.yaml's `args`) for these flags."""
    from nlm.serve.app import default_allowed_hosts

    return {
        "allowed_hosts": list(getattr(args, "allowed_hosts", None) or [])
        or default_allowed_hosts(args.host),
        "checkpoints": list(args.checkpoints),
        "max_batch_size": 1 if args.no_batching else args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
        "num_cpus": args.replica_cpus,
        "torch_threads": args.torch_threads,
        "num_replicas": args.replicas,
        "limits": {
            "max_input_tokens": args.max_input_tokens,
            "max_new_tokens": args.max_new_tokens,
            "max_items": args.max_items,
        },
    }


def check_args(args: argparse.Namespace) -> None:
    from nlm.errors import NLMError

    checks = [
        (1 <= args.port <= 65535, f"--port {args.port}: must be 1-65535"),
        (args.max_batch_size >= 1, f"--max-batch-size {args.max_batch_size}: must be >= 1"),
        (args.batch_wait_ms >= 0, f"--batch-wait-ms {args.batch_wait_ms}: must be >= 0"),
        (args.replica_cpus > 0, f"--replica-cpus {args.replica_cpus}: must be > 0"),
        (args.replicas >= 1, f"--replicas {args.replicas}: must be >= 1"),
        (args.torch_threads is None or args.torch_threads >= 1, "--torch-threads: must be >= 1"),
        (args.max_input_tokens >= 1, "--max-input-tokens: must be >= 1"),
        (args.max_new_tokens >= 1, "--max-new-tokens: must be >= 1"),
        (args.max_items >= 1, "--max-items: must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise NLMError(message)


def check_port_free(host: str, port: int) -> None:
    """Fail before starting Ray rather than leave Serve's proxy retrying a taken port."""
    from nlm.errors import NLMError

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


def metrics_url() -> str | None:
    """Where this node's Prometheus metrics (Ray's, Serve's included) are exported."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def run(args: argparse.Namespace) -> int:
    from nlm.errors import NLMError

    check_args(args)
    # nlm.cli.main has set up the local Ray instance's token and loopback binding (see
    # nlm.cluster.local_ray); --host binds only Serve's HTTP proxy. NLM_API_TOKEN guards the API.
    # Checkpoints and port first: bad input fails here, before Ray is imported or started.
    from nlm.serve.catalog import parse_checkpoints

    parse_checkpoints(list(args.checkpoints))
    if not os.environ.get("RAY_ADDRESS"):
        check_port_free(args.host, args.port)
    from ray import serve

    from nlm.cluster.launch import ensure_ray
    from nlm.serve.app import build_app

    app = build_app(app_args(args))
    try:
        how = ensure_ray()
    except NLMError:
        raise
    except Exception as exc:  # Ray's own start-up failures (an overloaded machine, ports)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NLMError(f"could not start Ray: {first}") from None

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(
            app,
            name=APP_NAME,
            route_prefix="/",
            logging_config={"enable_access_log": bool(args.access_log)},
        )
    except (RuntimeError, ValueError, TypeError) as exc:
        _shutdown(how)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NLMError(f"the application did not start: {first}") from None

    url = f"http://{args.host}:{args.port}"
    print(
        f"nlm: serving {len(args.checkpoints)} model(s) at {url} (GET {url}/v1/models)", flush=True
    )
    if metrics := metrics_url():
        print(f"nlm: Prometheus metrics at {metrics}", flush=True)
    if how == "joined":
        print("nlm: deployed onto the cluster at RAY_ADDRESS; `serve shutdown` removes it")
        return 0
    print("nlm: Ctrl-C or SIGTERM stops the server", flush=True)
    while not stop.wait(1.0):
        pass
    print("nlm: shutting down", file=sys.stderr, flush=True)
    _shutdown(how)
    return 0


def _shutdown(how: str) -> None:
    import ray

    if how == "local":
        # The whole local instance goes, so its actors need no graceful Serve shutdown (which
        # waits up to 30 s for the controller on a busy machine).
        ray.shutdown()
