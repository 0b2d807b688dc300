"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on human preferences.

As published (tgxs002/HPSv2, hpsv2/img_score.py): the checkpoint is a dict whose 'state_dict' holds the whole CLIP
model, loaded strictly into open_clip's ViT-H-14; images go through its "light augmentation" validation transform
(the longer side resized to 224, bicubic, zero-padded to a square, no crop); the score is the diagonal of
image_features @ text_features.T on L2-normalised features, i.e. cos(image, text) (no logit scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from pipeline.evaluate.scorer_weights import check_state_dict, read_torch_file, resolve_file
from pipeline.evaluate.scorers import TINY_NAME, check_batch, save_tiny_open_clip
from pipeline.models.clip import RANDOM, ClipEmbedder

SOURCE = ("HPS_v2.1_compressed.pt (or HPS_v2_compressed.pt for HPSv2.0) from the Hugging Face hub repo xswu/HPSv2 "
          "(hub id xswu/HPSv2/HPS_v2.1_compressed.pt)")
PUBLISHED_ARCH = "ViT-H-14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's default; ViT-H-14's config names no other
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class HpsV2Scorer:
    name = "hpsv2"

    def __init__(self, embedder):
        self.embedder = embedder
        visual = embedder.model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(getattr(visual, "image_mean", None) or OPENAI_MEAN)
        self.std = tuple(getattr(visual, "image_std", None) or OPENAI_STD)

    @classmethod
    def load(cls, *, weights: str | None = None, arch: str | None = None, device: str = "cpu") -> "HpsV2Scorer":
        arch = arch or PUBLISHED_ARCH
        path = resolve_file(weights, scorer="hpsv2", source=SOURCE)
        state_dict = hps_state_dict(read_torch_file(path, scorer="hpsv2", source=SOURCE), path)
        try:  # the bare architecture, explicitly random: the checkpoint replaces every tensor (key set checked below)
            embedder = ClipEmbedder(arch, RANDOM, device=device)  # ViT-H-14 as named: GELU, as HPS was trained
        except ValueError as err:
            raise arch_refusal(arch, err) from err
        check_state_dict(embedder.model.state_dict(), state_dict, scorer="hpsv2", path=path, source=SOURCE, arch=arch)
        embedder.model.load_state_dict(state_dict)  # a float16 file is cast to float32
        return cls(embedder)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """HPS's validation transform: longer side to image_size, centred on a zero (black) square, normalised."""
        x = TF.to_tensor(image.convert("RGB"))
        height, width = x.shape[1:]
        scale = self.image_size / max(height, width)
        if scale != 1.0:
            new_h, new_w = round(height * scale), round(width * scale)
            x = TF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC)
            pad_h, pad_w = self.image_size - new_h, self.image_size - new_w
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        return TF.normalize(x, self.mean, self.std)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        check_batch(self.name, images, prompts)
        if not images:
            return np.zeros(0, dtype=np.float64)
        model = self.embedder.model
        pixels = torch.stack([self.pixels(image) for image in images]).to(self.embedder.device)
        image_features = F.normalize(model.encode_image(pixels).float(), dim=-1).cpu()
        text_features = self.embedder.embed_texts(prompts)  # L2-normalised, float32, on the CPU
        return (image_features * text_features).sum(-1).double().numpy()


def hps_state_dict(checkpoint, path) -> dict:
    """The CLIP state dict in an HPS checkpoint: the published file is a dict whose 'state_dict' holds it."""
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"hpsv2 scorer: {path} is not an HPS checkpoint (a dict with a 'state_dict' key). "
                         f"Expected {SOURCE}; set evaluate.hpsv2.weights to that file.")
    return checkpoint["state_dict"]


def arch_refusal(arch: str, err: ValueError) -> ValueError:
    return ValueError(f"hpsv2 scorer: evaluate.hpsv2.arch={arch!r}: {err}")


def save_tiny_hpsv2(out_dir: Path) -> dict:
    """A checkpoint like HPS_v2.1_compressed.pt ({'state_dict': float16 tensors}) for the tiny open_clip arch."""
    plain = save_tiny_open_clip(out_dir / ".hps_state_dict.pt", seed=2)
    state_dict = torch.load(plain, map_location="cpu", weights_only=True)
    plain.unlink()
    path = out_dir / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": state_dict}, path)
    return {"weights": str(path), "backbone": None, "arch": TINY_NAME}
