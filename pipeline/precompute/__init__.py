"""Precompute: preference table -> feature store (Ray Data encoder actors), and the readers training uses."""

from pipeline.precompute.run import (
    format_summary,
    resolve_data_source,
    resolve_model_path,
    resolve_store_uri,
    run_precompute,
    store_settings,
)
from pipeline.precompute.store import (
    FeatureStore,
    StoreMismatchError,
    load_empty_prompt,
    read_manifest,
    read_training_dataset,
)

__all__ = [
    "FeatureStore",
    "StoreMismatchError",
    "format_summary",
    "load_empty_prompt",
    "read_manifest",
    "read_training_dataset",
    "resolve_data_source",
    "resolve_model_path",
    "resolve_store_uri",
    "run_precompute",
    "store_settings",
]
