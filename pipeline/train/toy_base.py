"""Fit a tiny SDXL-shaped pipeline into a toy base model that GENERATES toy scenes.

`pipeline.models.toy_fit` fits only the UNet, on latents of a random-weight VAE: it denoises, but its decoded
samples are not scenes. A base model for alignment must draw its world, in every style, before anyone prefers
one style, as SDXL draws photos, paintings and sketches. So this fit trains, in order:

1. a VAE of its own (`toy_vae`: the tiny pipeline's VAE normalises each channel alone, which erases a flat
   background's colour), started as a colour-preserving 8x pixelation (the colour lane, below), on toy images
   of all three styles: L1 reconstruction, a texture term (the local amount of edges, so dots and hatching
   survive the 8x bottleneck instead of blurring into flat colour, which L1 alone would do) and a small KL that
   keeps the latents smooth; then its `scaling_factor` is set so latents have unit std;
2. the UNet, as a v-prediction model, on that VAE's latents with the scenes' captions (through the tiny text
   encoders, frozen: their random features already separate the few words of the toy vocabulary), with the
   caption dropped to the empty prompt now and then, so classifier-free guidance works in the plain diffusers
   pipeline.

Captions never name a style and every scene is rendered in all three styles equally, so a base that fits them draws
each style about a third of the time: the target style is a minority, as in a real base model.

It lives with training, not in models/: it is training on toy data, and it reuses the training step's
denoising loss (`pipeline.train.step.unet_mse`) and precompute's pixel convention (`vae_input`). It is the embedded
default's base (`model.pretrained=toy`, `pipeline.models.resolve`); `build_toy_base` builds, fits and caches it.

Where it stands (bench/results/toy/toy_base.json, about 6 min on 2 busy CPU cores): the VAE keeps colours but
blurs shapes and draws dots as blocky patches (vae_reconstructions.png: renders, then reconstructions); samples
mostly show the caption's background with a blob of about the right colour (base_samples.png), but the style
scorer calls most of them flat (88% at guidance 4): not yet a third per style.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.toy import ASSETS, FIT_THREADS, fixed_threads, progress, state_digest

# Scenes for the fit come from their own seed, never a preference set's (toy worlds use small seeds), nor the
# UNet-only fit's (pipeline.models.toy_fit uses 1_000_003).
FIT_SCENE_SEED = 2_000_003
LATENT_NOISE = 0.1  # std of the noise added to VAE latents while fitting the decoder


@dataclass(frozen=True)
class ToyBaseSettings:
    """What decides the fitted weights (the cache folder's name carries `tag()`)."""

    resolution: int = 64
    scenes: int = 512  # each rendered in every style
    vae_channels: tuple[int, ...] = (16, 32, 32, 32)  # four blocks: 8x down, latents of resolution / 8
    vae_groups: int = 2  # GroupNorm groups: 8 and 16 channels each, room for the colour lane (toy_vae)
    vae_steps: int = 400
    vae_batch: int = 32  # random crops of vae_crop pixels: convolutions see local detail at a quarter of the cost
    vae_crop: int = 32
    vae_lr: float = 1e-3  # peak of a one-cycle schedule: its warm-up keeps Adam's first steps from unlearning the
    # colour-lane start (measured: a constant 2e-3 first loses most of the flat scenes' colour)
    texture_weight: float = 1.0
    kl_weight: float = 1e-3
    # v, not epsilon: at high noise an epsilon model's small errors become large errors in its implied image (x
    # 12 at t=950), and the sampler's first steps left the scene's colours (measured: garbled samples at MSE 0.09)
    prediction_type: str = "v_prediction"
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


def toy_vae(settings: ToyBaseSettings):
    """A fresh `AutoencoderKL` for the toy world (8x down, 4 latent channels, no mid-block attention: at 8x8
    latents convolutions already see the whole scene), started as a colour-preserving 8x pixelation
    (`init_colour_lane`). Seeded by the caller's global RNG."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=settings.resolution,
        down_block_types=("DownEncoderBlock2D",) * len(settings.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(settings.vae_channels),
        block_out_channels=settings.vae_channels, norm_num_groups=settings.vae_groups,
        mid_block_add_attention=False,
    )
    init_colour_lane(vae)
    return vae


# The colour lane. GroupNorm removes each group's mean and scale per image, so a flat background's colour
# survives it only as a pattern across a group's channels, which a fresh VAE did not find in 1,600 steps (its
# reconstructions turned every background beige). So the first group of channels of every layer on the main
# path starts as a lane that carries the colour through: (R, G, B, -R, -G, -B, +K, -K, ...). Its mean is zero
# whatever the colour, and the constants fix its scale, so GroupNorm (gain K-ish) leaves it almost unchanged;
# SiLU(a) - SiLU(-a) = a takes it through the activations exactly. The encoder then starts as the 8x8 average
# colour (latent channels 0-2; channel 3 stays free) and the decoder as its nearest upsampling; residual
# branches start silent on the lane. Fitting refines that start (edges, texture) instead of finding colour.
LANE_CONSTANT = 8.0  # large next to colours in [-1, 1]: the lane's scale hardly depends on the colour (<3%)
_CENTRE, _ONE = [((1, 1), 1.0)], [((0, 0), 1.0)]
_AVERAGE_2X2 = [((y, x), 0.25) for y in range(2) for x in range(2)]  # Downsample2D's pad is bottom/right
_PAIRS = [(c, 1.0) for c in range(3)] + [(c, -1.0) for c in range(3)]  # lane rows 0-5 from RGB or latents 0-2
_SAME = [(c, 1.0) for c in range(6)]  # lane rows 0-5 from the previous lane


@torch.no_grad()
def init_colour_lane(vae) -> None:
    """Set the colour lane's weights in `vae` (an AutoencoderKL, 4 latent channels, no mid-block attention)."""
    groups = vae.config.norm_num_groups
    encoder, decoder = vae.encoder, vae.decoder
    _lane_rows(encoder.conv_in, groups, _PAIRS, _CENTRE)
    for block in encoder.down_blocks:
        for downsampler in block.downsamplers or []:
            _lane_rows(downsampler.conv, groups, _SAME, _AVERAGE_2X2)
    _lane_rows(decoder.conv_in, groups, _PAIRS, _CENTRE)
    for block in decoder.up_blocks:
        for upsampler in block.upsamplers or []:
            _lane_rows(upsampler.conv, groups, _SAME, _CENTRE)
    for resnet in [r for part in (encoder, decoder) for r in part.modules() if type(r).__name__ == "ResnetBlock2D"]:
        lane = resnet.conv2.out_channels // groups
        resnet.conv2.weight[:lane] = 0
        resnet.conv2.bias[:lane] = 0
        if resnet.conv_shortcut is not None:
            _lane_rows(resnet.conv_shortcut, groups, _SAME, _ONE)
    for norm, conv in ((encoder.conv_norm_out, encoder.conv_out), (decoder.conv_norm_out, decoder.conv_out)):
        lane = norm.num_channels // groups
        norm.weight[:lane] = LANE_CONSTANT * ((lane - 6) / lane) ** 0.5  # the lane's std when the colour is 0
        norm.bias[:lane] = 0
        _set_rows(conv, [[(c, 1.0), (3 + c, -1.0)] for c in range(3)], _CENTRE)  # SiLU(a) - SiLU(-a)
    for conv in (vae.quant_conv, vae.post_quant_conv):  # 1x1: identity on the colour latents
        _set_rows(conv, [[(c, 1.0)] for c in range(3)], _ONE)


def _lane_rows(conv, groups: int, colour: list[tuple[int, float]], taps) -> None:
    """The lane rows of `conv` (its first output group): colour rows read `colour[row]` = (channel, sign) at
    `taps`; the rest are the +-K constants, from the bias."""
    lane = conv.out_channels // groups
    _set_rows(conv, [[source] for source in colour], taps)
    conv.weight[len(colour) : lane] = 0
    conv.bias[len(colour) : lane] = LANE_CONSTANT * torch.tensor([(-1.0) ** k for k in range(lane - len(colour))])


def _set_rows(conv, rows: list[list[tuple[int, float]]], taps) -> None:
    """Row i of `conv` reads only the (channel, sign) of rows[i], with weight sign * w at each tap (y, x), w."""
    conv.weight[: len(rows)] = 0
    conv.bias[: len(rows)] = 0
    for row, sources in enumerate(rows):
        for channel, sign in sources:
            for (y, x), weight in taps:
                conv.weight[row, channel, y, x] = sign * weight


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
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.vae_lr, total_steps=max(1, settings.vae_steps),
                                                   pct_start=0.1)
    size, crop = images.shape[-1], settings.vae_crop
    history = []
    for _ in progress(settings.vae_steps, "[model] toy base: VAE fit"):
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
    for _ in progress(settings.unet_steps, "[model] toy base: UNet fit"):
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


def build_toy_base(folder: str | Path, settings: ToyBaseSettings = ToyBaseSettings(), *,
                   use_shipped: bool = True) -> str:
    """The toy base pipeline folder (a tiny SDXL pipeline with the toy VAE, both fitted), built in `folder` unless
    its `toy_base.json` says it was built with `settings` already; returns the folder's path.

    With `use_shipped`, a fit shipped with the project for these settings (`shipped_toy_base`) is put in place of
    fitting, if this machine builds the same tiny text encoders it was fitted with; otherwise it is fitted here.
    Built in a sibling folder and renamed into place, so a crash never leaves a half-fitted model; a folder
    fitted with other settings is replaced."""
    from pipeline.models.tiny import build_tiny_sdxl

    folder = Path(folder)
    if _built_with(folder) == _as_json(asdict(settings)):
        return str(folder)
    if folder.exists() and any(folder.iterdir()) and _built_with(folder) is None:
        raise FileExistsError(f"{folder} is not empty and is not a toy base: choose another folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".{folder.name}.building-{uuid.uuid4().hex}"
    try:
        build_tiny_sdxl(building, toy_fit_steps=0, toy_fit_resolution=settings.resolution)
        shipped = shipped_toy_base(settings) if use_shipped else None
        if shipped is not None and install_shipped(shipped, building):
            print(f"[model] toy base: the fit shipped in {shipped.relative_to(ASSETS.parent.parent)} "
                  f"(bench/toy_assets.py refits it), into {folder}", flush=True)
        else:
            print(f"[model] fitting the toy base into {folder} (its VAE, then its UNet: about 5 min on 2 CPU "
                  f"cores, once)", flush=True)
            report = fit_toy_base(building, kind="sdxl", settings=settings)
            print(f"[model] toy base fitted in {report['seconds']['total']:.0f} s", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(building, folder)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return str(folder)


def shipped_toy_base(settings: ToyBaseSettings) -> Path | None:
    """The shipped fit for `settings` (pipeline/assets/toy_base_<tag>: its UNet, VAE and toy_base.json), or None."""
    folder = ASSETS / f"toy_base_{settings.tag()}"
    return folder if _built_with(folder) == _as_json(asdict(settings)) else None


def install_shipped(shipped: Path, pipeline_dir: Path) -> bool:
    """Put the shipped UNet and VAE into the fresh tiny pipeline `pipeline_dir`, if its text encoders are the ones
    they were fitted with (same seeded weights); False, with a line saying why, if not. A shipped file whose weights
    are not the recorded ones is an error (a damaged checkout)."""
    record = json.loads((shipped / "toy_base.json").read_text())
    here = text_encoder_digest(pipeline_dir)
    if here != record["text_encoders"]:
        print(f"[model] the shipped toy base was fitted with other tiny text encoders than this machine builds "
              f"({record['text_encoders'][:12]} vs {here[:12]}): fitting it here instead", flush=True)
        return False
    for part in ("unet", "vae"):
        found = weights_digest(shipped / part)
        if found != record["weights"][part]:
            raise ValueError(f"{shipped / part}: its weights' sha256 {found[:16]} is not the recorded "
                             f"{record['weights'][part][:16]} ({shipped / 'toy_base.json'}); restore the folder from "
                             f"git, or refit it with bench/toy_assets.py")
        shutil.rmtree(pipeline_dir / part)
        shutil.copytree(shipped / part, pipeline_dir / part)
    _set_prediction_type(pipeline_dir, record["settings"]["prediction_type"])
    shutil.copyfile(shipped / "toy_base.json", pipeline_dir / "toy_base.json")
    return True


def weights_digest(component_dir: Path) -> str:
    """`state_digest` of a diffusers / transformers component folder's safetensors weights."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(component_dir.glob("*.safetensors")):
        state.update(load_file(file))
    return state_digest(state)


def text_encoder_digest(pipeline_dir: Path) -> str:
    """One digest of both tiny text encoders: what the UNet's fit conditioned on."""
    return hashlib.sha256("".join(weights_digest(Path(pipeline_dir) / name)
                                  for name in ("text_encoder", "text_encoder_2")).encode()).hexdigest()


def fit_toy_base(pipeline_dir: str | Path, *, kind: str, settings: ToyBaseSettings) -> dict:
    """Give the pipeline folder `pipeline_dir` a toy VAE (`toy_vae`, replacing its own) and fit it, then fit the
    folder's UNet on its latents; save both in place.

    Returns (and writes to `toy_base.json` in the folder) the settings, first/last losses and times."""
    from pipeline.models.loader import load_components
    from pipeline.models.text import encode_prompts, sdxl_add_time_ids
    from pipeline.precompute.stages import vae_input

    folder = Path(pipeline_dir)
    generator = torch.Generator().manual_seed(settings.seed)
    # fixed_threads: the same weights on every machine of this kind (pipeline.data.toy.FIT_THREADS)
    with torch.random.fork_rng(devices=[]), fixed_threads():
        torch.manual_seed(settings.seed)  # the VAE's initial weights
        _set_prediction_type(folder, settings.prediction_type)
        parts = load_components(str(folder), kind=kind, parts=("unet", "text", "scheduler"))
        vae = toy_vae(settings)
        started = time.perf_counter()
        pixels, captions, _ = render_toy_images(scenes=settings.scenes, resolution=settings.resolution)
        images = vae_input(pixels)
        vae_report = fit_vae(vae, images, settings, generator)
        vae_seconds = time.perf_counter() - started
        latents = encode_latents(vae, images, scaling_factor=vae.config.scaling_factor)
        with torch.no_grad():
            prompt_embeds, pooled = encode_prompts(parts.text_encoders, parts.tokenizers, captions, kind=kind)
        time_ids = None
        if pooled is not None:
            size = (settings.resolution, settings.resolution)
            time_ids = torch.tensor([sdxl_add_time_ids(size, (0, 0), size)] * len(captions), dtype=torch.float32)
        empty = unconditional_embeddings(parts, kind=kind)
        unet_report = fit_unet(parts.unet, parts.scheduler, latents, prompt_embeds, pooled, time_ids, empty,
                               settings, generator)
    vae.save_pretrained(folder / "vae")
    parts.unet.save_pretrained(folder / "unet")
    report = {
        "settings": asdict(settings), "images": len(images), "vae": vae_report, "unet": unet_report,
        "vae_scaling_factor": vae.config.scaling_factor, "threads": FIT_THREADS,
        "text_encoders": text_encoder_digest(folder),
        "weights": {"unet": weights_digest(folder / "unet"), "vae": weights_digest(folder / "vae")},
        "seconds": {"vae": round(vae_seconds, 1), "total": round(time.perf_counter() - started, 1)},
    }
    (folder / "toy_base.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _set_prediction_type(folder: Path, prediction_type: str) -> None:
    """In the folder's scheduler config, which the diffusers pipeline and training's DDPMScheduler both read."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "prediction_type": prediction_type}, indent=2) + "\n")


def _built_with(folder: Path) -> dict | None:
    """The settings in `folder`'s toy_base.json, or None."""
    marker = folder / "toy_base.json"
    return json.loads(marker.read_text())["settings"] if marker.is_file() else None


def _as_json(value):
    """`value` as json reads it back (tuples become lists), to compare with a saved toy_base.json."""
    return json.loads(json.dumps(value))


def _window_report(history: list[dict]) -> dict:
    """First and last losses, each averaged over a few steps (one step's loss depends on its batch and t)."""
    if not history:
        return {"steps": 0}
    window = max(1, min(50, len(history) // 5))
    mean = lambda rows: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}  # noqa: E731
    return {"steps": len(history), "first": mean(history[:window]), "last": mean(history[-window:])}
