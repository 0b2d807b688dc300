"""Fit a tiny OpenCLIP model contrastively on the toy world, so its similarities mean what a real CLIP's do.

RPO weights every (winner i, loser j) contrast by CLIP similarities of their prompts and images. With random
weights the tiny CLIP's image embeddings mostly encode colour statistics (a style's), and its text embeddings
mostly the tokens' random vectors: the weights then carry no meaning. Fitted here on toy captions and renders:

- image-text InfoNCE (CLIP's loss), where every image of a scene, in any style, is a positive of its caption, so
  the image side must encode the scene (shape, colour, position, background) and not the style;
- image-image InfoNCE between two styles of the same scene, which states the same invariance directly.

Text similarity then follows from the images: captions whose scenes look alike come out close. Measured with the
defaults (README Limits): on unseen scenes text->image top-1 retrieval 0.79 (flat renders, chance 0.008), and
captions sharing a position, colour or shape are closer. This module is the toy world's (it knows the renders and
captions). `model.clip_pretrained=toy` selects it (`pipeline.models.resolve.resolve_clip_pretrained`): the driver
fits once, `toy_clip_weights` caches the weights file by `ToyClipSettings.tag()`, and every process loads that file
through open_clip's own `pretrained=<file>` path, as it would a published checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.toy import (ASSETS, FIT_THREADS, STYLES, fixed_threads, progress, random_scene, render_scene,
                               state_digest)

# Scenes for the fit come from their own seed, never a preference set's (toy worlds use small seeds) nor the
# base model fit's; held-apart checks use yet another.
FIT_SCENE_SEED = 3_000_017


@dataclass(frozen=True)
class ToyClipSettings:
    """What decides the fitted weights (the cache folder's name carries `tag()`)."""

    # Measured (README Limits): 1024 scenes, 300 steps of 64 at lr 2e-3 left held-apart retrieval at chance; these
    # reach 0.79 (flat) text->image top-1 among 120 unseen scenes, in about 2 min on 2 cores.
    scenes: int = 2048  # each rendered in every style
    resolution: int = 64
    steps: int = 1500
    batch: int = 128  # scenes per step; each comes in two different styles
    lr: float = 3e-3
    seed: int = 0

    def tag(self) -> str:
        return f"s{self.scenes}_r{self.resolution}_n{self.steps}_b{self.batch}_seed{self.seed}"


def toy_scene_renders(*, scenes: int, resolution: int, seed: int) -> tuple[list[str], list[list]]:
    """Captions of `scenes` random scenes and, per scene, its renders in every style (PIL images, STYLES order)."""
    rng = np.random.default_rng(seed)
    captions, renders = [], []
    for _ in range(scenes):
        scene = random_scene(rng)
        captions.append(scene.caption)
        renders.append([render_scene(scene, style, resolution=resolution, seed=int(rng.integers(2**32)))
                        for style in STYLES])
    return captions, renders


def fit_toy_clip(model, preprocess, tokenizer, settings: ToyClipSettings) -> dict:
    """Fit the open_clip `model` in place (its `preprocess` and `tokenizer` are the ones embedding uses).
    Returns first/last losses and the time taken."""
    started = time.perf_counter()
    captions, renders = toy_scene_renders(scenes=settings.scenes, resolution=settings.resolution, seed=FIT_SCENE_SEED)
    # Preprocessed once: [scenes, styles, 3, s, s]; tokens once: [scenes, 77].
    pixels = torch.stack([torch.stack([preprocess(image) for image in styles]) for styles in renders])
    tokens = tokenizer(captions)
    # Equal captions (two draws of the same scene) are positives of each other, not negatives.
    caption_ids = torch.tensor(np.unique(np.array(captions), return_inverse=True)[1])
    generator = torch.Generator().manual_seed(settings.seed)
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=max(1, settings.steps),
                                                   pct_start=0.1)
    losses = []
    for _ in progress(settings.steps, "[model] toy CLIP fit"):
        index = torch.randperm(len(captions), generator=generator)[: settings.batch]
        # Two different styles per scene: a random first one and a random other one.
        first = torch.randint(0, len(STYLES), (len(index),), generator=generator)
        second = (first + torch.randint(1, len(STYLES), (len(index),), generator=generator)) % len(STYLES)
        images = torch.cat([pixels[index, first], pixels[index, second]])
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokens[index]), dim=-1)
        same = (caption_ids[index][:, None] == caption_ids[index][None, :]).float()
        loss = contrastive_loss(image_features, text_features, same, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's clamp
        losses.append(loss.item())
    model.eval().requires_grad_(False)
    window = max(1, min(20, len(losses) // 5))
    return {
        "steps": settings.steps, "first_loss": float(np.mean(losses[:window])) if losses else None,
        "last_loss": float(np.mean(losses[-window:])) if losses else None,
        "seconds": round(time.perf_counter() - started, 1),
    }


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, same: torch.Tensor,
                     scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE with several positives. `image_features` [2B, E]: two styles of B scenes (first half, second half);
    `text_features` [B, E]; `same` [B, B] 1 where two scenes share a caption. Targets spread evenly over the
    positives of a row."""
    b = len(text_features)
    two_styles = torch.cat([same, same])  # [2B, B]: an image's positive captions
    targets = lambda m: m / m.sum(1, keepdim=True)  # noqa: E731
    logits = scale * image_features @ text_features.T  # [2B, B]
    image_to_text = F.cross_entropy(logits, targets(two_styles))
    text_to_image = F.cross_entropy(logits.T, targets(two_styles.T))
    first, second = image_features[:b], image_features[b:]
    cross = scale * first @ second.T  # [B, B]: style a of scene i against style b of scene j
    image_to_image = 0.5 * (F.cross_entropy(cross, targets(same)) + F.cross_entropy(cross.T, targets(same)))
    return (image_to_text + text_to_image) / 2 + image_to_image


def toy_clip_weights(folder: str | Path, settings: ToyClipSettings = ToyClipSettings(), *,
                     use_shipped: bool = True) -> Path:
    """The weights file of the tiny OpenCLIP fitted on the toy world with ``settings`` (a state dict open_clip
    loads as ``pretrained=<file>``, with a ``.json`` report), put under ``folder`` the first time: the fit shipped
    with the project for these settings (`ASSETS`) if this machine builds the same random start, else fitted."""
    from pipeline.models.clip import ClipEmbedder

    folder = Path(folder)
    weights = folder / f"toy_clip_{settings.tag()}.pt"
    if weights.is_file():
        return weights
    clip = ClipEmbedder("tiny", "random")  # the seeded random start every process would build
    start = state_digest(clip.model.state_dict())
    shipped = ASSETS / weights.name
    record = json.loads(shipped.with_suffix(".json").read_text()) if shipped.is_file() and use_shipped else None
    if record is not None and record["start"] != start:
        print(f"[model] the shipped toy CLIP was fitted from another random start than this machine builds "
              f"({record['start'][:12]} vs {start[:12]}): fitting it here instead", flush=True)
        record = None
    if record is not None:
        state = torch.load(shipped, map_location="cpu", weights_only=True)
        if state_digest(state) != record["weights"]:
            raise ValueError(f"{shipped}: its weights are not the ones recorded in {shipped.with_suffix('.json')}; "
                             f"restore it from git, or refit it with bench/toy_assets.py")
        report = {k: v for k, v in record.items() if k != "settings"}
        print(f"[model] toy CLIP: the fit shipped in pipeline/assets/{shipped.name}", flush=True)
    else:
        print(f"[model] fitting the toy CLIP into {folder} ({settings.steps} steps: about 2 min on 2 CPU cores, once)",
              flush=True)
        with torch.random.fork_rng(devices=[]), fixed_threads():
            torch.manual_seed(settings.seed)
            report = fit_toy_clip(clip.model, clip.preprocess, clip.tokenizer, settings)
        state = clip.model.state_dict()
        report = {**report, "threads": FIT_THREADS, "start": start, "weights": state_digest(state)}
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{weights.name}.{os.getpid()}.tmp"
    torch.save(state, temp)
    os.replace(temp, weights)  # whole or absent: a concurrent or killed fit never leaves half a file
    weights.with_suffix(".json").write_text(json.dumps({"settings": asdict(settings), **report}, indent=2) + "\n")
    return weights
