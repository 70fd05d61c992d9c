"""`ray job submit` entrypoint for the corpus pipeline (the same options as `nlm prepare`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/prepare_corpus.py --config configs/prepare-wt2.yaml
    ray job submit --working-dir . -- python jobs/prepare_corpus.py \
        --input s3://bucket/corpus/ --output s3://bucket/shards/wt2 --tokenizer spm-bpe --seq-len 256

A job's driver has RAY_ADDRESS set, so the tokenizer actors run on the cluster's nodes. Inputs
and outputs must then be visible from every node: object storage (s3://, gs://) or a shared
filesystem path. Bad input exits with status 2 and one `nlm: error:` line in the job's log.

The arguments follow every job's convention (jobs/config_args.py): an optional YAML file of
`nlm prepare` options first, then `nlm prepare` flags, which override it.
"""

from config_args import run_job

if __name__ == "__main__":
    run_job("prepare")
