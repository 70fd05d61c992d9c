"""`ray job submit` entrypoint for pretraining: `nlm train` with a YAML config.

    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/gpt-small.yaml
    ray job submit --working-dir . -- python jobs/pretrain.py --config configs/lstm-small.yaml \
        --max-steps 500 --workers 4

Every `nlm train` flag works here and overrides the file. `ray job submit` sets RAY_ADDRESS,
so the trainer joins the cluster instead of starting a local Ray. The run directory (`out`)
must be on storage every node sees when the cluster has several nodes (`shared_fs: true`).

The arguments follow every job's convention (jobs/config_args.py): an optional YAML file of
`nlm train` options first, then `nlm train` flags, which override it.
"""

from config_args import run_job

if __name__ == "__main__":
    run_job("train")
