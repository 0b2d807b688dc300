"""Which diffusers pipeline a model tag means, and loading it with diffusers' own loaders.

A model is given as a location: "base" (the run's base pipeline), a diffusers pipeline folder or hub id, a UNet folder
(a full fine-tune's output), or a LoRA folder / .safetensors file (applied to the base pipeline). Loading uses only
`from_pretrained` and `load_lora_weights`, which also proves that training's outputs load with no code of ours.
The run's base pipeline is loaded at model.revision from model.variant's weight files, as precompute and training
load it; a spec carries them, so every actor loads the very files the feature store was made from.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.fs as pafs
import torch

from pipeline.storage import filesystem, is_local

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class ModelSpec:
    tag: str
    kind: str  # "pipeline" | "unet" | "lora"
    path: str  # the pipeline (hub id or folder), UNet folder or LoRA file/folder
    base: str  # the base pipeline that a UNet or LoRA goes into (== path for "pipeline")
    fingerprint: str  # changes when the files change: a re-run regenerates only then
    # How ``base`` is loaded: model.revision / model.variant when it is the run's base model; None (the default
    # files) for another pipeline named as a location.
    revision: str | None = None
    variant: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_model(tag: str, location: str, base: str, *, revision: str | None = None,
                  variant: str | None = None) -> ModelSpec:
    """What ``location`` holds. Remote (s3://, gs://) folders are copied to a local cache first. ``revision`` and
    ``variant`` are the run's base model's (model.revision / model.variant): a spec whose base pipeline is ``base``
    carries them."""
    spec = _resolve(tag, location, base)
    if _same_model(spec.base, base):
        spec = replace(spec, revision=revision, variant=variant)
    return spec


def _same_model(a: str, b: str) -> bool:
    """Whether two locations name one pipeline (a hub id as given, a local folder after resolving it)."""
    if Path(a).expanduser().exists() and Path(b).expanduser().exists():
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b


def _resolve(tag: str, location: str, base: str) -> ModelSpec:
    if location == "base":
        location = base
    if not is_local(location):
        location = str(local_copy(location))
    path = Path(location).expanduser()
    if not path.exists():
        if location.count("/") == 1 and not location.startswith((".", "/")):  # a hub id: only pipelines
            return ModelSpec(tag, "pipeline", location, location, f"hub:{location}")
        raise FileNotFoundError(
            f"model {tag!r}: {location} does not exist; give a diffusers pipeline folder or hub id, a UNet folder "
            f"(a full fine-tune's output) or a LoRA folder / .safetensors file"
        )
    path = path.resolve()
    if path.is_file() and path.suffix == ".safetensors":
        return ModelSpec(tag, "lora", str(path), base, _fingerprint(path))
    if (path / "model_index.json").is_file():
        return ModelSpec(tag, "pipeline", str(path), str(path), _fingerprint(path))
    if (path / "config.json").is_file() and any((path / f).is_file() for f in UNET_WEIGHT_FILES):
        return ModelSpec(tag, "unet", str(path), base, _fingerprint(path))
    if (path / LORA_FILE).is_file():
        return ModelSpec(tag, "lora", str(path / LORA_FILE), base, _fingerprint(path / LORA_FILE))
    raise ValueError(
        f"model {tag!r}: {path} holds neither a diffusers pipeline (model_index.json), a UNet (config.json + "
        f"{UNET_WEIGHT_FILES[0]}) nor a LoRA ({LORA_FILE})"
    )


def local_copy(uri: str) -> Path:
    """A local copy of a remote model folder or file, cached by URI (diffusers reads local paths or hub ids)."""
    fs, path = filesystem(uri)
    target = Path(tempfile.gettempdir()) / "rpo-pipeline" / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"model {uri} does not exist")
    if info.type == pafs.FileType.File:
        target = target / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return target
    target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def _fingerprint(path: Path) -> str:
    """A content hash of the model's weights and configs (big files sampled, as the feature store hashes models), so
    a re-exported but identical model reuses its images and a changed one regenerates them."""
    from pipeline.models.loader import _file_digest

    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_run_record(p))
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{_file_digest(file)}\n".encode())
    return digest.hexdigest()[:16]


def _is_run_record(file: Path) -> bool:
    """Training writes these beside the weights on every run; they do not change what the model draws."""
    return file.name in ("align_config.json", "final_metrics.json")


def load_base(path: str, *, revision: str | None, variant: str | None, dtype: torch.dtype, device: torch.device,
              scheduler: str = ""):
    """A diffusers text-to-image pipeline folder or hub id at ``revision``, from ``variant``'s weight files (None:
    the default files), on ``device`` in ``dtype``, progress bars off."""
    import diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, revision=revision, variant=variant)
    if scheduler:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # scorers judge the images; a filter would blank some of them
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def with_model(base, spec: ModelSpec):
    """``base`` with ``spec``'s UNet or LoRA in it, sharing the VAE and text encoders (one copy of each per actor)."""
    import copy

    from diffusers import UNet2DConditionModel

    if spec.kind == "pipeline":
        return base
    if spec.kind == "unet":
        unet = UNet2DConditionModel.from_pretrained(spec.path, torch_dtype=base.unet.dtype).to(base.device)
    else:
        unet = copy.deepcopy(base.unet)  # the LoRA goes into a copy; the base keeps its own weights
    pipe = type(base)(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    if spec.kind == "lora":
        pipe.load_lora_weights(str(Path(spec.path).parent), weight_name=Path(spec.path).name)
    return pipe


def check_scheduler(name: str) -> None:
    """Before any model loads: generate.scheduler must name a diffusers scheduler class."""
    if not name:
        return
    import diffusers
    from diffusers import SchedulerMixin

    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ValueError(f"generate.scheduler {name!r} is not a diffusers scheduler; e.g. {', '.join(known[:12])}")
