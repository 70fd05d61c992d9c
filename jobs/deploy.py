"""`ray job submit` entrypoint: put checkpoints behind the HTTP API on the cluster (`nlm serve`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/deploy.py configs/deploy.yaml [--replicas 2]

The config's keys are `nlm serve`'s options (`checkpoints` is the list of model directories);
flags after it win. A job's driver has RAY_ADDRESS set, so the application is deployed onto the
cluster and the job ends while the application keeps serving; `serve status` shows it and
`serve shutdown` removes it. Serve binds the host in the config (127.0.0.1 unless you say
otherwise); set NLM_API_TOKEN in the cluster's environment to require a bearer token.
"""

from config_args import run_job

if __name__ == "__main__":
    run_job("serve")
