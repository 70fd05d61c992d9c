"""A small TorchTrainer job: where do the workers land? (tests/test_cluster_*.py)

    python tests/cluster_jobs/probe_train.py --out DIR --workers 2 \
        --resources '{"CPU": 0.5, "trainer": 0.5}'

Goes through the project's embedded default (ensure_ray, check_resources), so it runs with no
cluster, with RAY_ADDRESS, or under `ray job submit`. Each rank all-reduces its rank + 1 (a real
collective, so the group really formed) and writes DIR/rank<k>.json with its node id; the driver
writes DIR/nodes.json (every node's id and resources). NLMError -> `nlm: error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def train_func(config: dict) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    total = torch.tensor([float(ctx.get_world_rank() + 1)])
    dist.all_reduce(total)
    record = {
        "rank": ctx.get_world_rank(),
        "world_size": ctx.get_world_size(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "sum": total.item(),
    }
    Path(config["out"], f"rank{record['rank']}.json").write_text(json.dumps(record))
    ray.train.report({"sum": total.item()})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resources", default='{"CPU": 0.5}', help="per worker, JSON")
    parser.add_argument("--timeout", type=float, default=None, help="check_resources deadline")
    args = parser.parse_args()

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from nlm.cluster.launch import check_resources, ensure_ray

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    resources = json.loads(args.resources)
    ensure_ray()
    check_resources([resources] * args.workers, args.timeout, what=f"{args.workers} workers")
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=args.workers, resources_per_worker=resources),
        run_config=RunConfig(name="probe", storage_path=str(out / "storage")),
    )
    trainer.fit()
    nodes = [
        {"node_id": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
    ]
    (out / "nodes.json").write_text(json.dumps(nodes))
    print(f"probe_train: {args.workers} workers done", flush=True)
    return 0


if __name__ == "__main__":
    from nlm.errors import NLMError

    try:
        sys.exit(main())
    except NLMError as exc:
        print(f"nlm: error: {exc}", file=sys.stderr)
        sys.exit(2)
