"""The corpus pipeline (`nlm prepare`): Ray Data reads, tokenizes and writes Parquet shards."""
