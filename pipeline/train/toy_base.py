"""Fit a tiny SDXL-shaped pipeline into a toy base model that GENERATES toy scenes.

`pipeline.models.toy_fit` fits only the UNet, on latents of a random-weight VAE: it denoises, but its decoded
samples are not scenes. A base model for alignment must draw its world, in every style, before anyone prefers
one style, as SDXL draws photos, paintings and sketches. So this fit trains, in order:

1. the VAE on toy images of all three styles: L1 reconstruction, a texture term (the local amount of edges, so
   dots and hatching survive the 8x bottleneck instead of blurring into flat colour, which L1 alone would do)
   and a small KL that keeps the latents smooth; then its `scaling_factor` is set so latents have unit std;
2. the UNet on that VAE's latents with the scenes' captions (through the tiny text encoders, frozen: their
   random features already separate the few words of the toy vocabulary), with the caption dropped to the
   empty prompt now and then, so classifier-free guidance works in the plain diffusers pipeline.

Captions never name a style and every scene is rendered in all three styles equally, so the base draws each
style about a third of the time: the target style is a minority, as in a real base model.

It lives with training, not in models/: it is training on toy data, and it reuses the training step's
denoising loss (`pipeline.train.step.unet_mse`) and precompute's pixel convention (`vae_input`). Not used by the
pipeline yet: the toy-world alignment benchmark (issue 14) is to make it the embedded default's base, replacing the
UNet-only fit of `pipeline.models.toy_fit` (which models/ calls today). The VAE fit does not yet reproduce colours
faithfully (bench/results/toy/vae_reconstructions_1600steps.png: top the renders, bottom the reconstructions).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Scenes for the fit come from their own seed, never a preference set's (toy worlds use small seeds), nor the
# UNet-only fit's (pipeline.models.toy_fit uses 1_000_003).
FIT_SCENE_SEED = 2_000_003
LATENT_NOISE = 0.1  # std of the noise added to VAE latents while fitting the decoder


@dataclass(frozen=True)
class ToyBaseSettings:
    """What decides the fitted weights (the cache folder's name carries `tag()`)."""

    resolution: int = 64
    scenes: int = 512  # each rendered in every style
    vae_steps: int = 400
    vae_batch: int = 32  # random crops of vae_crop pixels: convolutions see local detail at a quarter of the cost
    vae_crop: int = 32
    vae_lr: float = 2e-3
    texture_weight: float = 1.0
    kl_weight: float = 1e-3
    unet_steps: int = 1500
    unet_batch: int = 32
    unet_lr: float = 1e-3
    uncond_prob: float = 0.1  # caption dropped to the empty prompt, for classifier-free guidance
    seed: int = 0

    def tag(self) -> str:
        """Short folder-name tag; settings not in it keep their defaults (a changed default is a new version)."""
        return f"gen{self.resolution}_s{self.scenes}_v{self.vae_steps}_u{self.unet_steps}_seed{self.seed}"


# ------------------------------------------------------------------------------------------------- data


def render_toy_images(*, scenes: int, resolution: int, seed: int = FIT_SCENE_SEED) -> tuple[np.ndarray, list[str], list[str]]:
    """uint8 [scenes * 3, H, W, 3] renders of `scenes` random scenes, each in every style, with their captions and
    styles (same order)."""
    from pipeline.data.toy import STYLES
    from pipeline.data.toy_clip import toy_scene_renders

    captions, renders = toy_scene_renders(scenes=scenes, resolution=resolution, seed=seed)
    pixels = [np.asarray(image.convert("RGB"), dtype=np.uint8) for styles in renders for image in styles]
    return (np.stack(pixels), [caption for caption in captions for _ in STYLES],
            [style for _ in captions for style in STYLES])


# -------------------------------------------------------------------------------------------------- VAE


def texture_map(images: torch.Tensor, *, window: int = 4) -> torch.Tensor:
    """[B, 1, H/window, W/window] mean absolute neighbour difference per window: how busy each patch is,
    whatever the exact place of each dot or stroke."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(1, keepdim=True)[..., :-1, :]
    dy = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(1, keepdim=True)[..., :, :-1]
    return F.avg_pool2d(dx + dy, window)


def vae_loss(vae, images: torch.Tensor, *, texture_weight: float, kl_weight: float) -> tuple[torch.Tensor, dict]:
    # Decoded from the posterior mean plus a little fixed noise, not from a sample: a fresh VAE's posterior has
    # unit variance, which drowns its mean and leaves the decoder drawing the average image for hundreds of steps
    # (measured). The noise keeps the decoder tolerant of the UNet's imperfect latents; the penalty on the mean
    # (the KL's mean term) keeps the latents' scale in check. Precompute and generation use only the mean.
    mean = vae.encode(images).latent_dist.mean
    decoded = vae.decode(mean + LATENT_NOISE * torch.randn_like(mean)).sample
    reconstruction = (decoded - images).abs().mean()
    texture = (texture_map(decoded) - texture_map(images)).abs().mean()
    scale = 0.5 * (mean**2).mean()
    loss = reconstruction + texture_weight * texture + kl_weight * scale
    return loss, {"l1": reconstruction.item(), "texture": texture.item(), "mean_sq": scale.item()}


def fit_vae(vae, images: torch.Tensor, settings: ToyBaseSettings, generator: torch.Generator) -> dict:
    """Fit `vae` in place on `images` (float [-1, 1], [N, 3, H, W]); then set its scaling factor."""
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, settings.vae_steps))
    size, crop = images.shape[-1], settings.vae_crop
    history = []
    for _ in range(settings.vae_steps):
        index = torch.randint(0, len(images), (settings.vae_batch,), generator=generator)
        top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=generator))
        # Crops on the latent grid (multiples of 8): the decoder then always sees whole latent cells.
        top, left = top // 8 * 8, left // 8 * 8
        batch = images[index, :, top : top + crop, left : left + crop]
        loss, parts = vae_loss(vae, batch, texture_weight=settings.texture_weight, kl_weight=settings.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(parts)
    vae.eval().requires_grad_(False)
    latents = encode_latents(vae, images, scaling_factor=1.0)
    # Like SD's 0.18215: latents scaled to unit std, the variance the noise schedule assumes.
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return _window_report(history)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, *, scaling_factor: float) -> torch.Tensor:
    """As precompute encodes: the posterior mean times the scaling factor."""
    return torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)]) * scaling_factor


# ------------------------------------------------------------------------------------------------- UNet


def fit_unet(unet, scheduler, latents, prompt_embeds, pooled, time_ids, empty, settings: ToyBaseSettings,
             generator: torch.Generator) -> dict:
    """Fit `unet` in place on plain denoising of `latents` given their captions' embeddings; a caption is swapped
    for `empty` (the unconditional embeddings) with probability `uncond_prob`."""
    from pipeline.train.step import unet_mse

    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.unet_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, settings.unet_steps))
    empty_embeds, empty_pooled = empty
    history = []
    for _ in range(settings.unet_steps):
        index = torch.randint(0, len(latents), (settings.unet_batch,), generator=generator)
        drop = torch.rand(len(index), generator=generator) < settings.uncond_prob
        embeds = torch.where(drop[:, None, None], empty_embeds, prompt_embeds[index])
        batch_pooled = None if pooled is None else torch.where(drop[:, None], empty_pooled, pooled[index])
        noise = torch.randn(latents[index].shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        loss = unet_mse(unet, scheduler, latents[index], noise, timesteps, embeds, batch_pooled,
                        None if time_ids is None else time_ids[index]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({"mse": loss.item()})
    unet.eval().requires_grad_(False)
    return _window_report(history)


@torch.no_grad()
def unconditional_embeddings(parts, *, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the diffusers pipeline feeds for the unconditional half of guidance: zeros for SDXL
    (force_zeros_for_empty_prompt), the encoded empty prompt for SD1.5."""
    from pipeline.models.text import encode_prompts

    embeds, pooled = encode_prompts(parts.text_encoders, parts.tokenizers, [""], kind=kind)
    if kind == "sdxl":
        return torch.zeros_like(embeds[0]), torch.zeros_like(pooled[0])
    return embeds[0], None


# ------------------------------------------------------------------------------------------------ the fit


def fit_toy_base(pipeline_dir: str | Path, *, kind: str, settings: ToyBaseSettings) -> dict:
    """Fit the VAE, then the UNet, of the pipeline folder `pipeline_dir` to the toy world; save both in place.

    Returns (and writes to `toy_base.json` in the folder) the settings, first/last losses and times."""
    from pipeline.models.loader import load_components
    from pipeline.models.text import encode_prompts, sdxl_add_time_ids
    from pipeline.precompute.stages import vae_input

    folder = Path(pipeline_dir)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)  # the VAE's posterior sampling uses the global RNG
        parts = load_components(str(folder), kind=kind, parts=("unet", "vae", "text", "scheduler"))
        started = time.perf_counter()
        pixels, captions, _ = render_toy_images(scenes=settings.scenes, resolution=settings.resolution)
        images = vae_input(pixels)
        vae_report = fit_vae(parts.vae, images, settings, generator)
        vae_seconds = time.perf_counter() - started
        latents = encode_latents(parts.vae, images, scaling_factor=parts.vae.config.scaling_factor)
        with torch.no_grad():
            prompt_embeds, pooled = encode_prompts(parts.text_encoders, parts.tokenizers, captions, kind=kind)
        time_ids = None
        if pooled is not None:
            size = (settings.resolution, settings.resolution)
            time_ids = torch.tensor([sdxl_add_time_ids(size, (0, 0), size)] * len(captions), dtype=torch.float32)
        empty = unconditional_embeddings(parts, kind=kind)
        unet_report = fit_unet(parts.unet, parts.scheduler, latents, prompt_embeds, pooled, time_ids, empty,
                               settings, generator)
    parts.vae.save_pretrained(folder / "vae")
    parts.unet.save_pretrained(folder / "unet")
    report = {
        "settings": asdict(settings), "images": len(images), "vae": vae_report, "unet": unet_report,
        "vae_scaling_factor": parts.vae.config.scaling_factor,
        "seconds": {"vae": round(vae_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    (folder / "toy_base.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _window_report(history: list[dict]) -> dict:
    """First and last losses, each averaged over a few steps (one step's loss depends on its batch and t)."""
    if not history:
        return {"steps": 0}
    window = max(1, min(50, len(history) // 5))
    mean = lambda rows: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}  # noqa: E731
    return {"steps": len(history), "first": mean(history[:window]), "last": mean(history[-window:])}
