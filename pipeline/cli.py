"""What every job script (jobs/) shares: argument parsing into an AlignConfig, and joining Ray by Ray's own rules."""

from __future__ import annotations

import argparse
import os

from pipeline.config import AlignConfig, ConfigError, add_config_args, config_from_args


def parse(description: str) -> AlignConfig:
    """The job's config; a bad one ends the job with its one-line reason (exit code 2), not a traceback."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    try:
        return config_from_args(parser.parse_args())
    except ConfigError as err:
        parser.error(str(err))


def init_ray(cfg: AlignConfig) -> None:
    """No address: RAY_ADDRESS, a head started by `ray start --head`, or a new local Ray, by Ray's rules."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address=cfg.cluster.ray_address)
