"""`ray job submit` entrypoint for fine-tuning.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/finetune.py --config configs/finetune-cws.yaml

The arguments are those of `nlm finetune` (convert-cws, maxmatch and evaluate included). The
driver joins the cluster the job runs on (RAY_ADDRESS is set for a job's driver); the run
directory and the checkpoint must be on storage the workers see.

The arguments follow every job's convention (jobs/config_args.py): an optional YAML file of
`nlm finetune` options first, then `nlm finetune` flags, which override it.
"""

from config_args import run_job

if __name__ == "__main__":
    run_job("finetune")
