"""A tiny SDXL and a 12-pair toy world, built once per session and shared by the precompute tests."""

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import AlignConfig, load_config
from pipeline.precompute import resolve_data_source, resolve_model_path

TOY_PAIRS = 12
TOY_RESOLUTION = 48  # images are resized to the store's 32 px, so the resize path is exercised
STORE_RESOLUTION = 32


@dataclass
class World:
    storage: Path  # cluster.storage_path: the tiny model and toy world live under <storage>/toy/
    model_path: str
    toy_table: Path

    def config(self, store: Path, *overrides: str) -> AlignConfig:
        """A small, fast config writing to ``store``; ``overrides`` as on the command line."""
        return load_config(None, [
            f"cluster.storage_path={self.storage}",
            f"data.toy_pairs={TOY_PAIRS}",
            "model.pretrained=tiny", "model.clip_pretrained=random",
            "model.tiny_fit_steps=0",  # random weights: these tests check mechanics, not learning
            f"data.toy_resolution={TOY_RESOLUTION}",
            "data.holdout_fraction=0.25",
            f"precompute.store={store}",
            f"precompute.resolution={STORE_RESOLUTION}",
            "precompute.batch_size=4",
            "precompute.rows_per_shard=8",
            *overrides,
        ])

    def subset(self, folder: Path, rows: int) -> Path:
        """The first ``rows`` rows of the toy table as a table of their own."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"first_{rows}.parquet"
        pq.write_table(pq.read_table(self.toy_table).slice(0, rows), path)
        return path


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    storage = tmp_path_factory.mktemp("precompute_world")
    base = World(storage, "", Path())
    cfg = base.config(storage / "unused-store")
    return World(storage, resolve_model_path(cfg), Path(resolve_data_source(cfg)))
