"""Pretraining (`nlm train`): the driver, the per-worker loop, its data, metrics and DeepSpeed set-up."""
