"""`ray job submit` entrypoint for the word-vector study.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/study.py --corpus pku --out reports/pku

The arguments are those of `nlm study`. Each step's `nlm prepare` / `nlm train` connects to the
cluster the job runs on (RAY_ADDRESS is set for a job's driver).

The arguments follow every job's convention (jobs/config_args.py): an optional YAML file of
`nlm study` options first, then `nlm study` flags, which override it.
"""

from config_args import run_job

if __name__ == "__main__":
    run_job("study")
