"""Which diffusers pipeline a config means: "toy" and "tiny" are built (seeded, fitted to the toy world) under the run
folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import AlignConfig
from pipeline.storage import local_run_dir

if TYPE_CHECKING:
    from pipeline.train.toy_base import ToyBaseSettings


def tiny_model_dir(cfg: AlignConfig) -> Path:
    """Where "tiny" is built. The name carries the fit settings, so another setting builds another model and never
    reuses a stale one."""
    steps = cfg.model.tiny_fit_steps
    fit = f"_fit{steps}x{cfg.precompute.resolution}" if steps else ""
    kind = "_sd15" if cfg.model.kind == "sd15" else ""
    return local_run_dir(cfg.run_dir, cfg.name) / f"tiny_model{kind}{fit}"


TOY_BASE = "toy"  # model.pretrained: the toy base that generates (pipeline.train.toy_base)


def toy_base_dir(cfg: AlignConfig) -> Path:
    """Where "toy" is built; the name carries the fit settings, as tiny_model_dir's does."""
    return local_run_dir(cfg.run_dir, cfg.name) / f"toy_base_{toy_base_settings(cfg).tag()}"


def toy_base_settings(cfg: AlignConfig) -> ToyBaseSettings:
    """The toy base's fit settings: the defaults, at the run's training resolution."""
    from pipeline.train.toy_base import ToyBaseSettings

    return ToyBaseSettings(resolution=cfg.precompute.resolution)


def resolve_model_path(cfg: AlignConfig) -> str:
    """The diffusers pipeline to load: "toy" is the toy base (VAE and UNet fitted on the toy world until it draws
    its scenes in every style; built once by the driver, a few minutes on 2 cores, and cached under the run
    folder by its settings); "tiny" is built (once, seeded, its UNet fitted to the toy world for
    model.tiny_fit_steps) under the run folder; a local folder is made absolute (Ray workers do not share the
    driver's working directory); a hub id is returned as is."""
    if cfg.model.pretrained == TOY_BASE:
        from pipeline.train.toy_base import build_toy_base

        return build_toy_base(toy_base_dir(cfg), toy_base_settings(cfg))
    if cfg.model.pretrained != "tiny":
        local = Path(cfg.model.pretrained).expanduser()
        return str(local.resolve()) if local.exists() else cfg.model.pretrained
    from pipeline.models.tiny import build_tiny_sd15, build_tiny_sdxl

    build = build_tiny_sd15 if cfg.model.kind == "sd15" else build_tiny_sdxl
    return str(build(tiny_model_dir(cfg), toy_fit_steps=cfg.model.tiny_fit_steps,
                     toy_fit_resolution=cfg.precompute.resolution))


TOY_CLIP = "toy"  # model.clip_pretrained: the tiny CLIP fitted on the toy world (pipeline.data.toy_clip)


def resolve_clip_pretrained(cfg: AlignConfig) -> str:
    """model.clip_pretrained as open_clip takes it: "toy" becomes the weights file of the tiny CLIP fitted on the
    toy world (the fit shipped with the project, or fitted once by the driver; cached under the run folder by its
    settings, so every process loads the same weights); a tag, a file or "random" is returned as is."""
    if cfg.model.clip_pretrained != TOY_CLIP:
        return cfg.model.clip_pretrained
    from pipeline.data.toy_clip import toy_clip_weights

    return str(toy_clip_weights(local_run_dir(cfg.run_dir, cfg.name) / "toy_clip"))
