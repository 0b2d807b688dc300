"""Fit the tiny pipeline's UNet to the toy world, so the embedded default starts from a base model.

Preference training adjusts a model that already denoises its world: SDXL and SD1.5 denoise every style before
anyone aligns them. A tiny UNet with random weights does not, and preference training from it mostly learns to
denoise at all; the small difference between preferred and dispreferred styles drowns in that (measured on the
toy world: held-apart implicit accuracy stays at 0.5 +- noise for DPO and RPO from random weights, and rises to
about 0.7 within 50 steps of RPO at the default beta and lr from a fitted base).

So "tiny" gets the same start: plain denoising on toy scenes rendered in EVERY style in equal numbers (the base
has no style preference for alignment to find), from scenes drawn apart from the preference set's. The VAE and
text encoders stay random: they are fixed feature maps, which is all training needs of them.

A plain loop on one process: this is part of building the tiny model (tens of seconds on a CPU), not a training
run, and it must finish before the feature store records the model's identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# Scenes for the fit come from their own seed, never the preference set's (toy worlds use small seeds).
FIT_SCENE_SEED = 1_000_003


@torch.no_grad()
def toy_training_set(parts, *, kind: str, scenes: int, resolution: int) -> dict[str, torch.Tensor]:
    """Latents, prompt embeddings and SDXL time ids of `scenes` toy scenes, each rendered in every style."""
    from pipeline.data.toy import STYLES, random_scene, render_scene
    from pipeline.models.text import encode_prompts, sdxl_add_time_ids
    from pipeline.precompute.stages import vae_input

    rng = np.random.default_rng(FIT_SCENE_SEED)
    captions, pixels = [], []
    for _ in range(scenes):
        scene = random_scene(rng)
        for style in STYLES:
            image = render_scene(scene, style, resolution=resolution, seed=int(rng.integers(2**32)))
            captions.append(scene.caption)
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    images = vae_input(np.stack(pixels))
    # As precompute encodes: the posterior mean times the VAE's scaling factor.
    latents = torch.cat([
        parts.vae.encode(chunk).latent_dist.mean * parts.vae.config.scaling_factor for chunk in images.split(64)
    ])
    prompt_embeds, pooled = encode_prompts(parts.text_encoders, parts.tokenizers, captions, kind=kind)
    data = {"latents": latents, "prompt_embeds": prompt_embeds}
    if pooled is not None:
        time_ids = sdxl_add_time_ids((resolution, resolution), (0, 0), (resolution, resolution))
        data["pooled"] = pooled
        data["time_ids"] = torch.tensor([time_ids] * len(captions), dtype=torch.float32)
    return data


def fit_unet_to_toy_world(
    pipeline_dir: str | Path,
    *,
    kind: str,
    steps: int,
    resolution: int,
    scenes: int = 96,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict:
    """Train the UNet of the pipeline folder `pipeline_dir` on plain denoising of toy scenes; save it in place.

    Returns (and writes to `toy_fit.json` in the folder) what was done: steps, scenes, the first and last losses.
    """
    from pipeline.data.toy import fixed_threads

    with fixed_threads():  # the same weights on every machine (pipeline.data.toy.FIT_THREADS)
        return _fit_unet(Path(pipeline_dir), kind=kind, steps=steps, resolution=resolution, scenes=scenes,
                         batch_size=batch_size, lr=lr, seed=seed)


def _fit_unet(folder: Path, *, kind: str, steps: int, resolution: int, scenes: int, batch_size: int, lr: float,
              seed: int) -> dict:
    from pipeline.data.toy import progress
    from pipeline.models.loader import load_components
    from pipeline.train.step import unet_mse

    parts = load_components(str(folder), kind=kind, parts=("unet", "vae", "text", "scheduler"))
    data = toy_training_set(parts, kind=kind, scenes=scenes, resolution=resolution)
    unet, scheduler = parts.unet.train().requires_grad_(True), parts.scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    count = data["latents"].shape[0]
    losses = []
    for _ in progress(steps, "[model] tiny UNet toy fit"):
        index = torch.randperm(count, generator=generator)[:batch_size]
        latents = data["latents"][index]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        sdxl = "pooled" in data
        loss = unet_mse(  # the training step's own denoising loss, per sample; all samples are the same size
            unet, scheduler, latents, noise, timesteps, data["prompt_embeds"][index],
            data["pooled"][index] if sdxl else None, data["time_ids"][index] if sdxl else None,
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval().save_pretrained(folder / "unet")
    window = max(1, min(20, steps // 5))  # average a few steps: one step's loss depends on its timesteps
    report = {
        "steps": steps, "scenes": scenes, "images": count, "resolution": resolution, "lr": lr,
        "first_loss": float(np.mean(losses[:window])) if losses else None,
        "last_loss": float(np.mean(losses[-window:])) if losses else None,
    }
    (folder / "toy_fit.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
