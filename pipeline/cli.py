"""What every job script (jobs/) shares: argument parsing into an AlignConfig, and joining Ray by Ray's own rules."""

from __future__ import annotations

import argparse
import os

from pipeline.config import AlignConfig, ConfigError, add_config_args, config_from_args, join_uri


def parse(description: str, *, with_models: bool = False) -> AlignConfig | tuple[AlignConfig, dict[str, str]]:
    """The job's config (and, with_models, the --model TAG=LOCATION pairs); a bad one ends the job with its one-line
    reason (exit code 2), not a traceback."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser)
    if with_models:
        parser.add_argument(
            "--model", dest="models", action="append", default=[], metavar="TAG=LOCATION",
            help="a model to generate from: 'base', a diffusers pipeline folder or hub id, a UNet folder or a LoRA "
                 "file/folder (repeatable; default: base=base and aligned=<run>/model when it exists)",
        )
    args = parser.parse_args()
    try:
        cfg = config_from_args(args)
        if not with_models:
            return cfg
        return cfg, models_from_args(cfg, args.models)
    except ConfigError as err:
        parser.error(str(err))


def models_from_args(cfg: AlignConfig, pairs: list[str]) -> dict[str, str]:
    from pipeline.storage import exists

    if not pairs:
        aligned = join_uri(cfg.run_dir, "model")
        return {"base": "base", **({"aligned": aligned} if exists(aligned) else {})}
    models = {}
    for text in pairs:
        tag, sep, location = text.partition("=")
        if not sep or not tag or not location or "/" in tag:
            raise ConfigError(f"--model {text!r}: expected TAG=LOCATION, e.g. --model aligned=runs/toy/model")
        models[tag] = location
    return models


def init_ray(cfg: AlignConfig) -> None:
    """No address: RAY_ADDRESS, a head started by `ray start --head`, or a new local Ray, by Ray's rules."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if not ray.is_initialized():
        ray.init(address=cfg.cluster.ray_address)
