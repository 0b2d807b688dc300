"""Precompute: preference table -> feature store (Ray Data, streamed), and the readers training uses."""

from pipeline.data.toy import resolve_data_source
from pipeline.models.resolve import resolve_model_path, tiny_model_dir
from pipeline.precompute.run import format_summary, resolve_store_uri, run_precompute, store_settings
from pipeline.precompute.reader import load_empty_prompt, read_training_dataset
from pipeline.precompute.store import FeatureStore, StoreMismatchError, read_manifest

__all__ = [
    "FeatureStore",
    "StoreMismatchError",
    "format_summary",
    "load_empty_prompt",
    "read_manifest",
    "read_training_dataset",
    "resolve_data_source",  # moved to pipeline.data.toy; re-exported for callers
    "resolve_model_path",  # moved to pipeline.models.resolve; re-exported for callers
    "resolve_store_uri",
    "run_precompute",
    "store_settings",
    "tiny_model_dir",
]
