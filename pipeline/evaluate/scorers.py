"""Reward scorers behind one interface: ``scorer.score(images, prompts) -> float64 [N]``, one value per image.

    scorer = build_scorer("pickscore", weights="/models/PickScore_v1")
    scorer.score([image_a, image_b], ["a cat", "a cat"])          # array([21.3, 20.7])

What the three config fields (evaluate.<name>.weights / backbone / arch) mean for each scorer:

- clip: weights = an open_clip pretrained tag or a local weights file; arch = an open_clip model name, or "tiny"
  (the project's tiny OpenCLIP, pipeline/models/clip.py).
- pickscore: weights = a CLIPModel folder or hub id; backbone = the processor's folder or hub id, used when the
  weights folder has no processor files (default laion/CLIP-ViT-H-14-laion2B-s32B-b79K).
- hpsv2: weights = the HPS checkpoint file or owner/repo/file; arch = the open_clip model (default ViT-H-14).
- aesthetic: weights = the MLP head .pth or owner/repo/file; backbone = the CLIP's open_clip tag or weights file
  (default "openai"); arch = the CLIP's open_clip model (default ViT-L-14).
- imagereward: see pipeline/evaluate/imagereward.py. style: no weights (the toy world's hand-made scorer).

Reward models need their weights named (None is an error that says where they come from); a hub id is fetched by
huggingface_hub, or found in its cache when offline. ``save_tiny_twin(name, dir)`` writes a random-weight twin of
the same classes in the published file format and returns the keyword arguments that load it, so tests run the
real loading code. Scorers run in eval mode, without gradients, in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from pipeline.data.toy import STYLES, classify_style, target_style_score
from pipeline.evaluate.names import SCORER_NAMES
from pipeline.evaluate.scorer_weights import WeightsNotFound, check_state_dict, not_found
from pipeline.models.clip import TINY_NAME, ClipEmbedder, _register_tiny

__all__ = ["Scorer", "WeightsNotFound", "build_scorer", "save_tiny_twin", "ClipScorer", "StyleScorer"]

OPEN_CLIP_SOURCE = "an open_clip pretrained tag of the model (open_clip.list_pretrained()) or a local weights file"
TWIN_SEED = 1  # twins differ from ClipEmbedder's tiny model (seed 0), so a twin's file is really what gets loaded


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray: ...  # float64 [N]


def build_scorer(name: str, *, weights: str | None = None, backbone: str | None = None, arch: str | None = None,
                 device: str = "cpu", target_style: str = "sketch") -> Scorer:
    """The scorer ``name`` (one of SCORER_NAMES), loaded once; see the module docstring for the three fields."""
    if name == "clip":
        return ClipScorer.load(weights=weights, arch=arch, device=device)
    if name == "style":
        return StyleScorer(target_style)
    if name == "pickscore":
        from pipeline.evaluate.scorer_pickscore import PickScoreScorer

        return PickScoreScorer.load(weights=weights, backbone=backbone, device=device)
    if name == "hpsv2":
        from pipeline.evaluate.scorer_hpsv2 import HpsV2Scorer

        return HpsV2Scorer.load(weights=weights, arch=arch, device=device)
    if name == "aesthetic":
        from pipeline.evaluate.scorer_aesthetic import AestheticScorer

        return AestheticScorer.load(weights=weights, backbone=backbone, arch=arch, device=device)
    if name == "imagereward":
        from pipeline.evaluate.imagereward import ImageRewardScorer  # another module; imported only when asked for

        return ImageRewardScorer.load(weights=weights, backbone=backbone, arch=arch, device=device)
    raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(SCORER_NAMES)}")


def save_tiny_twin(name: str, out_dir: str | Path) -> dict:
    """Write a tiny random-weight twin of scorer ``name`` in its published file format under ``out_dir``; return
    the {"weights", "backbone", "arch"} that ``build_scorer(name, **kwargs)`` loads it with."""
    if name not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(SCORER_NAMES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == "clip":
        return {"weights": str(save_tiny_open_clip(out_dir / "open_clip_tiny.pt")), "backbone": None, "arch": TINY_NAME}
    if name == "style":
        return {"weights": None, "backbone": None, "arch": None}
    if name == "pickscore":
        from pipeline.evaluate.scorer_pickscore import save_tiny_pickscore

        return save_tiny_pickscore(out_dir)
    if name == "hpsv2":
        from pipeline.evaluate.scorer_hpsv2 import save_tiny_hpsv2

        return save_tiny_hpsv2(out_dir)
    if name == "aesthetic":
        from pipeline.evaluate.scorer_aesthetic import save_tiny_aesthetic

        return save_tiny_aesthetic(out_dir)
    if name == "imagereward":
        from pipeline.evaluate.imagereward import save_tiny_twin as save_tiny_imagereward

        return save_tiny_imagereward(out_dir)
    raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(SCORER_NAMES)}")


def check_batch(name: str, images: list, prompts: list) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{name} scorer: {len(images)} images but {len(prompts)} prompts; give one prompt per image")


# ------------------------------------------------------------------------------------------ open_clip backbones


def load_open_clip(scorer: str, arch: str, pretrained: str | None, *, device: str, key: str,
                   source: str = OPEN_CLIP_SOURCE) -> ClipEmbedder:
    """ClipEmbedder(arch, pretrained) with the scorers' errors: a tag that cannot be fetched or a missing file is
    WeightsNotFound, a file whose state dict does not fit ``arch`` a ValueError listing keys."""
    import open_clip
    import open_clip.factory

    is_tag = bool(pretrained) and arch != TINY_NAME and pretrained in open_clip.list_pretrained_tags_by_model(arch)
    if pretrained and not is_tag and not Path(pretrained).expanduser().is_file():
        raise not_found(scorer, pretrained, source=source, key=key,
                        why=f"neither a file nor a pretrained tag of {arch}")
    try:
        return ClipEmbedder(arch, str(Path(pretrained).expanduser()) if pretrained and not is_tag else pretrained,
                            device=device)
    except RuntimeError as err:
        if is_tag:  # open_clip could not download (or find in its cache) the tag's file
            raise not_found(scorer, pretrained, source=source, key=key, why=str(err)) from err
        if pretrained and "state_dict" in str(err):
            expected = ClipEmbedder(arch, None, device="cpu").model.state_dict()
            got = open_clip.factory.load_state_dict(pretrained)  # open_clip's own reading ('state_dict', 'module.')
            check_state_dict(expected, got, scorer=scorer, path=pretrained, source=source, key=key, arch=arch)
        raise


def save_tiny_open_clip(path: Path, seed: int = TWIN_SEED) -> Path:
    """The project's tiny open_clip architecture with random weights drawn under ``seed`` (not ClipEmbedder's
    seed, so a test can tell the file was loaded), as an open_clip weights file: a plain state dict. Stored in
    float16, which open_clip casts back on loading, to keep twins under 5 MB."""
    import open_clip

    model = seeded(lambda: open_clip.create_model(_register_tiny(), pretrained=None), seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}, path)
    return path


def seeded(make, seed: int = TWIN_SEED):
    """Build a twin's module under its own seed, leaving the caller's random state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# ---------------------------------------------------------------------------------------------------- scorers


class ClipScorer:
    """CLIPScore (Hessel et al. 2021, with torchmetrics' weight 100): 100 * max(cos(image, text), 0)."""

    name = "clip"

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder

    @classmethod
    def load(cls, *, weights: str | None = None, arch: str | None = None, device: str = "cpu") -> "ClipScorer":
        return cls(load_open_clip("clip", arch or TINY_NAME, weights, device=device, key="weights"))

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        check_batch(self.name, images, prompts)
        if not images:
            return np.zeros(0, dtype=np.float64)
        cosine = (self.embedder.embed_images(images) * self.embedder.embed_texts(prompts)).sum(-1)
        return (100.0 * cosine.clamp(min=0)).double().numpy()


class StyleScorer:
    """The toy world's style scorer: each image's score of the target style, in [0, 1]; prompts are not used."""

    name = "style"

    def __init__(self, target_style: str = "sketch"):
        if target_style not in STYLES:
            raise ValueError(f"style scorer: unknown target style {target_style!r}; accepted: {', '.join(STYLES)}")
        self.target_style = target_style

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        check_batch(self.name, images, prompts)
        if not images:
            return np.zeros(0, dtype=np.float64)
        return target_style_score(images, self.target_style).astype(np.float64)

    def classes(self, images: list[Image.Image]) -> list[str]:
        """The toy style (STYLES) each image is classified as."""
        return [classify_style(image) for image in images]
