"""Run as a separate process WITHOUT Ray's token: try every listening socket given on stdin
(JSON [[ip, port], ...]) as an attacker would, and print what each answered (JSON).

HTTP first (the dashboard agent's job API, Prometheus exporters, Serve's proxy), then gRPC
calls to the services Ray's servers implement (GCS, raylet, object manager, core worker).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx

GRPC_METHODS = (
    "/ray.rpc.NodeInfoGcsService/GetAllNodeInfo",
    "/ray.rpc.NodeManagerService/GetNodeStats",
    "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
    "/ray.rpc.ObjectManagerService/Push",
    "/ray.rpc.LogService/ListLogs",  # the dashboard agent's gRPC server
    "/ray.rpc.ReporterService/CpuProfiling",
    "/ray.serve.ASGIService/HandleRequest",  # a Serve replica's inter-deployment server
)


def external_ip() -> str | None:
    """This machine's first non-loopback IPv4 address: where another machine would connect."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    return None


def probe(ip: str, port: int) -> dict:
    host = ip.removeprefix("::ffff:")
    if host in ("0.0.0.0", "::"):  # bound to every interface: try it from the network side
        host = external_ip() or "127.0.0.1"
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        r = httpx.get(f"http://{target}/api/jobs/", timeout=3)
        return {"kind": "http", "status": r.status_code, "body": r.text[:200]}
    except httpx.HTTPError:
        pass
    codes = []
    with grpc.insecure_channel(target) as channel:
        for method in GRPC_METHODS:
            try:
                channel.unary_unary(method)(b"", timeout=2)  # loopback answers in ms
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
    return {"kind": "grpc", "codes": codes}


def main() -> None:
    sockets = json.loads(sys.stdin.read())
    with ThreadPoolExecutor(8) as pool:  # a socket that never answers costs ~9 s: overlap them
        answers = pool.map(lambda s: probe(*s), sockets)
        results = {f"{ip} {port}": a for (ip, port), a in zip(sockets, answers, strict=True)}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
