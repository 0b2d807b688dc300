"""The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor).

As published (simple_inference.py): OpenAI CLIP ViT-L/14 image embeddings, L2-normalised, into an MLP of five
linear layers with dropout between the first four and no activations; the head file
(sac+logos+ava1-l14-linearMSE.pth) is a plain state dict (layers.0, .2, .4, .6, .7). The score is on the AVA
1-10 scale (about 5-6 for ordinary photos). Prompts are not used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from pipeline.evaluate.scorer_weights import check_state_dict, read_torch_file, resolve_file
from pipeline.evaluate.scorers import TINY_NAME, check_batch, load_open_clip, save_tiny_open_clip, seeded

SOURCE = ("sac+logos+ava1-l14-linearMSE.pth from https://github.com/christophschuhmann/improved-aesthetic-predictor "
          "(raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth)")
BACKBONE_SOURCE = "OpenAI CLIP ViT-L/14: open_clip arch ViT-L-14 with pretrained tag 'openai', or that weights file"
PUBLISHED_ARCH, PUBLISHED_BACKBONE = "ViT-L-14", "openai"


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
        pretrained = backbone or (PUBLISHED_BACKBONE if arch == PUBLISHED_ARCH else None)
        embedder = load_open_clip("aesthetic", arch, pretrained, device=device, key="backbone", source=BACKBONE_SOURCE)
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
