"""Reward scorers behind one interface: ``scorer.score(images, prompts) -> float64 [N]``, one value per image.

    scorer = build_scorer("pickscore", weights="/models/PickScore_v1")
    scorer.score([image_a, image_b], ["a cat", "a cat"])          # array([21.3, 20.7])

What the three config fields (evaluate.<name>.weights / backbone / arch) mean for each scorer:

- clip: weights = an open_clip pretrained tag, a local open_clip weights file, or "random" (seeded random weights,
  said explicitly: unset is an error); arch = an open_clip model name, or "tiny" (the project's tiny OpenCLIP,
  pipeline/models/clip.py).
- pickscore: weights = a CLIPModel folder or hub id; backbone = the processor's folder or hub id (default
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K, as published); processor files beside the weights are ignored.
- hpsv2: weights = the HPS checkpoint file or owner/repo/file; arch = the open_clip model (default ViT-H-14).
- aesthetic: weights = the MLP head .pth or owner/repo/file; backbone = the CLIP's open_clip tag or weights file
  (default "openai"); arch = the CLIP's open_clip model (default ViT-L-14-quickgelu, OpenAI's architecture); an
  arch other than the published one needs its backbone named.
- imagereward: see pipeline/evaluate/imagereward.py. style: no weights (the toy world's hand-made scorer).

Every open_clip model is built with the activation its weights were trained with (pipeline.models.clip.
open_clip_build): QuickGELU for OpenAI's tags, which open_clip's plain names (ViT-L-14) would build with GELU.

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
from pipeline.models.clip import RANDOM, SCHEMA_PREFIXES, TINY_NAME, ClipEmbedder, _register_tiny, open_clip_on_meta

__all__ = ["Scorer", "WeightsNotFound", "build_scorer", "save_tiny_twin", "ClipScorer", "StyleScorer"]

OPEN_CLIP_SOURCE = "an open_clip pretrained tag of the model (open_clip.list_pretrained()) or a local weights file"
CLIP_SCORER_SOURCE = (f"{OPEN_CLIP_SOURCE} (an open_clip-format state dict), or {RANDOM!r} for seeded random weights "
                      f"(tests only: the scores then mean nothing)")
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
                   source: str = OPEN_CLIP_SOURCE, random_ok: bool = False) -> ClipEmbedder:
    """ClipEmbedder(arch, pretrained) with the scorers' errors, naming evaluate.<scorer>.<key>: weights not given,
    a tag that cannot be fetched or a missing file is WeightsNotFound; a file whose state dict does not fit ``arch``
    a ValueError listing keys; anything else ClipEmbedder refuses (a TorchScript file, an unknown model) a
    ValueError with its reason. "random" is accepted only where ``random_ok`` (never for a reward model's backbone)."""
    import open_clip.factory

    pretrained, is_file = open_clip_weights(scorer, arch, pretrained, key=key, source=source, random_ok=random_ok)
    try:
        return ClipEmbedder(arch, pretrained, device=device)
    except ValueError as err:  # ClipEmbedder's own refusal says what is wrong and what to give
        raise open_clip_refusal(scorer, arch, pretrained, err, key=key, source=source) from err
    except RuntimeError as err:
        if not is_file:  # open_clip could not download (or find in its cache) the tag's file
            raise not_found(scorer, pretrained, source=source, key=key, why=str(err)) from err
        if "state_dict" in str(err):
            expected = open_clip_on_meta(arch, pretrained).state_dict()  # names and shapes only
            got = open_clip.factory.load_state_dict(pretrained)  # open_clip's own reading ('state_dict', 'module.')
            check_state_dict(expected, got, scorer=scorer, path=pretrained, source=source, key=key, arch=arch)
        raise


def open_clip_weights(scorer: str, arch: str, pretrained: str | None, *, key: str, source: str = OPEN_CLIP_SOURCE,
                      random_ok: bool = False) -> tuple[str | None, bool]:
    """What load_open_clip refuses before building anything (weights not given, "random" where it is not allowed,
    a file that is not there); returns (pretrained, whether it is a local file), a file's path expanded."""
    where = f"evaluate.{scorer}.{key}"
    schema = arch.startswith(SCHEMA_PREFIXES)  # "hf-hub:org/repo": the weights come with the name
    if not pretrained and not schema:
        raise not_found(scorer, pretrained, source=source, key=key)
    if pretrained == RANDOM and not random_ok:
        raise ValueError(f"{scorer} scorer: {where}={RANDOM!r} would score with a random CLIP; give {source}")
    is_file = bool(pretrained) and pretrained != RANDOM and not schema and not is_open_clip_tag(arch, pretrained)
    if is_file:
        if not Path(pretrained).expanduser().is_file():
            raise not_found(scorer, pretrained, source=source, key=key,
                            why=f"neither a file nor a pretrained tag of {arch}")
        pretrained = str(Path(pretrained).expanduser())
    return pretrained, is_file


def open_clip_refusal(scorer: str, arch: str, pretrained: str | None, err: ValueError, *, key: str,
                      source: str = OPEN_CLIP_SOURCE) -> ValueError:
    """open_clip_build's refusal (an unknown model, a TorchScript file) in the scorers' words."""
    return ValueError(f"{scorer} scorer (evaluate.{scorer}.arch={arch!r}, evaluate.{scorer}.{key}={pretrained!r}): "
                      f"{err}. Expected {source}.")


def is_open_clip_tag(arch: str, pretrained: str) -> bool:
    """``pretrained`` is one of open_clip's pretrained tags of ``arch`` (the tiny model has none)."""
    import open_clip

    return arch != TINY_NAME and open_clip.is_pretrained_cfg(arch, pretrained)


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


def no_clip_weights(arch: str) -> WeightsNotFound:
    return WeightsNotFound(
        f"clip scorer: no CLIP weights named for {arch!r} (evaluate.clip.weights; in a run it defaults to "
        f"model.clip_pretrained). Give {CLIP_SCORER_SOURCE}, e.g. --set evaluate.clip.weights={RANDOM}"
    )


class ClipScorer:
    """CLIPScore (Hessel et al. 2021, with torchmetrics' weight 100): 100 * max(cos(image, text), 0)."""

    name = "clip"

    def __init__(self, embedder: ClipEmbedder):
        self.embedder = embedder

    @classmethod
    def load(cls, *, weights: str | None = None, arch: str | None = None, device: str = "cpu") -> "ClipScorer":
        """``weights``: an open_clip tag of ``arch``, a local weights file, or "random"; never random by default."""
        arch = arch or TINY_NAME
        if not weights and not arch.startswith(SCHEMA_PREFIXES):
            raise no_clip_weights(arch)
        return cls(load_open_clip("clip", arch, weights, device=device, key="weights", source=CLIP_SCORER_SOURCE,
                                  random_ok=True))

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
