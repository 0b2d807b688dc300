"""OpenCLIP text and image embeddings for RPO's similarity weights and for evaluation.

The weights are always named, as ``pretrained``:
- an open_clip pretrained tag of the model (``open_clip.list_pretrained_tags_by_model(name)``), e.g. "ViT-H-14" with
  "laion2b_s32b_b79k";
- a local open_clip weights file (a state dict, as ``torch.save(model.state_dict())`` or the hub's
  open_clip_pytorch_model.bin); OpenAI's original TorchScript release (ViT-L-14.pt) is refused with what to give;
- "random": seeded random weights, identical in every process (tests and offline laptop runs).
None is an error: random weights as a silent fallback make similarity weights and scores that mean nothing.
"tiny" is a small OpenCLIP architecture registered by this module; open_clip's "hf-hub:" / "local-dir:" model names
carry their own weights and take pretrained=None.

The activation: OpenAI's weights (and a few early LAION ones) were trained with QuickGELU, while open_clip's plain
model names (ViT-L-14) build GELU; the weights load into either, and the wrong one only gives a warning and wrong
embeddings. ``open_clip_build`` reads the tag's own record in open_clip's table and builds QuickGELU where the
weights were trained with it. A local file cannot say which it was trained with: for OpenAI weights in a file, name
the "-quickgelu" model (e.g. ViT-L-14-quickgelu).
"""

from __future__ import annotations

import hashlib
import logging
import json
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
RANDOM = "random"  # pretrained value: seeded random weights, said explicitly
SCHEMA_PREFIXES = ("hf-hub:", "local-dir:")  # open_clip model names whose weights come with the name
WHAT_TO_GIVE = 'an open_clip pretrained tag of the model, a local open_clip weights file, or "random"'


@dataclass(frozen=True)
class OpenClipBuild:
    """What open_clip builds for a (model name, pretrained) pair: its registered name, the tag or file to load (None:
    no weights file, i.e. random weights or a schema name's own), and whether the activation is QuickGELU."""

    open_clip_name: str
    pretrained: str | None
    quick_gelu: bool


def open_clip_build(model_name: str, pretrained: str | None) -> OpenClipBuild:
    """The architecture and weights for ``model_name`` with ``pretrained`` (see the module docstring); a ValueError
    that says what to give when the pair cannot be built as meant."""
    if model_name.startswith(SCHEMA_PREFIXES):
        if pretrained is not None:
            raise ValueError(f"CLIP {model_name!r} brings its own weights (open_clip ignores pretrained for it); "
                             f"leave pretrained unset instead of {pretrained!r}")
        return OpenClipBuild(model_name, None, False)  # its own config says which activation
    name = _register_tiny() if model_name == TINY_NAME else model_name
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"CLIP {model_name!r} is not an open_clip model (open_clip.list_models() lists them) nor "
                         f"{TINY_NAME!r}, the project's tiny one")
    named_quick_gelu = bool(config.get("quick_gelu", False))  # the "-quickgelu" names
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained is None:
        raise ValueError(f"no weights named for CLIP {model_name!r}: give {WHAT_TO_GIVE} for seeded random weights "
                         f"(tests only){_tag_list(tags)}")
    if pretrained == RANDOM:
        return OpenClipBuild(name, None, named_quick_gelu)
    if open_clip.is_pretrained_cfg(name, pretrained):
        trained_quick_gelu = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        return OpenClipBuild(name, pretrained, named_quick_gelu or trained_quick_gelu)
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise ValueError(f"CLIP weights {pretrained!r} for {model_name!r}: neither a pretrained tag of it nor a file; "
                         f"give {WHAT_TO_GIVE}{_tag_list(tags)}")
    if is_torchscript_archive(path):
        raise ValueError(torchscript_problem(path, name))
    return OpenClipBuild(name, str(path), named_quick_gelu)


def open_clip_on_meta(model_name: str, pretrained: str | None = RANDOM) -> torch.nn.Module:
    """The architecture ClipEmbedder builds for (model_name, pretrained), on the meta device: its parameter names
    and shapes without memory, in under a second even for ViT-H-14 (to check a weights file before loading it).
    No weights are read; a tag or file only decides the activation, as in ClipEmbedder. Refuses what it refuses."""
    build = open_clip_build(model_name, pretrained)
    # Both the device context and device=: create_model alone builds on the CPU (16 s for ViT-H-14), then moves.
    with torch.device("meta"), _quiet_when_random(True):  # no weights, by design
        return open_clip.create_model(build.open_clip_name, pretrained=None, force_quick_gelu=build.quick_gelu,
                                      device="meta")


def is_torchscript_archive(path: str | Path) -> bool:
    """A TorchScript archive (torch.jit.save; OpenAI's CLIP release): a zip holding constants.pkl, which a torch.save
    state dict never has (the same test torch.load makes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(Path(entry).name == "constants.pkl" for entry in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def torchscript_problem(path: str | Path, open_clip_name: str) -> str:
    """What is wrong with a TorchScript CLIP file and which file to give instead."""
    hub = open_clip.get_pretrained_cfg(open_clip_name, "openai").get("hf_hub", "").rstrip("/")
    state_dict = (f"open_clip_pytorch_model.bin of the hub repo {hub}" if hub
                  else "torch.save(model.state_dict()) of an open_clip model")
    return (f"{path} is a TorchScript archive (OpenAI's original CLIP release, such as ViT-L-14.pt), not an open_clip "
            f"weights file. Give the open_clip-format state dict instead ({state_dict}), or the pretrained tag "
            f"'openai', which open_clip fetches itself")


@contextmanager
def _quiet_when_random(asked: bool) -> Iterator[None]:
    """open_clip warns "No pretrained weights loaded ... initialized randomly" on the root logger; where random
    weights were asked for by name, that is no news, and a user reading it would think something went wrong."""

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")

    root = logging.getLogger()
    if asked:
        root.addFilter(drop)
    try:
        yield
    finally:
        if asked:
            root.removeFilter(drop)


def _tag_list(tags: list[str]) -> str:
    return f"; its tags: {', '.join(tags)}" if tags else ""


class ClipEmbedder:
    """Float32, L2-normalised CLIP embeddings of texts and PIL images, returned on the CPU."""

    def __init__(self, model_name: str = TINY_NAME, pretrained: str | None = None, *, device: str = "cpu"):
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        build = open_clip_build(model_name, pretrained)
        self.quick_gelu = build.quick_gelu
        # Seeded so that random weights are the same in every process (and the caller's RNG is left alone).
        with torch.random.fork_rng(devices=[]), _quiet_when_random(pretrained == RANDOM):
            torch.manual_seed(TINY_SEED)
            model, _, self.preprocess = open_clip.create_model_and_transforms(
                build.open_clip_name, pretrained=build.pretrained, force_quick_gelu=build.quick_gelu,
                device=self.device,
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(build.open_clip_name)

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
        """Which CLIP made an embedding: name, pretrained (a tag, a file or "random") and a sha256 of the weights."""
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
