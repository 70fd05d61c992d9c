"""A small Ray Data job standing in for the corpus job: rows land on "data" nodes.

    python tests/cluster_jobs/probe_corpus.py --out DIR --rows 2000

Through the embedded default like every entrypoint. Each batch records the node it ran on;
the output is Parquet in DIR/rows and DIR/summary.json {rows, node_ids}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def tag_node(batch: dict) -> dict:
    import numpy as np
    import ray

    batch["node_id"] = np.array([ray.get_runtime_context().get_node_id()] * len(batch["id"]))
    batch["square"] = batch["id"] * batch["id"]
    return batch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import ray
    import ray.data
    from nlm.cluster.launch import ensure_ray

    out = Path(args.out).resolve()
    ensure_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Two blocks, half a CPU each: few worker processes to start on a small machine.
    ds = ray.data.range(args.rows, override_num_blocks=2).map_batches(
        tag_node, num_cpus=0.5, resources={"data": 1}
    )
    ds.write_parquet(str(out / "rows"))
    # Read back without Ray: the files are what the job promised.
    table = pq.read_table(out / "rows")
    summary = {"rows": table.num_rows, "node_ids": sorted(set(table["node_id"].to_pylist()))}
    (out / "summary.json").write_text(json.dumps(summary))
    print(f"probe_corpus: {summary['rows']} rows", flush=True)
    return 0


if __name__ == "__main__":
    from nlm.errors import NLMError

    try:
        sys.exit(main())
    except NLMError as exc:
        print(f"nlm: error: {exc}", file=sys.stderr)
        sys.exit(2)
