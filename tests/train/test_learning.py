"""Does preference training learn the toy world's preference (sketch style preferred) beyond the pairs it saw?

Measured on held-apart pairs: the policy's implicit accuracy (share of pairs whose winner gains more reward than
its loser; ties, as at step 0 where policy == reference, count half) and its mean reward margin. The base model is
the tiny pipeline with its UNet fitted to the toy world (model.tiny_fit_steps), at the default beta and lr 1e-5.
Measured here (384 pairs, 64 px, 80 steps of 8 pairs, 1 worker): RPO and DPO both end near 0.7, against 0.5 at the
start; the test asks for a clear rise, not that value. From a random-weight UNet neither rises (see
pipeline/models/toy_fit.py).
"""

import pytest

from pipeline.config import load_config
from pipeline.precompute import resolve_model_path, run_precompute
from pipeline.train.run import run_training

pytestmark = pytest.mark.slow

WORLD = [
    "data.toy_pairs=384", "data.toy_resolution=64", "precompute.resolution=64", "precompute.batch_size=32",
    "data.holdout_fraction=0.25", "evaluate.holdout_pairs=64",
]
TRAIN = [
    "train.num_workers=1", "train.max_steps=80", "train.batch_size_per_worker=8", "train.lr=1e-5",
    "train.log_every=40", "train.checkpoint_every=80",
]


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory, ray_session):
    """One toy world, fitted tiny model and feature store, shared by the runs below."""
    storage = tmp_path_factory.mktemp("learn")
    cfg = load_config(None, [f"cluster.storage_path={storage}", "name=world", "model.pretrained=tiny", *WORLD])
    run_precompute(cfg)
    return storage, cfg.store_uri, resolve_model_path(cfg)


# DPO here; RPO's rise is asserted by the align job's test (tests/jobs/test_align_job.py) on the toy base.
@pytest.mark.parametrize("objective", ["dpo"])
def test_holdout_accuracy_rises_above_its_start(toy_store, objective):
    storage, store, model = toy_store
    cfg = load_config(None, [
        f"cluster.storage_path={storage}", f"name={objective}", f"precompute.store={store}",
        f"model.pretrained={model}", *WORLD, f"loss.objective={objective}", *TRAIN,
    ])
    metrics = run_training(cfg).metrics
    assert metrics["start_holdout_accuracy"] == pytest.approx(0.5)
    assert metrics["holdout_accuracy"] > metrics["start_holdout_accuracy"] + 0.1, metrics
    assert metrics["holdout_margin"] > 0, metrics
