"""Distributed preference fine-tuning: Ray Train workers running DeepSpeed ZeRO over the feature store."""
