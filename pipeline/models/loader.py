"""Load SDXL / SD1.5 components from a local diffusers pipeline folder or a hub id, one component at a time.

Each stage loads only what it uses (training: unet + scheduler; precompute: vae + text encoders), through the
component classes' own `from_pretrained(..., subfolder=...)`, so a local folder and a hub id take the same path
and diffusers / transformers handle variants, dtypes and caching.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import huggingface_hub
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Kind = Literal["sdxl", "sd15"]
ALL_PARTS = ("unet", "vae", "text", "scheduler")

# Pipeline classes (model_index.json "_class_name") whose folders hold the components this loader reads.
KIND_OF_PIPELINE: dict[str, Kind] = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd15"}

# (text encoder folder, tokenizer folder, encoder class) per kind, in the order the pipelines concatenate them.
TEXT_PARTS = {
    "sd15": [("text_encoder", "tokenizer", CLIPTextModel)],
    "sdxl": [
        ("text_encoder", "tokenizer", CLIPTextModel),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
    ],
}

# Files up to this size are hashed whole; bigger ones (real checkpoints are several GB) by samples, see below.
FULL_HASH_MAX_BYTES = 64 * 2**20
SAMPLE_BYTES = 2**20
NUM_SAMPLES = 17

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    """The model folder or hub repository could not be found or read."""


@dataclass
class DiffusionComponents:
    kind: Kind
    source: str
    unet: UNet2DConditionModel | None = None
    vae: AutoencoderKL | None = None
    text_encoders: list = field(default_factory=list)  # SDXL: [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list = field(default_factory=list)  # CLIPTokenizer per text encoder
    scheduler: DDPMScheduler | None = None  # the training noise schedule


def load_components(
    pretrained: str,
    *,
    kind: Literal["auto", "sdxl", "sd15"] = "auto",
    parts: tuple[str, ...] = ALL_PARTS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    variant: str | None = None,
) -> DiffusionComponents:
    """Load the `parts` (any of "unet", "vae", "text", "scheduler") of a pipeline; the others stay None / [].

    `pretrained` is a local diffusers pipeline folder or a hub id; `variant` picks weight files such as
    `*.fp16.safetensors`. Models come back in eval mode on `device` in `dtype`; freezing is the caller's choice.
    """
    unknown = sorted(set(parts) - set(ALL_PARTS))
    if unknown:
        raise ValueError(f"Unknown model parts {unknown}; choose from {list(ALL_PARTS)}.")
    model_index = json.loads(_model_index_path(pretrained, revision).read_text())
    kind = _resolve_kind(kind, model_index, pretrained)
    components = DiffusionComponents(kind=kind, source=pretrained)
    if _is_local(pretrained):
        pretrained = str(Path(pretrained).expanduser())  # from_pretrained does not expand "~"
    weights = dict(revision=revision, variant=variant)
    if "unet" in parts:
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", torch_dtype=dtype, **weights)
        components.unet = unet.to(device)
    if "vae" in parts:
        vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype, **weights)
        components.vae = vae.to(device)
    if "text" in parts:
        for encoder_folder, tokenizer_folder, encoder_class in TEXT_PARTS[kind]:
            encoder = encoder_class.from_pretrained(pretrained, subfolder=encoder_folder, dtype=dtype, **weights)
            components.text_encoders.append(encoder.to(device))
            components.tokenizers.append(
                CLIPTokenizer.from_pretrained(pretrained, subfolder=tokenizer_folder, revision=revision)
            )
    if "scheduler" in parts:
        # Whatever sampler the folder names (SDXL: Euler), training adds noise with DDPM's schedule from its config.
        components.scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
    return components


def detect_kind(pretrained: str, revision: str | None = None) -> Kind:
    """"sdxl" or "sd15", from the pipeline class named in the folder's or repo's model_index.json."""
    model_index = json.loads(_model_index_path(pretrained, revision).read_text())
    return _resolve_kind("auto", model_index, pretrained)


def model_identity(pretrained: str, *, revision: str | None = None) -> dict:
    """What a feature store or checkpoint records to know which model made it: `source`, `kind`, `sha256`.

    Hub ids: the sha256 covers the repo id and the git commit the revision resolves to (read from the cache
    offline); a hub commit fixes every config and weight file, so nothing has to be read or downloaded.
    Local folders: the sha256 covers model_index.json and every file of every component folder it lists, by
    relative path and content. Files up to 64 MiB (configs, tokenizers, tiny models) are hashed whole. Bigger
    weight files are hashed by their size and 17 evenly spaced 1 MiB samples (the first holds the safetensors
    header: tensor names, dtypes, shapes), because hashing a multi-GB checkpoint takes tens of seconds. A fine-tune
    changes nearly every tensor and so changes the samples; an in-place edit of a few tensors in a big file may not.
    """
    index_path = _model_index_path(pretrained, revision)
    model_index = json.loads(index_path.read_text())
    kind = _resolve_kind("auto", model_index, pretrained)
    if _is_local(pretrained):
        folders = [name for name, value in model_index.items() if isinstance(value, list) and value[0] is not None]
        return {"source": pretrained, "kind": kind, "sha256": _folder_digest(index_path.parent, folders)}
    commit = index_path.parent.name  # the hub cache keeps files under snapshots/<commit>/
    digest = hashlib.sha256(f"{pretrained}@{commit}".encode()).hexdigest()
    return {"source": pretrained, "kind": kind, "sha256": digest, "commit": commit}


def _is_local(pretrained: str) -> bool:
    return Path(pretrained).expanduser().exists()


def _model_index_path(pretrained: str, revision: str | None) -> Path:
    """The local path of model_index.json: in the folder, or fetched from the hub (the cache when offline)."""
    folder = Path(pretrained).expanduser()
    if folder.exists():
        index = folder / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"{folder} has no model_index.json, so it is not a diffusers pipeline folder. Pass a folder written "
                f"by DiffusionPipeline.save_pretrained (or downloaded with `hf download <repo> --local-dir ...`)."
            )
        return index
    if not _HUB_ID.match(pretrained):
        raise ModelNotFoundError(
            f"Model {pretrained!r} not found: there is no folder {folder.resolve()} and it is not a hub id "
            f"(owner/name). Set model.pretrained to a diffusers pipeline folder or a hub id."
        )
    try:
        return Path(huggingface_hub.hf_hub_download(pretrained, "model_index.json", revision=revision))
    except Exception as err:  # offline, unknown repo or revision, gated repo, network: all mean "cannot use it"
        offline = " in offline mode (HF_HUB_OFFLINE=1)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        download = f"hf download {pretrained}" + (f" --revision {revision}" if revision else "")
        raise ModelNotFoundError(
            f"Model {pretrained!r} is neither a local folder ({folder.resolve()} does not exist) nor a hub repo "
            f"that could be fetched{offline}: {type(err).__name__}: {err} To use the hub model, download it into "
            f"the hub cache where there is network (`{download}`); otherwise set model.pretrained to a local "
            f"pipeline folder."
        ) from err


def _resolve_kind(kind: str, model_index: dict, pretrained: str) -> Kind:
    pipeline_class = model_index.get("_class_name")
    detected = KIND_OF_PIPELINE.get(pipeline_class)
    if kind == "auto":
        if detected is None:
            raise ValueError(
                f"{pretrained}: model_index.json names pipeline {pipeline_class!r}; only "
                f"{sorted(KIND_OF_PIPELINE)} are recognised. If its components match one of them, set model.kind "
                f"to 'sdxl' or 'sd15'."
            )
        return detected
    if kind not in TEXT_PARTS:
        raise ValueError(f"Unknown model kind {kind!r}; choose 'auto', 'sdxl' or 'sd15'.")
    if detected is not None and detected != kind:
        raise ValueError(
            f"model.kind is {kind!r} but {pretrained} is a {pipeline_class} ({detected}). "
            f"Set model.kind to 'auto' or {detected!r}."
        )
    return kind


def _folder_digest(folder: Path, component_folders: list[str]) -> str:
    files = [folder / "model_index.json"]
    for name in sorted(component_folders):
        files += sorted(path for path in (folder / name).rglob("*") if path.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{_file_digest(path)}\n".encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_MAX_BYTES:
            while chunk := f.read(SAMPLE_BYTES):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(f"size={size}".encode())
        span = max(size - SAMPLE_BYTES, 0)
        for i in range(NUM_SAMPLES):
            f.seek(i * span // (NUM_SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return "sampled:" + digest.hexdigest()
