"""OpenCLIP text and image embeddings for RPO's similarity weights and for evaluation.

"tiny" is a small OpenCLIP architecture with seeded random weights: identical in every process, so tests and
laptop runs work offline. Any other name is an open_clip model (e.g. "ViT-H-14" with pretrained="laion2b_s32b_b79k",
or a local weights file) and takes the same code path.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from functools import cached_property
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

TINY_NAME = "tiny"
# Registered with open_clip under a name no built-in model uses.
TINY_OPEN_CLIP_NAME = "rpo-pipeline-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_SEED = 0


class ClipEmbedder:
    """Float32, L2-normalised CLIP embeddings of texts and PIL images, returned on the CPU."""

    def __init__(self, model_name: str = TINY_NAME, pretrained: str | None = None, *, device: str = "cpu"):
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        open_clip_name = _register_tiny() if model_name == TINY_NAME else model_name
        # Seeded so that randomly initialised weights (the tiny model) are the same in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_SEED)
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                open_clip_name, pretrained=pretrained, device=self.device
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(open_clip_name)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return _normalised(self.model.encode_text(tokens))

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        return _normalised(self.model.encode_image(pixels))

    @cached_property
    def identity(self) -> dict:
        """Which CLIP made an embedding: name, pretrained tag or file, and a sha256 of the weights."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return {"name": self.model_name, "pretrained": self.pretrained, "sha256": digest.hexdigest()}


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=-1).cpu()


def _register_tiny() -> str:
    """Add the tiny architecture to open_clip's registry once per process (it only reads configs from files)."""
    if TINY_OPEN_CLIP_NAME not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as folder:
            config_file = Path(folder) / f"{TINY_OPEN_CLIP_NAME}.json"
            config_file.write_text(json.dumps(TINY_CONFIG))
            open_clip.add_model_config(config_file)
    return TINY_OPEN_CLIP_NAME
