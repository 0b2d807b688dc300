"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

As published (simple_inference.py): OpenAI CLIP ViT-L/14 image embeddings, L2-normalised, into an MLP of five
linear layers with dropout between the first four and no activations; the head file
(sac+logos+ava1-l14-linearMSE.pth) is a plain state dict (layers.0, .2, .4, .6, .7). The score is on the AVA
1-10 scale (about 5-6 for ordinary photos). Prompts are not used.

The backbone is OpenAI's CLIP, trained with QuickGELU: the published architecture is open_clip's
ViT-L-14-quickgelu, with the tag "openai" or that model's open_clip-format weights file. (open_clip's plain
ViT-L-14 is GELU: the same tensors loaded into it give other embeddings, and scores that are off with no error.)
OpenAI's own TorchScript ViT-L-14.pt is not that file. An ``arch`` other than the published one scores another
CLIP's embeddings, so its ``backbone`` must be named.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.evaluate.scorer_weights import WeightsNotFound, check_state_dict, read_torch_file, resolve_file
from pipeline.evaluate.scorers import TINY_NAME, check_batch, load_open_clip, save_tiny_open_clip, seeded

SOURCE = ("sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/improved-aesthetic-predictor "
          "(raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth)")
BACKBONE_SOURCE = ("OpenAI CLIP ViT-L/14: the open_clip pretrained tag 'openai' (open_clip fetches it), or its "
                   "open_clip-format weights file (open_clip_pytorch_model.bin of the hub repo "
                   "timm/vit_large_patch14_clip_224.openai)")
PUBLISHED_ARCH, PUBLISHED_BACKBONE = "ViT-L-14-quickgelu", "openai"
# Arch names that mean the published CLIP, so the published backbone is their default ("ViT-L-14" with "openai"
# is built with QuickGELU too: open_clip_build reads the tag's record).
PUBLISHED_ARCH_NAMES = (PUBLISHED_ARCH, "ViT-L-14")


class AestheticHead(nn.Module):
    """The published MLP; its layer indices are the state dict's keys, so they must not move."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticScorer:
    name = "aesthetic"

    def __init__(self, embedder, head: AestheticHead):
        self.embedder = embedder
        self.head = head.eval().requires_grad_(False)

    @classmethod
    def load(cls, *, weights: str | None = None, backbone: str | None = None, arch: str | None = None,
             device: str = "cpu") -> "AestheticScorer":
        path = resolve_file(weights, scorer="aesthetic", source=SOURCE)  # the small file first: fail fast
        state_dict = read_torch_file(path, scorer="aesthetic", source=SOURCE)
        arch = arch or PUBLISHED_ARCH
        embedder = load_open_clip("aesthetic", arch, backbone_for(arch, backbone), device=device, key="backbone",
                                  source=BACKBONE_SOURCE)
        head = AestheticHead(_embedding_width(embedder))
        check_state_dict(head.state_dict(), state_dict, scorer="aesthetic", path=path, source=SOURCE,
                         arch=f"head on {arch} embeddings")
        head.load_state_dict(state_dict)
        return cls(embedder, head.to(embedder.device))

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        check_batch(self.name, images, prompts)
        if not images:
            return np.zeros(0, dtype=np.float64)
        embeddings = self.embedder.embed_images(images).to(self.embedder.device)  # L2-normalised, as published
        return self.head(embeddings).squeeze(-1).double().cpu().numpy()


def backbone_for(arch: str, backbone: str | None) -> str:
    """The backbone to load: the one given, else the published one for the published arch; another arch without a
    backbone would be a randomly initialised CLIP, so it is refused."""
    if backbone:
        return backbone
    if arch in PUBLISHED_ARCH_NAMES:
        return PUBLISHED_BACKBONE
    raise WeightsNotFound(
        f"aesthetic scorer: evaluate.aesthetic.arch={arch!r} is set but evaluate.aesthetic.backbone is not, so the "
        f"CLIP would have random weights. Set evaluate.aesthetic.backbone to the weights of the CLIP the head was "
        f"trained on (an open_clip pretrained tag of {arch} or a local open_clip weights file), or unset "
        f"evaluate.aesthetic.arch for the published {BACKBONE_SOURCE}."
    )


def _embedding_width(embedder) -> int:
    return int(embedder.embed_texts([""]).shape[-1])  # CLIP's joint embedding width (768 for ViT-L/14)


def save_tiny_aesthetic(out_dir: Path) -> dict:
    """A head file with the published layer names on the tiny CLIP's embedding width, and its CLIP backbone file."""
    backbone = save_tiny_open_clip(out_dir / "open_clip_tiny.pt", seed=3)
    width = int(torch.load(backbone, map_location="cpu", weights_only=True)["text_projection"].shape[-1])
    head = seeded(lambda: AestheticHead(width), seed=4)
    path = out_dir / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return {"weights": str(path), "backbone": str(backbone), "arch": TINY_NAME}
