"""The process group's rendezvous store, listening only on the address the other ranks use.

torch.distributed's TCPStore (the key-value store ranks meet at before gloo or NCCL connects)
has no authentication, and its server listens on every interface: TCPStore takes no bind
address, only an already-listening socket (`master_listen_fd`). Ray Train's `TorchConfig` lets
`init_process_group(init_method="env://")` create it, so during training anyone who can reach
the rank-0 node could read and write a running job's rendezvous keys from another machine.

`BoundTorchConfig` is `TorchConfig` with that one step done here: rank 0 opens the listening
socket bound to its node's address (Ray's node IP, the MASTER_ADDR the other ranks dial:
127.0.0.1 on nlm's embedded local Ray, the node's cluster address on a cluster), hands it to
TCPStore, and every rank calls `init_process_group` on that store. Everything else (the env vars
Ray Train sets, the backend, the timeout) is Ray's (ray/train/torch/config.py, `_TorchBackend`).
tests/test_hardening.py probes every socket a training run opens.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listener: socket.socket | None = None  # rank 0's store socket, between the two calls below


def listen_for_store() -> tuple[str, int]:
    """On rank 0: a TCP socket listening on this node's address (not the wildcard); returns
    (address, port), the MASTER_ADDR and MASTER_PORT of the run."""
    global _listener
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(512)
    _listener = sock
    return address, sock.getsockname()[1]


def init_process_group(
    backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: float
) -> None:
    """On every rank: the TCPStore at (address, port) (rank 0 serves it on the socket from
    `listen_for_store`) and `torch.distributed.init_process_group` on it."""
    global _listener
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)  # as env:// would
    if "nccl" in backend:  # as Ray's _setup_torch_process_group: fail, not hang, on a timeout
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        if _listener is None:
            raise RuntimeError("rank 0 has no store socket: listen_for_store was not called here")
        fd = _listener.detach()  # TCPStore owns (and closes) it from here
        _listener = None
        store = dist.TCPStore(address, port, world_size, True, timeout, master_listen_fd=fd)
    else:
        store = dist.TCPStore(address, port, world_size, False, timeout)
    dist.init_process_group(
        backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout
    )


class _BoundTorchBackend(_TorchBackend):
    """Ray's torch backend with the rendezvous of `init_process_group` above."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        if not backend_config.backend:
            raise ValueError("BoundTorchConfig needs an explicit backend (gloo or nccl)")
        address, port = worker_group.execute_single(0, listen_for_store)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE...
        ray.get(
            [
                worker_group.execute_single_async(
                    rank,
                    init_process_group,
                    backend=backend_config.backend,
                    world_rank=rank,
                    world_size=len(worker_group),
                    address=address,
                    port=port,
                    timeout_s=backend_config.timeout_s,
                )
                for rank in range(len(worker_group))
            ]
        )


@dataclass
class BoundTorchConfig(TorchConfig):
    """`ray.train.torch.TorchConfig` whose rendezvous store listens on the rank-0 node's address
    only (module docstring). Ray Train V2 worker groups; `backend` is required."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _BoundTorchBackend
