"""Fine-tuning (`nlm finetune`) on Ray Train + DeepSpeed."""
