"""Shared fixtures. One Ray session serves the whole suite (ray.init costs ~5 s)."""

import os

# Set before Ray, DeepSpeed or torch are imported anywhere in the test process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with this machine's CPUs; tests that need Ray take this fixture."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}},
        )
    yield ray
    ray.shutdown()
