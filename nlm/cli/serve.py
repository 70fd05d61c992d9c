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
import os
import signal
import sys
import threading

from nlm.device import add_device_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nlm.serve.launch import local_defaults

    D = local_defaults()

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
        "--max-batch-size",
        type=int,
        default=D["max_batch_size"],
        help="requests merged into one run (default %(default)s)",
    )
    batching.add_argument(
        "--batch-wait-ms",
        type=float,
        default=D["batch_wait_timeout_s"] * 1000.0,
        help="how long a batch waits to fill (default %(default)s)",
    )
    batching.add_argument(
        "--stream-batching-interval-ms",
        type=float,
        default=D["stream_batching_interval_ms"],
        help="a streamed choice's tokens are sent at most this often after its first "
        "(default %(default)s; 0: every decode step)",
    )
    batching.add_argument(
        "--no-batching", action="store_true", help="max batch size 1: every request runs alone"
    )
    sizing = parser.add_argument_group("replicas")
    sizing.add_argument(
        "--replica-cpus",
        type=float,
        default=D["num_cpus"],
        help="logical CPUs reserved per replica (default %(default)s: eight models fit on 2 cores)",
    )
    sizing.add_argument(
        "--torch-threads",
        type=int,
        default=D["torch_threads"],
        help="torch threads per model replica (default: its whole reserved CPUs, at least 1)",
    )
    sizing.add_argument(
        "--replicas", type=int, default=D["num_replicas"], help="replicas per model (default 1)"
    )
    sizing.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="GPUs per model replica, fractions allowed (default: 1 with --device cuda, else 0; "
        "under --device auto a replica runs on a GPU exactly when it has a share)",
    )
    add_device_arguments(parser)
    limits = parser.add_argument_group("request limits")
    for field, kind, help_text in (
        ("max_input_tokens", int, "tokens per input"),
        ("max_new_tokens", int, "tokens generated per input"),
        ("max_items", int, "inputs per request"),
        (
            "max_request_cost",
            int,
            "token positions of model compute per request (bert scoring: tokens x length per "
            "text); over it: 400 over_budget",
        ),
        ("max_slice_cost", int, "token positions per engine call; longer work is split"),
        (
            "max_cache_bytes",
            int,
            "generation cache (keys/values, states) of a replica's running rows; more rows wait "
            "to join",
        ),
    ):
        limits.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=D["limits"][field],
            help=f"{help_text} (default %(default)s)",
        )
    for field, kind, help_text in (
        ("max_body_bytes", int, "request body limit; larger bodies get 413 unread"),
        (
            "request_timeout_s",
            float,
            "a request not answered by then gets 504 and its work is dropped",
        ),
        (
            "max_queued_requests",
            int,
            "requests waiting per model beyond its replicas' capacity; more get 503 with "
            "Retry-After",
        ),
    ):
        limits.add_argument(
            "--" + field.replace("_", "-"),
            type=kind,
            default=D[field],
            help=f"{help_text} (default %(default)s)",
        )
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
        "stream_batching_interval_ms": args.stream_batching_interval_ms,
        "num_cpus": args.replica_cpus,
        "torch_threads": args.torch_threads,
        "num_replicas": args.replicas,
        "device": args.device,
        "dtype": args.dtype,
        "num_gpus": args.replica_gpus,
        "limits": {
            "max_input_tokens": args.max_input_tokens,
            "max_new_tokens": args.max_new_tokens,
            "max_items": args.max_items,
            "max_request_cost": args.max_request_cost,
            "max_slice_cost": args.max_slice_cost,
            "max_cache_bytes": args.max_cache_bytes,
        },
        "max_body_bytes": args.max_body_bytes,
        "request_timeout_s": args.request_timeout_s,
        "max_queued_requests": args.max_queued_requests,
    }


def check_args(args: argparse.Namespace) -> None:
    from nlm.errors import NLMError

    checks = [
        (1 <= args.port <= 65535, f"--port {args.port}: must be 1-65535"),
        (args.max_batch_size >= 1, f"--max-batch-size {args.max_batch_size}: must be >= 1"),
        (args.batch_wait_ms >= 0, f"--batch-wait-ms {args.batch_wait_ms}: must be >= 0"),
        (
            args.stream_batching_interval_ms >= 0,
            f"--stream-batching-interval-ms {args.stream_batching_interval_ms}: must be >= 0",
        ),
        (args.replica_cpus > 0, f"--replica-cpus {args.replica_cpus}: must be > 0"),
        (args.replicas >= 1, f"--replicas {args.replicas}: must be >= 1"),
        (args.torch_threads is None or args.torch_threads >= 1, "--torch-threads: must be >= 1"),
        (args.max_input_tokens >= 1, "--max-input-tokens: must be >= 1"),
        (args.max_new_tokens >= 1, "--max-new-tokens: must be >= 1"),
        (args.max_items >= 1, "--max-items: must be >= 1"),
        (
            args.replica_gpus is None or args.replica_gpus >= 0,
            f"--replica-gpus {args.replica_gpus}: must be >= 0",
        ),
        (
            not (args.device == "cuda" and args.replica_gpus == 0),
            "--replica-gpus 0: --device cuda needs a GPU share per replica (e.g. 0.25)",
        ),
        (args.max_request_cost >= 1, "--max-request-cost: must be >= 1"),
        (args.max_slice_cost >= 1, "--max-slice-cost: must be >= 1"),
        (args.max_cache_bytes >= 1, "--max-cache-bytes: must be >= 1"),
        (args.max_body_bytes >= 1, "--max-body-bytes: must be >= 1"),
        (args.request_timeout_s > 0, "--request-timeout-s: must be > 0"),
        (args.max_queued_requests >= 1, "--max-queued-requests: must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise NLMError(message)


def run(args: argparse.Namespace) -> int:
    from nlm.errors import NLMError

    check_args(args)
    if not os.environ.get("RAY_ADDRESS") and args.device != "auto":
        # The replicas run here: the GPU and its bf16 support can be checked before any
        # model (or Ray) loads. A cluster's GPUs are counted once connected, below.
        from nlm.device import check_request

        check_request(args.device, args.dtype)
    # nlm.cli.main has set up the local Ray instance's token and loopback binding (see
    # nlm.cluster.local_ray); --host binds only Serve's HTTP proxy. NLM_API_TOKEN guards the API.
    # Checkpoints and port first: bad input fails here, before Ray is imported or started.
    from nlm.serve import launch
    from nlm.serve.catalog import parse_checkpoints

    parse_checkpoints(list(args.checkpoints))
    if not os.environ.get("RAY_ADDRESS"):
        launch.check_port_free(args.host, args.port)
    from nlm.cluster.launch import ensure_ray
    from nlm.serve.app import build_app

    app = build_app(app_args(args))  # bad application args fail here, before Ray starts
    try:
        how = ensure_ray()
    except NLMError:
        raise
    except Exception as exc:  # Ray's own start-up failures (an overloaded machine, ports)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NLMError(f"could not start Ray: {first}") from None
    try:
        _check_gpus(app_args(args), len(args.checkpoints))
    except NLMError:
        if how == "local":
            launch.shutdown(how)
        raise

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = launch.deploy(app, host=args.host, port=args.port, access_log=args.access_log)
    except NLMError:
        if how == "local":
            launch.shutdown(how)
        raise

    print(
        f"nlm: serving {len(args.checkpoints)} model(s) at {url} (GET {url}/v1/models)", flush=True
    )
    if metrics := launch.metrics_url():
        print(f"nlm: Prometheus metrics at {metrics}", flush=True)
    if how == "joined":
        print("nlm: deployed onto the cluster at RAY_ADDRESS; `serve shutdown` removes it")
        return 0
    print("nlm: Ctrl-C or SIGTERM stops the server", flush=True)
    while not stop.wait(1.0):
        pass
    print("nlm: shutting down", file=sys.stderr, flush=True)
    launch.shutdown(how)
    return 0


def _check_gpus(spec: dict, models: int) -> None:
    """Refuse GPU requests the cluster cannot place (Serve would wait for them forever)."""
    import ray

    from nlm.serve.placement import check_placeable, gpu_requests

    requests = gpu_requests(spec, models)
    if any(requests):
        check_placeable(requests, float(ray.cluster_resources().get("GPU", 0)))
