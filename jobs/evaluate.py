"""`ray job submit` entrypoint: perplexity and bits/byte of a checkpoint (`nlm eval`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py configs/evaluate-wt2.yaml [--batch-size 16]

The config's keys are `nlm eval`'s options; flags after it win. The result is one JSON line at
the end of the job's log (`ray job logs <id>`). Evaluation is plain PyTorch in the job's driver,
so the checkpoint and the text must be readable on the head node (shared storage on a cluster).
"""

from config_args import run_job

if __name__ == "__main__":
    run_job("eval")
