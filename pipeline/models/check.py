"""Check a base model before any GPU hour: does it resolve, does every component the stages load build, and do its
weight files hold the tensors that architecture has? Nothing is loaded: models are built on the meta device from
their config.json, weight files are read only as far as their safetensors header (tensor names, dtypes, shapes).

    check_pipeline("/models/sdxl")                                   # a local diffusers pipeline folder
    check_pipeline("stabilityai/stable-diffusion-xl-base-1.0", offline=True)   # the shipped architecture
    check_pipeline("stabilityai/stable-diffusion-xl-base-1.0", revision="main", variant="fp16")   # asks the hub

A local folder or an online hub repo goes through the same checks (`_Folder` / `_HubRepo` answer the same
questions); offline, a hub id can only be built from the architecture the project ships for it (architectures.py).
Weight files are looked up as diffusers / transformers look them up for `variant`, so a check that passes finds the
files `load_components` will load. "toy" and "tiny" are the caller's: resolve them to their folders first.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.models.architectures import (
    ARCHITECTURES,
    COMPONENT_CLASSES,
    DIFFUSERS_COMPONENTS,
    HUB_IDS,
    PUBLISHED_PARAMETERS,
    PUBLISHED_VARIANTS,
    build_on_meta,
    count_parameters,
)
from pipeline.models.loader import KIND_OF_PIPELINE, TEXT_PARTS

PIPELINE_CLASS = {kind: name for name, kind in KIND_OF_PIPELINE.items()}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the loader tells a hub id
_MAX_HEADER_BYTES = 100 * 2**20  # real headers are well under 1 MiB; more means the file is not safetensors
_EXAMPLES = 3  # keys named per kind of mismatch


@dataclass
class ComponentCheck:
    component: str  # "pipeline", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", ..., "scheduler"
    cls: str
    parameters: int | None
    ok: bool
    found: str
    problem: str | None = None
    fix: str | None = None


class _Failed(Exception):
    """One component's check failed: what is wrong and what to do."""

    def __init__(self, problem: str, fix: str, parameters: int | None = None):
        super().__init__(problem)
        self.problem, self.fix, self.parameters = problem, fix, parameters


def check_pipeline(pretrained: str, *, kind: str = "auto", revision: str | None = None, variant: str | None = None,
                   offline: bool = False) -> list[ComponentCheck]:
    """One ComponentCheck per thing the stages load: the pipeline (model_index.json), unet, vae, the text encoders,
    their tokenizers and the scheduler config. A failing check says what is wrong (file, keys) and how to fix it."""
    folder = Path(pretrained).expanduser()
    if folder.exists():
        return _check_source(_Folder(folder), kind, variant, published=None)
    if not _HUB_ID.match(pretrained):
        return [_pipeline_failure(
            f"model.pretrained {pretrained!r}: there is no folder {folder.resolve()} and it is not a hub id "
            f"(owner/name)", "set model.pretrained to a diffusers pipeline folder or a hub id")]
    if offline:
        return _check_shipped(pretrained, kind, revision, variant)
    try:
        source = _HubRepo(pretrained, revision)
    except Exception as err:  # unknown repo or revision, gated repo, no network, HF_HUB_OFFLINE: all mean "cannot ask"
        at = f" at revision {revision!r}" if revision else ""
        return [_pipeline_failure(
            f"cannot list the hub repo {pretrained}{at}: {type(err).__name__}: {err}",
            "check model.pretrained and model.revision (and `hf auth login` for a gated repo); without network run "
            f"with --offline, or download it (hf download {pretrained} --local-dir DIR) and set model.pretrained to "
            "DIR")]
    published = PUBLISHED_PARAMETERS[HUB_IDS[pretrained]] if pretrained in HUB_IDS else None
    return _check_source(source, kind, variant, published=published)


# ------------------------------------------------------------------------------------------- the checks


def _check_source(source, kind: str, variant: str | None, *, published: dict[str, int] | None) -> list[ComponentCheck]:
    try:
        pipeline, resolved = _check_model_index(source, kind)
    except Exception as err:  # an unreadable model_index.json
        return [_pipeline_failure(f"{source.where('model_index.json')}: {type(err).__name__}: {err}",
                                  "download or save the pipeline again")]
    checks = [pipeline]
    if resolved is None:
        return checks
    configs: dict[str, Any] = {}  # component -> its built config (defaults filled in), for the conditioning check
    for name in _model_components(resolved):
        checks.append(_guarded(name, COMPONENT_CLASSES[name],
                               lambda name=name: _check_model(source, name, variant, published, configs)))
    for _, tokenizer, _ in TEXT_PARTS[resolved]:
        checks.append(_guarded(tokenizer, "CLIPTokenizer",
                               lambda tokenizer=tokenizer: _check_tokenizer(source, tokenizer)))
    checks.append(_guarded("scheduler", "DDPMScheduler", lambda: _check_scheduler(source)))
    _check_conditioning(resolved, configs, checks)
    return checks


def _check_model_index(source, kind: str) -> tuple[ComponentCheck, str | None]:
    """The pipeline row and the kind it resolves to (None: nothing else can be checked)."""
    where = source.where("model_index.json")
    if not source.has("model_index.json"):
        return _pipeline_failure(
            f"{where} is missing, so this is not a diffusers pipeline",
            "point model.pretrained at a folder written by DiffusionPipeline.save_pretrained (or downloaded with "
            "`hf download <repo> --local-dir DIR`)"), None
    pipeline_class = source.json("model_index.json").get("_class_name")
    detected = KIND_OF_PIPELINE.get(pipeline_class)  # the loader's own table: the check and the loader agree
    if kind not in ("auto", *TEXT_PARTS):
        return _pipeline_failure(f"model.kind is {kind!r}", "set model.kind to auto, sdxl or sd15",
                                 pipeline_class), None
    if detected is None and kind == "auto":
        return _pipeline_failure(
            f"{where} names pipeline {pipeline_class!r}; the loader knows {sorted(KIND_OF_PIPELINE)}",
            "if its components are SDXL's or SD1.5's, set model.kind to sdxl or sd15; otherwise use an SDXL or SD1.5 "
            "pipeline folder", pipeline_class), None
    if detected is not None and kind != "auto" and kind != detected:
        return _pipeline_failure(f"model.kind is {kind!r} but {where} names a {pipeline_class} ({detected})",
                                 f"set model.kind to auto or {detected}", pipeline_class), None
    resolved = detected if kind == "auto" else kind
    how = "" if kind == "auto" else " (model.kind)"
    return ComponentCheck("pipeline", str(pipeline_class), None, True,
                          f"{where}: {pipeline_class}, kind {resolved}{how}"), resolved


def _check_model(source, name: str, variant: str | None, published: dict[str, int] | None,
                 configs: dict[str, Any]) -> ComponentCheck:
    cls = COMPONENT_CLASSES[name]
    config_file = f"{name}/config.json"
    if not source.has(config_file):
        raise _Failed(f"{source.where(config_file)} is missing",
                      f"the pipeline is incomplete: download or save its {name} folder (config.json and weights)")
    config = source.json(config_file)
    try:
        model = build_on_meta(config, name)
    except Exception as err:
        raise _Failed(f"{source.where(config_file)} does not build a {cls}: {type(err).__name__}: {err}",
                      f"replace {name}/ with a {cls} saved by save_pretrained") from err
    configs[name] = model.config
    parameters = count_parameters(model)
    if published is not None and parameters != published[name]:
        raise _Failed(f"{source.where(config_file)} builds {parameters:,} parameters; the published {cls} has "
                      f"{published[name]:,}", f"the repo's {name} is not the published architecture: check "
                      "model.revision, or update pipeline/models/architectures.py if the repo changed", parameters)
    try:
        files, file_format = _find_weights(source, name, variant)
        found = _tensors_in(files, file_format, source)
    except _Failed as failed:
        failed.parameters = parameters
        raise
    described = f"{cls} from {config_file}; {_describe_files(name, files)}"
    if found is None:  # a legacy pickle or a pickle on the hub: only its presence is known
        return ComponentCheck(name, cls, parameters, True, f"{described} (pickle: key names and shapes not checked "
                              "without loading it)")
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    if name in DIFFUSERS_COMPONENTS:
        found = _renamed_deprecated_attention(found, expected)
    mismatch = _compare(expected, found, _ignored_unexpected(model, name))
    if mismatch:
        raise _Failed(f"{_describe_files(name, files, source)} does not hold the {cls} that {config_file} describes: "
                      f"{mismatch}",
                      "the weights belong to another architecture: put back the weight files saved with this "
                      "config.json (save_pretrained writes both), or point model.pretrained at the folder they came "
                      "from", parameters)
    dtypes = ", ".join(sorted({dtype for _, dtype in found.values()}))
    return ComponentCheck(name, cls, parameters, True, f"{described}: {len(found)} tensors ({dtypes}) match")


def _check_tokenizer(source, folder: str) -> ComponentCheck:
    names = set(source.names(folder))
    if "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names:
        present = sorted(names & {"tokenizer.json", "vocab.json", "merges.txt"})
        return ComponentCheck(folder, "CLIPTokenizer", None, True, f"{folder}/: {', '.join(present)}")
    raise _Failed(f"{source.where(folder)} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt)",
                  f"download the pipeline's {folder}/ folder too (a few MB), or save the pipeline again")


def _check_scheduler(source) -> ComponentCheck:
    from diffusers import DDPMScheduler

    config_file = "scheduler/scheduler_config.json"
    if not source.has(config_file):
        raise _Failed(f"{source.where(config_file)} is missing",
                      "download the pipeline's scheduler/ folder too: training reads its noise schedule")
    config = source.json(config_file)
    try:
        scheduler = DDPMScheduler.from_config(config)
    except Exception as err:
        raise _Failed(f"{source.where(config_file)} does not build DDPMScheduler: {type(err).__name__}: {err}",
                      "replace scheduler/ with the pipeline's own scheduler folder") from err
    c = scheduler.config
    return ComponentCheck("scheduler", "DDPMScheduler", None, True,
                          f"{config_file}: {config.get('_class_name')}; training's DDPM schedule: "
                          f"{c.num_train_timesteps} steps, {c.beta_schedule} betas, {c.prediction_type} prediction")


def _check_conditioning(kind: str, configs: dict[str, dict], checks: list[ComponentCheck]) -> None:
    """The UNet's conditioning widths against the text encoders it is fed: components that each build can still
    come from different models (an SD1.5 text encoder in an SDXL folder), and then only shapes at run time fail."""
    encoders = [folder for folder, _, _ in TEXT_PARTS[kind]]
    if "unet" not in configs or any(e not in configs for e in encoders):
        return
    unet, texts = configs["unet"], [configs[e] for e in encoders]
    hidden = sum(text.hidden_size for text in texts)
    problems = []
    if unet.cross_attention_dim != hidden:
        widths = " + ".join(f"{e} {t.hidden_size}" for e, t in zip(encoders, texts))
        problems.append(f"the UNet attends to {unet.cross_attention_dim}-wide text states but the text encoders give "
                        f"{hidden} ({widths})")
    if kind == "sdxl" and unet.addition_embed_type == "text_time":
        pooled = texts[-1].projection_dim
        expected = 6 * unet.addition_time_embed_dim + pooled
        if unet.projection_class_embeddings_input_dim != expected:
            problems.append(f"unet projection_class_embeddings_input_dim is "
                            f"{unet.projection_class_embeddings_input_dim}, but 6 x addition_time_embed_dim "
                            f"{unet.addition_time_embed_dim} + text_encoder_2 projection_dim {pooled} = {expected}")
    if not problems:
        return
    row = next(c for c in checks if c.component == "unet")
    row.ok = False
    row.problem = "; ".join(([row.problem] if row.problem else []) + problems)
    row.fix = row.fix or "the components come from different models: take unet/ and the text encoders from one pipeline"


def _check_shipped(repo: str, kind: str, revision: str | None, variant: str | None) -> list[ComponentCheck]:
    """Offline: a known hub id is built from the shipped architecture; its counts must be the published ones."""
    shipped = HUB_IDS.get(repo)
    if shipped is None:
        return [_pipeline_failure(
            f"{repo} cannot be checked offline: the project ships the architectures of {sorted(HUB_IDS)} only",
            f"run the preflight without --offline, or download the folder (hf download {repo} --local-dir DIR) and "
            "set model.pretrained to DIR")]
    pipeline_class = PIPELINE_CLASS[shipped]
    if kind not in ("auto", shipped):
        return [_pipeline_failure(f"model.kind is {kind!r} but {repo} is a {pipeline_class} ({shipped})",
                                  f"set model.kind to auto or {shipped}", pipeline_class)]
    at = f" at {revision}" if revision else ""
    pipeline = ComponentCheck("pipeline", pipeline_class, None, True,
                              f"{repo}{at}: {pipeline_class}, kind {shipped} (the shipped architecture; offline)")
    if variant not in PUBLISHED_VARIANTS[repo]:
        known = ", ".join(repr(v) for v in PUBLISHED_VARIANTS[repo])
        pipeline.ok = False
        pipeline.problem = f"model.variant {variant!r}: {repo} publishes weights for the variants {known} only"
        pipeline.fix = "set model.variant to one of them, or run without --offline to look at the repo's files"
    checks = [pipeline]
    for name in ARCHITECTURES[shipped]:
        checks.append(_guarded(name, COMPONENT_CLASSES[name], lambda name=name: _check_published(shipped, name)))
    for _, tokenizer, _ in TEXT_PARTS[shipped]:
        checks.append(ComponentCheck(tokenizer, "CLIPTokenizer", None, True,
                                     f"{tokenizer}/ in {repo} (not fetched offline)"))
    checks.append(ComponentCheck("scheduler", "DDPMScheduler", None, True,
                                 f"scheduler/ in {repo} (not fetched offline)"))
    return checks


def _check_published(kind: str, name: str) -> ComponentCheck:
    cls = COMPONENT_CLASSES[name]
    parameters = count_parameters(build_on_meta(kind, name))
    published = PUBLISHED_PARAMETERS[kind][name]
    if parameters != published:
        raise _Failed(f"the shipped {kind} {name} config builds {parameters:,} parameters, the published {cls} has "
                      f"{published:,}: a bug in the project", "fix pipeline/models/architectures.py")
    return ComponentCheck(name, cls, parameters, True,
                          f"shipped {kind} config: {parameters:,} parameters, as published")


# ----------------------------------------------------------------------------------------- weight files


def _add_variant(filename: str, variant: str | None) -> str:
    """"model.safetensors" -> "model.fp16.safetensors", "x.safetensors.index.json" -> "x.safetensors.index.fp16.json":
    the variant goes before the last extension, as both libraries name it."""
    if variant is None:
        return filename
    stem, extension = filename.rsplit(".", 1)
    return f"{stem}.{variant}.{extension}"


def weight_candidates(component: str, variant: str | None) -> list[tuple[str, str]]:
    """(file name, format) in the order the component's library looks for them in `component/` when loading."""
    v = variant
    if component in DIFFUSERS_COMPONENTS:  # diffusers: a sharded index first, then one file; pickles last
        base = "diffusion_pytorch_model"
        names = [(_add_variant(f"{base}.safetensors.index.json", v), "safetensors-index")]
        if v is not None:
            names.append((f"{base}.{v}.safetensors.index.json", "safetensors-index"))  # diffusers' older naming
        return names + [(_add_variant(f"{base}.safetensors", v), "safetensors"),
                        (_add_variant(f"{base}.bin", v), "bin")]
    return [(_add_variant("model.safetensors", v), "safetensors"),  # transformers: one file first, then an index
            (_add_variant("model.safetensors.index.json", v), "safetensors-index"),
            (_add_variant("pytorch_model.bin", v), "bin"),
            (_add_variant("pytorch_model.bin.index.json", v), "bin-index")]


def _find_weights(source, name: str, variant: str | None) -> tuple[list[str], str]:
    """The weight files (relative to the pipeline) the library would load, and their format."""
    for filename, file_format in weight_candidates(name, variant):
        rel = f"{name}/{filename}"
        if not source.has(rel):
            continue
        if not file_format.endswith("-index"):
            return [rel], file_format
        shards = sorted(set(source.json(rel).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not source.has(f"{name}/{shard}")]
        if missing or not shards:
            raise _Failed(f"{source.where(rel)} lists shards that are missing: {', '.join(missing) or '(none listed)'}",
                          f"the download is incomplete: download {name}/ again")
        return [f"{name}/{shard}" for shard in shards], file_format.removesuffix("-index")
    raise _missing_weights(source, name, variant)


def _missing_weights(source, name: str, variant: str | None) -> _Failed:
    looked_for = ", ".join(filename for filename, _ in weight_candidates(name, variant))
    present = sorted(n for n in source.names(name) if n.endswith((".safetensors", ".bin")))
    if variant is not None:
        plain = [f for f, _ in weight_candidates(name, None) if f in present]
        instead = f"set model.variant to null to load {plain[0]}, or " if plain else ""
        return _Failed(f"no {variant!r} weights in {source.where(name)} (model.variant={variant!r}): looked for "
                       f"{looked_for}; it has {', '.join(present) or 'no weight files'}",
                       f"{instead}download the {variant} files into {source.where(name)}")
    variants = sorted({n.split(".")[-2] for n in present if n.count(".") >= 2})
    if variants:
        return _Failed(f"{source.where(name)} has only variant weights ({', '.join(present)}); with model.variant "
                       f"unset the loader looks for {looked_for}", f"set model.variant to {variants[0]}")
    return _Failed(f"no weights in {source.where(name)}: looked for {looked_for}",
                   f"the download is incomplete: download {name}/ again, or save the component with save_pretrained")


def _tensors_in(files: list[str], file_format: str, source) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """name -> (shape, dtype) over all `files`; None where it cannot be known without loading (pickles)."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    for rel in files:
        tensors = source.safetensors_header(rel) if file_format == "safetensors" else source.pickle_shapes(rel)
        if tensors is None:
            return None
        found.update(tensors)
    return found


def _describe_files(name: str, files: list[str], source=None) -> str:
    """"weights unet/x.safetensors" or "weights unet/ (3 shards: ...)", relative or (with `source`) as located."""
    where = source.where if source is not None else (lambda rel: rel)
    if len(files) == 1:
        return f"weights {where(files[0])}"
    return f"weights {where(name)}/ ({len(files)} shards {Path(files[0]).name} ...)"


def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, dtype) from a .safetensors file's header alone: 8 bytes of little-endian header length,
    then that much JSON. A file shorter than its header promises (an interrupted download) fails here."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER_BYTES):
            raise _Failed(f"{path} is not a safetensors file (header length {length}, file size {size})",
                          "download the file again, or save the component with save_pretrained")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    data_bytes = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + data_bytes > size:
        raise _Failed(f"{path} is truncated: {size:,} bytes, its header describes {8 + length + data_bytes:,}",
                      "the download was interrupted: download the file again")
    return {key: (tuple(info["shape"]), info["dtype"]) for key, info in header.items()}


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def read_pickle_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]] | None:
    """Shapes of a torch.save'd state dict without reading its data (memory-mapped onto the meta device); None for
    the legacy (non-zip) format, which can only be read whole."""
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="meta")
    except RuntimeError:
        return None
    return {key: (tuple(t.shape), _DTYPE_NAMES.get(t.dtype, str(t.dtype))) for key, t in state.items()
            if isinstance(t, torch.Tensor)}


# ------------------------------------------------------------------------------------------ comparison

# diffusers renames these when it loads an old VAE checkpoint (ModelMixin._fix_state_dict_keys_on_load).
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _renamed_deprecated_attention(found: dict, expected: dict) -> dict:
    renamed = {}
    for key, value in found.items():
        path, _, rest = key.rpartition(".")  # "...attentions.0.query", "weight"
        parent, _, leaf = path.rpartition(".")
        new = f"{parent}.{_DEPRECATED_ATTENTION[leaf]}.{rest}" if leaf in _DEPRECATED_ATTENTION else key
        renamed[new if key not in expected and new in expected else key] = value
    return renamed


def _ignored_unexpected(model: torch.nn.Module, name: str) -> re.Pattern | None:
    """Keys the library drops without a word: the model's own ignore list, and for transformers models an old
    checkpoint's persistent `position_ids` buffer."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    if name not in DIFFUSERS_COMPONENTS:
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def key_differences(expected: dict[str, tuple], found: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, misshapen) keys, sorted, of a file's tensor shapes against a model's."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k]))
    return missing, unexpected, misshapen


def _compare(expected: dict[str, tuple], found: dict[str, tuple[tuple, str]], ignore: re.Pattern | None) -> str | None:
    """None when the files hold exactly the model's tensors with its shapes; else a few of each kind of difference."""
    missing, unexpected, misshapen = key_differences(expected, {k: shape for k, (shape, _) in found.items()})
    unexpected = [k for k in unexpected if ignore is None or not ignore.search(k)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_examples(missing, lambda k: expected[k])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_examples(unexpected, lambda k: found[k][0])})")
    if misshapen:
        shown = "; ".join(f"{k}: file {list(found[k][0])}, model {list(expected[k])}" for k in misshapen[:_EXAMPLES])
        more = ", ..." if len(misshapen) > _EXAMPLES else ""
        parts.append(f"{len(misshapen)} with other shapes ({shown}{more})")
    return "; ".join(parts) or None


def _examples(keys: list[str], shape_of) -> str:
    shown = ", ".join(f"{k} {list(shape_of(k))}" for k in keys[:_EXAMPLES])
    return shown + (", ..." if len(keys) > _EXAMPLES else "")


# ------------------------------------------------------------------------------------------------ sources


class _Folder:
    """A local pipeline folder."""

    def __init__(self, root: Path):
        self.root = root

    def where(self, rel: str) -> str:
        return str(self.root / rel)

    def has(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def names(self, folder: str) -> list[str]:
        path = self.root / folder
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    def json(self, rel: str) -> dict[str, Any]:
        return json.loads((self.root / rel).read_text())

    def safetensors_header(self, rel: str):
        return read_safetensors_header(self.root / rel)

    def pickle_shapes(self, rel: str):
        return read_pickle_shapes(self.root / rel)


class _HubRepo:
    """A hub repo at a revision: its file listing, small JSON files, and safetensors headers (HTTP range requests
    of the first bytes), never the weights."""

    def __init__(self, repo: str, revision: str | None):
        from huggingface_hub import HfApi

        self.repo, self.revision, self.api = repo, revision, HfApi()
        self.files = set(self.api.list_repo_files(repo, revision=revision))

    def where(self, rel: str) -> str:
        return f"{self.repo}{'@' + self.revision if self.revision else ''}:{rel}"

    def has(self, rel: str) -> bool:
        return rel in self.files

    def names(self, folder: str) -> list[str]:
        return sorted(f.removeprefix(f"{folder}/") for f in self.files
                      if f.startswith(f"{folder}/") and "/" not in f.removeprefix(f"{folder}/"))

    def json(self, rel: str) -> dict[str, Any]:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(self.repo, rel, revision=self.revision)).read_text())

    def safetensors_header(self, rel: str):
        metadata = self.api.parse_safetensors_file_metadata(self.repo, rel, revision=self.revision)
        return {key: (tuple(info.shape), info.dtype) for key, info in metadata.tensors.items()}

    def pickle_shapes(self, rel: str):
        return None  # a pickle's shapes need the whole file


# ----------------------------------------------------------------------------------------------- helpers


def _model_components(kind: str) -> list[str]:
    return ["unet", "vae", *(folder for folder, _, _ in TEXT_PARTS[kind])]


def _guarded(component: str, cls: str, check) -> ComponentCheck:
    """Run one component's check; its failure (or an unreadable file) becomes that component's failing row."""
    try:
        return check()
    except _Failed as failed:
        return ComponentCheck(component, cls, failed.parameters, False, "-", failed.problem, failed.fix)
    except Exception as err:  # an unreadable file, malformed JSON, a hub error: report it, keep checking the rest
        return ComponentCheck(component, cls, None, False, "-", f"{component}: {type(err).__name__}: {err}",
                              f"download or save the {component} folder again")


def _pipeline_failure(problem: str, fix: str, cls: str | None = None) -> ComponentCheck:
    return ComponentCheck("pipeline", cls or "-", None, False, "-", problem, fix)
