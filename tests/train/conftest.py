"""One toy feature store per session, shared by the training tests; each test run gets its own run name."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import AlignConfig, load_config
from pipeline.precompute import run_precompute

TOY_PAIRS = 40
RESOLUTION = 32


@dataclass
class ToyStore:
    storage: Path
    store: Path

    def config(self, name: str, *overrides: str) -> AlignConfig:
        """A fast training config over the shared store (2 CPU workers of half a core each)."""
        return load_config(None, [
            f"name={name}",
            f"cluster.storage_path={self.storage}",
            f"precompute.store={self.store}",
            "model.pretrained=tiny", "model.clip_pretrained=random",
            "model.tiny_fit_steps=0",  # random weights: these tests check mechanics, not learning
            f"precompute.resolution={RESOLUTION}",
            f"data.toy_pairs={TOY_PAIRS}",
            f"data.toy_resolution={RESOLUTION}",
            "data.holdout_fraction=0.2",
            "train.num_workers=2",
            "train.worker_num_cpus=0.5",
            "train.batch_size_per_worker=2",
            "train.log_every=1",
            "train.lr=1e-4",
            "loss.beta=500",
            *overrides,
        ])


@pytest.fixture(scope="session")
def toy_store(tmp_path_factory, ray_session) -> ToyStore:
    storage = tmp_path_factory.mktemp("train_runs")
    toy = ToyStore(storage, storage / "features")
    run_precompute(toy.config("precompute"))
    return toy
