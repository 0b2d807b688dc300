"""Preflight checks of the scorers' weights, before any image is generated (the preflight's "scorers" stage).

    check_scorer("hpsv2", weights="/models/HPS_v2.1_compressed.pt")
    # ScorerCheck(scorer='hpsv2', ok=True, found='/models/HPS_v2.1_compressed.pt: 686 tensors fit ViT-H-14 ...',
    #             parameters=986109441)

Each check builds the scorer's architecture on the meta device (parameter names and shapes, no memory; well under a
second even for ViT-H-14, plus the first import of open_clip / transformers) with the scorer modules' own builders,
and compares a local weights file's keys and shapes with it without reading its tensors: a safetensors file from
its header, a torch file memory-mapped (only shapes are looked at). The key rules are the loaders' own (HPS's
'state_dict' nesting, open_clip's renames and resizes, ImageReward's accepted-and-dropped keys, transformers' old
position_ids buffers), and so are the messages where a loader has one: a file the scorer would load passes, one it
would refuse fails with the words the run would have stopped with.

Hub ids: a file already in huggingface_hub's local cache is checked like a local one; otherwise ``offline`` says the
architecture was built and the file not fetched, and online asks the hub that the repo and file exist (no
download). open_clip tags are looked up in open_clip's own table (offline too), their hub file as above.
Nothing is printed: the preflight prints the table.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluate.names import SCORER_NAMES
from pipeline.evaluate.scorer_weights import check_state_dict, is_hub_id, not_found, read_torch_file

# A transformers folder's weights, in the order transformers 5 looks for them (safetensors first).
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json")
# A CLIP processor folder: the image processor's settings (the hub's name; transformers 5 saves processor_config.json)
# and the tokenizer (one file, or vocab.json with merges.txt).
PROCESSOR_FILES = [("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")]
# Bytes per element of each safetensors dtype, to tell a header whose shapes were edited from its byte ranges.
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                           "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass
class ScorerCheck:
    scorer: str
    ok: bool
    found: str  # what is there: the file and what it fits, or what the hub / offline check saw
    problem: str | None = None  # what is wrong, naming the file and keys (the loader's own message where it has one)
    fix: str | None = None  # where the real file comes from and which config key to set
    parameters: int | None = None  # of the architecture built (all parts: the aesthetic head and its CLIP)


class _Failed(Exception):
    def __init__(self, found: str, problem: str, fix: str, parameters: int | None = None):
        super().__init__(problem)
        self.found, self.problem, self.fix, self.parameters = found, problem, fix, parameters


def check_scorer(name: str, *, weights: str | None = None, backbone: str | None = None, arch: str | None = None,
                 offline: bool = False) -> ScorerCheck:
    """Whether scorer ``name`` with these evaluate.<name> fields would load, without loading it (see the module
    docstring); ``offline`` skips only the hub look-ups."""
    checks = {"clip": _check_clip, "pickscore": _check_pickscore, "hpsv2": _check_hpsv2,
              "aesthetic": _check_aesthetic, "imagereward": _check_imagereward}
    if name == "style":
        return ScorerCheck("style", True, "the toy world's hand-made style scorer: no weights")
    if name not in checks:
        return ScorerCheck(name, False, "no such scorer", problem=f"unknown scorer {name!r}",
                           fix=f"name one of {', '.join(SCORER_NAMES)} in evaluate.scorers")
    try:
        return checks[name](weights=weights, backbone=backbone, arch=arch, offline=offline)
    except _Failed as failed:
        return ScorerCheck(name, False, failed.found, failed.problem, failed.fix, failed.parameters)


# ---------------------------------------------------------------------------------------------- the scorers


def _check_clip(*, weights, backbone, arch, offline) -> ScorerCheck:
    from pipeline.evaluate.scorers import CLIP_SCORER_SOURCE, no_clip_weights
    from pipeline.models.clip import SCHEMA_PREFIXES, TINY_NAME

    arch = arch or TINY_NAME  # as ClipScorer.load
    if not weights and not arch.startswith(SCHEMA_PREFIXES):
        raise _Failed("no weights named", str(no_clip_weights(arch)), _fix("clip", CLIP_SCORER_SOURCE))
    model, found = _check_open_clip("clip", arch, weights, key="weights", source=CLIP_SCORER_SOURCE, random_ok=True,
                                    offline=offline)
    return ScorerCheck("clip", True, found, parameters=_count(model) if model is not None else None)


def _check_pickscore(*, weights, backbone, arch, offline) -> ScorerCheck:
    from pipeline.evaluate.scorer_pickscore import PROCESSOR_SOURCE, PUBLISHED_PROCESSOR, SOURCE, clip_model_on_meta

    fix = _fix("pickscore", SOURCE)
    if not weights:
        raise _Failed("no weights named", str(not_found("pickscore", weights, source=SOURCE)), fix)
    if is_hub_id(weights):
        if weights.count("/") != 1:
            raise _Failed(f"hub id {weights}", str(not_found("pickscore", weights, source=SOURCE, why=(
                "no such local folder; a hub id here is a repo: owner/repo"))), fix)
        model = clip_model_on_meta()  # the published config, built in
        found = _from_hub("pickscore", weights, [("config.json",), TRANSFORMERS_WEIGHTS], fix=fix, offline=offline,
                          built=_built("PickScore's CLIP-H (transformers CLIPModel)", model),
                          check_cached=lambda paths: _pickscore_folder(paths[0].parent, fix)[1])
    else:
        folder = Path(weights).expanduser()
        if not folder.is_dir():
            raise _Failed(f"no folder at {folder}",
                          str(not_found("pickscore", weights, source=SOURCE, why="no such folder")), fix)
        model, found = _pickscore_folder(folder, fix)
    processor = _check_folder("pickscore", backbone or PUBLISHED_PROCESSOR, key="backbone", source=PROCESSOR_SOURCE,
                              needed=PROCESSOR_FILES, offline=offline, parameters=_count(model))
    return ScorerCheck("pickscore", True, f"{found}; processor {processor}", parameters=_count(model))


def _check_hpsv2(*, weights, backbone, arch, offline) -> ScorerCheck:
    from pipeline.evaluate.scorer_hpsv2 import PUBLISHED_ARCH, SOURCE, arch_refusal, hps_state_dict
    from pipeline.models.clip import RANDOM, open_clip_on_meta

    arch = arch or PUBLISHED_ARCH
    fix = _fix("hpsv2", SOURCE)
    try:
        model = open_clip_on_meta(arch, RANDOM)  # as the loader: the architecture as named (GELU for ViT-H-14)
    except ValueError as err:
        raise _Failed(f"evaluate.hpsv2.arch={arch!r}", str(arch_refusal(arch, err)),
                      "set evaluate.hpsv2.arch to an open_clip model (open_clip.list_models()), or unset it for "
                      f"the published {PUBLISHED_ARCH}") from err
    expected = model.state_dict()

    def check(path: Path) -> str:
        state = hps_state_dict(read_torch_file(path, scorer="hpsv2", source=SOURCE, mmap=True), path)
        check_state_dict(expected, state, scorer="hpsv2", path=path, source=SOURCE, arch=arch)
        return f"{path}: {len(state)} tensors fit {arch}"

    found = _weights_file("hpsv2", weights, source=SOURCE, check=check, built=_built(arch, model), offline=offline,
                          parameters=_count(model))
    return ScorerCheck("hpsv2", True, found, parameters=_count(model))


def _check_aesthetic(*, weights, backbone, arch, offline) -> ScorerCheck:
    from pipeline.evaluate.scorer_aesthetic import (BACKBONE_SOURCE, PUBLISHED_ARCH, SOURCE, AestheticHead,
                                                    backbone_for)

    arch = arch or PUBLISHED_ARCH
    with _failing("no backbone named", _fix("aesthetic", BACKBONE_SOURCE, "backbone")):
        backbone = backbone_for(arch, backbone)  # an arch without its backbone is refused, as by the loader
    clip = _open_clip_architecture("aesthetic", arch, backbone, key="backbone", source=BACKBONE_SOURCE)
    with torch.device("meta"):
        head = AestheticHead(_embedding_width(clip))
    parameters = _count(clip) + _count(head)

    def check(path: Path) -> str:
        state = read_torch_file(path, scorer="aesthetic", source=SOURCE, mmap=True)
        check_state_dict(head.state_dict(), state, scorer="aesthetic", path=path, source=SOURCE,
                         arch=f"head on {arch} embeddings")
        return f"head {path} fits {arch}'s {head.layers[0].in_features}-wide embeddings"

    # The head's file first, as the loader: the small file, most often the wrong one.
    found = _weights_file("aesthetic", weights, source=SOURCE, check=check, offline=offline, parameters=parameters,
                          built=_built(f"the head on {arch}", head))
    _, backbone_found = _check_open_clip("aesthetic", arch, backbone, key="backbone", source=BACKBONE_SOURCE,
                                         random_ok=False, offline=offline, parameters=parameters, model=clip)
    return ScorerCheck("aesthetic", True, f"{found}; backbone {backbone_found}", parameters=parameters)


def _check_imagereward(*, weights, backbone, arch, offline) -> ScorerCheck:
    from pipeline.evaluate.imagereward import (DEFAULT_TOKENIZER, HUB_REPO, MED_CONFIG_FILE, WEIGHTS_FILE,
                                               WEIGHTS_SOURCE, load_arch, local_weights, looks_like_hub_id,
                                               model_on_meta, tokenizer_folder)

    fix = (f"download {WEIGHTS_SOURCE}, with {MED_CONFIG_FILE} beside it; set evaluate.imagereward.weights to the "
           f"folder or the file (or the hub id {HUB_REPO})")
    if weights and looks_like_hub_id(weights):
        with _failing(f"evaluate.imagereward.arch={arch!r}", fix):
            model = model_on_meta(load_arch(arch))  # the published arch, or the one named
        found = _from_hub("imagereward", weights, [(WEIGHTS_FILE,), (MED_CONFIG_FILE,)], fix=fix, offline=offline,
                          built=_built("ImageReward (BLIP ViT-L/16 + BERT)", model),
                          check_cached=lambda paths: _imagereward_file(paths[0], paths[1], arch, fix)[1])
    else:
        with _failing(f"nothing at {weights!r}" if weights else "no weights named", fix):
            weights_file, med_config = local_weights(weights)
        model, found = _imagereward_file(weights_file, med_config, arch, fix)
    parameters = _count(model)
    tokenizer_fix = ("download the tokenizer of bert-base-uncased (a folder with vocab.txt); set "
                     "evaluate.imagereward.backbone to it, or unset it for the hub id")
    with _failing(f"no tokenizer folder at {backbone!r}", tokenizer_fix, parameters):
        folder = tokenizer_folder(backbone)
    if folder is None:  # a hub id, bert-base-uncased by default (an id without an owner)
        tokenizer = _from_hub("imagereward", backbone or DEFAULT_TOKENIZER, [("vocab.txt",)], fix=tokenizer_fix,
                              offline=offline, built="", parameters=parameters, key="backbone",
                              check_cached=lambda paths: f"{paths[0].parent} (cached)")
    elif not (folder / "vocab.txt").is_file():
        raise _Failed(f"{folder}: no vocab.txt", f"imagereward: the tokenizer folder {folder} has no vocab.txt "
                      f"(evaluate.imagereward.backbone)", tokenizer_fix, parameters)
    else:
        tokenizer = f"{folder} (vocab.txt)"
    return ScorerCheck("imagereward", True, f"{found}; tokenizer {tokenizer}", parameters=parameters)


# ----------------------------------------------------------------------------------- the scorers' file layouts


def _pickscore_folder(folder: Path, fix: str) -> tuple[torch.nn.Module, str]:
    """A CLIPModel folder: its config.json's architecture against its weights, as from_pretrained reads them."""
    from pipeline.evaluate.scorer_pickscore import SOURCE, clip_model_on_meta, is_old_buffer, misfit

    if not (folder / "config.json").is_file():
        raise _Failed(f"{folder}: no config.json", str(not_found("pickscore", str(folder), source=SOURCE,
                                                                 why="no config.json: not a CLIPModel folder")), fix)
    with _failing(f"{folder}/config.json", fix):
        try:
            model = clip_model_on_meta(folder)
        except OSError as err:  # an unreadable config.json
            raise ValueError(f"pickscore scorer: {folder}/config.json: {str(err).splitlines()[0]}") from err
    expected = model.state_dict()
    with _failing(str(folder), fix, _count(model)):
        state = _transformers_weights(folder, fix)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in set(state) - set(expected) if not is_old_buffer(k))
        mismatched = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                            for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
        if missing or unexpected or mismatched:
            raise misfit(folder, missing, unexpected, mismatched)
    return model, f"{folder}: {len(expected)} tensors fit its config.json{_published_size(model)}"


def _published_size(model: torch.nn.Module) -> str:
    published = _published_pickscore_parameters()
    if _count(model) == published:
        return " (PickScore's published size)"
    return f" ({_count(model):,} parameters: not PickScore's published {published:,})"


@functools.cache
def _published_pickscore_parameters() -> int:
    from pipeline.evaluate.scorer_pickscore import clip_model_on_meta

    return _count(clip_model_on_meta())


def _transformers_weights(folder: Path, fix: str) -> dict[str, torch.Tensor]:
    """The tensors (header-only or memory-mapped) of a transformers folder: one file or the shards of its index."""
    from pipeline.evaluate.scorer_pickscore import SOURCE

    name = next((n for n in TRANSFORMERS_WEIGHTS if (folder / n).is_file()), None)
    if name is None:
        raise _Failed(f"{folder}: no weights", str(not_found("pickscore", str(folder), source=SOURCE,
                                                             why=f"no {' or '.join(TRANSFORMERS_WEIGHTS)}")), fix)
    files = [folder / name]
    if name.endswith(".index.json"):
        index = json.loads((folder / name).read_text())
        files = [folder / shard for shard in sorted(set(index.get("weight_map", {}).values()))]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ValueError(f"pickscore scorer: {folder / name} names the shard {file.name}, which is not there; "
                             f"download the whole folder again")
        state.update(safetensors_shapes(file, scorer="pickscore", source=SOURCE) if file.suffix == ".safetensors"
                     else read_torch_file(file, scorer="pickscore", source=SOURCE, mmap=True))
    return state


def _imagereward_file(weights_file: Path, med_config: Path | None, arch: str | None,
                      fix: str) -> tuple[torch.nn.Module, str]:
    from pipeline.evaluate.imagereward import WEIGHTS_SOURCE, fit_state_dict, load_arch, model_on_meta

    with _failing(f"evaluate.imagereward.arch={arch!r}", fix):
        model = model_on_meta(load_arch(arch, med_config=med_config if arch is None else None))  # as the loader
    with _failing(f"{weights_file}", fix, _count(model)):
        state = read_torch_file(weights_file, scorer="imagereward", source=WEIGHTS_SOURCE, mmap=True)
        fitted = fit_state_dict(model, state, source=str(weights_file))
    which = "the published architecture" if arch is None else f"the arch of {arch}"
    dropped = len(state) - len(fitted)
    return model, (f"{weights_file}: {len(fitted)} tensors fit {which}"
                   + (f" ({dropped} unused ones dropped, as published)" if dropped else ""))


# ---------------------------------------------------------------------------------------- open_clip models


def _open_clip_architecture(scorer: str, arch: str, pretrained: str | None, *, key: str,
                            source: str) -> torch.nn.Module:
    """The open_clip model ``arch`` on meta, or the loader's refusal of the name (unknown, a TorchScript file)."""
    from pipeline.evaluate.scorers import open_clip_refusal
    from pipeline.models.clip import RANDOM, open_clip_on_meta

    from_file = pretrained if pretrained and Path(pretrained).expanduser().is_file() else None
    try:  # a tag or file only sets the activation; a file that is not there is reported with the weights
        return open_clip_on_meta(arch, str(Path(from_file).expanduser()) if from_file else RANDOM)
    except ValueError as err:
        raise _Failed(f"evaluate.{scorer}.arch={arch!r}", str(open_clip_refusal(scorer, arch, pretrained, err, key=key,
                                                                                  source=source)),
                      _fix(scorer, source, key)) from err


def _check_open_clip(scorer: str, arch: str, pretrained: str | None, *, key: str, source: str, random_ok: bool,
                     offline: bool, parameters: int | None = None,
                     model: torch.nn.Module | None = None) -> tuple[torch.nn.Module | None, str]:
    """An open_clip model and its weights (a tag, a local file, or "random") as load_open_clip takes them;
    ``model``: the architecture when already built."""
    from pipeline.evaluate.scorers import open_clip_weights
    from pipeline.models.clip import RANDOM, SCHEMA_PREFIXES

    fix = _fix(scorer, source, key)
    if arch.startswith(SCHEMA_PREFIXES):
        return None, _schema_model(scorer, arch, offline=offline, fix=fix)
    with _failing(f"evaluate.{scorer}.{key}={pretrained!r}", fix, parameters):
        pretrained, is_file = open_clip_weights(scorer, arch, pretrained, key=key, source=source, random_ok=random_ok)
    model = model or _open_clip_architecture(scorer, arch, pretrained, key=key, source=source)
    parameters = parameters or _count(model)
    if pretrained == RANDOM:
        return model, f"{_built(arch, model)}, seeded random weights (evaluate.{scorer}.{key}=random: tests only)"
    check = _open_clip_file_check(scorer, arch, model, source=source, key=key)
    if is_file:
        with _failing(str(pretrained), fix, parameters):
            return model, check(Path(pretrained))
    return model, _open_clip_tag(scorer, arch, pretrained, model, check=check, offline=offline, fix=fix,
                                 parameters=parameters)


def _open_clip_file_check(scorer: str, arch: str, model: torch.nn.Module, *, source: str,
                          key: str) -> Callable[[Path], str]:
    def check(path: Path) -> str:
        state = _as_open_clip_loads(model, _open_clip_file(path, scorer=scorer, source=source, key=key))
        check_state_dict(model.state_dict(), state, scorer=scorer, path=path, source=source, key=key, arch=arch)
        return f"{path}: {len(state)} tensors fit {arch}"

    return check


def _open_clip_tag(scorer: str, arch: str, tag: str, model: torch.nn.Module, *, check: Callable[[Path], str],
                   offline: bool, fix: str, parameters: int) -> str:
    """A tag of open_clip's table: where open_clip would fetch its file from, and that file when it is cached."""
    import open_clip

    from pipeline.models.clip import open_clip_build

    record = open_clip.get_pretrained_cfg(open_clip_build(arch, tag).open_clip_name, tag)
    in_table = f"tag {tag!r} of {arch} in open_clip's table; {_built(arch, model)}"
    hub = record.get("hf_hub", "").strip("/")
    if not hub:  # fetched from a URL, not the hub: nothing more to ask without downloading
        return f"{in_table}; its file is fetched from {record.get('url') or 'a URL'} (not checked)"
    parts = hub.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or open_clip.pretrained.HF_WEIGHTS_NAME
    # open_clip takes a .safetensors twin of the file first when the repo has one.
    if filename == open_clip.pretrained.HF_WEIGHTS_NAME:
        names = (open_clip.pretrained.HF_SAFE_WEIGHTS_NAME, filename)
    elif filename.endswith((".bin", ".pth")):
        names = (filename[:-4] + ".safetensors", filename)
    else:
        names = (filename,)
    return in_table + "; " + _from_hub(scorer, repo, [names], fix=fix, offline=offline, built="",
                                       check_cached=lambda paths: check(paths[0]), parameters=parameters)


def _schema_model(scorer: str, arch: str, *, offline: bool, fix: str) -> str:
    """open_clip's "hf-hub:org/repo" and "local-dir:path" names: the config and the weights come with the name."""
    if arch.startswith("local-dir:"):
        folder = Path(arch[len("local-dir:"):]).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise _Failed(f"{folder}: no open_clip_config.json", f"{scorer} scorer: evaluate.{scorer}.arch={arch!r}: "
                          f"{folder} is not an open_clip model folder (no open_clip_config.json)", fix)
        return f"{arch}: an open_clip model folder (its weights not checked)"
    repo = arch[len("hf-hub:"):]
    return f"{arch}: " + _from_hub(scorer, repo, [("open_clip_config.json",)], fix=fix, offline=offline, built="",
                                   check_cached=lambda paths: f"{paths[0].parent} (cached; weights not checked)")


def _open_clip_file(path: Path, *, scorer: str, source: str, key: str) -> Any:
    """A file as open_clip.factory.load_state_dict reads it (a 'state_dict' inside, a 'module.' prefix dropped),
    its tensors header-only or memory-mapped."""
    state = (safetensors_shapes(path, scorer=scorer, source=source, key=key) if path.suffix == ".safetensors"
             else read_torch_file(path, scorer=scorer, source=source, key=key, mmap=True))
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if isinstance(state, dict) and state and next(iter(state)).startswith("module"):
        state = {k[7:]: v for k, v in state.items()}
    return state


def _as_open_clip_loads(model: torch.nn.Module, state: Any) -> Any:
    """The state dict as open_clip's load_checkpoint hands it to load_state_dict(strict=True): its own renames,
    reshapes and resizes, run on shape-only copies, so a file open_clip loads passes and one it refuses fails."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return state  # check_state_dict says what it is not
    state = {k: torch.empty(v.shape, device="meta") for k, v in state.items()}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for name in ("logit_scale", "logit_bias"):  # a scalar saved 0-d or 1-d is reshaped
        target = getattr(model, name, None)
        if name in state and target is not None and state[name].numel() == target.numel():
            state[name] = state[name].reshape(target.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.empty(model.logit_bias.shape, device="meta")  # open_clip fills in zeros
    state.pop("text.transformer.embeddings.position_ids", None)
    try:  # another image grid or context length is interpolated to the model's
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
    except (AssertionError, RuntimeError, ValueError):
        pass  # open_clip would stop here too; the shapes left as they are show why
    return state


def _embedding_width(model: torch.nn.Module) -> int:
    """CLIP's joint embedding width, from a text forward on meta (as the aesthetic loader reads it, shapes only)."""
    tokens = torch.zeros(1, model.context_length, dtype=torch.long, device="meta")
    return int(model.encode_text(tokens).shape[-1])


# -------------------------------------------------------------------------------------- files and the hub


def safetensors_shapes(path: Path, *, scorer: str, source: str, key: str = "weights") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors of their shapes, from its header alone (8 bytes of length, then
    JSON); a ValueError naming the file when the header is not one or does not match the file's size (a truncated
    download) or a tensor's byte range does not match its shape (an edited header)."""
    try:
        return _safetensors_header(path)
    except ValueError as err:
        raise ValueError(f"{scorer} scorer: {path} is not a readable safetensors file: {err}. Expected {source}; "
                         f"download it again and set evaluate.{scorer}.{key} to it.") from None


def _safetensors_header(path: Path) -> dict[str, torch.Tensor]:
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, fewer than a header's length field")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise ValueError(f"its header length field says {length:,} bytes but the file has {size:,} (truncated, "
                             f"or not a safetensors file)")
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    tensors, end = {}, 0
    for name, info in header.items():
        try:
            shape, dtype, (start, stop) = list(info["shape"]), info["dtype"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"tensor {name!r} has no shape, dtype and data_offsets in the header") from None
        width = SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and stop - start != math.prod(shape) * width:
            raise ValueError(f"tensor {name!r}: shape {tuple(shape)} of {dtype} needs {math.prod(shape) * width:,} "
                             f"bytes, the header gives it {stop - start:,} (an edited or corrupt header)")
        tensors[name], end = torch.empty(shape, device="meta"), max(end, stop)
    if 8 + length + end != size:
        raise ValueError(f"the header describes {8 + length + end:,} bytes but the file has {size:,} (a truncated "
                         f"download?)")
    return tensors


def _weights_file(scorer: str, spec: str | None, *, source: str, check: Callable[[Path], str], built: str,
                  offline: bool, parameters: int | None, key: str = "weights") -> str:
    """A one-file weights spec as resolve_file takes it: a local file, or 'owner/repo/file' on the hub."""
    fix = _fix(scorer, source, key)
    if not spec:
        raise _Failed("no weights named", str(not_found(scorer, spec, source=source, key=key)), fix, parameters)
    if is_hub_id(spec):
        parts = spec.split("/")
        if len(parts) < 3:
            raise _Failed(f"hub id {spec}", str(not_found(scorer, spec, source=source, key=key, why=(
                "no such local file; a hub id here names the file too: owner/repo/file"))), fix, parameters)
        return _from_hub(scorer, "/".join(parts[:2]), [("/".join(parts[2:]),)], fix=fix, offline=offline,
                         built=built, check_cached=lambda paths: check(paths[0]), parameters=parameters, key=key)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise _Failed(f"nothing at {path}", str(not_found(scorer, spec, source=source, key=key, why="no such file")),
                      fix, parameters)
    with _failing(f"{path} ({path.stat().st_size:,} bytes)", fix, parameters):
        return check(path)


def _check_folder(scorer: str, spec: str, *, key: str, source: str, needed: list[tuple[str, ...]], offline: bool,
                  parameters: int | None) -> str:
    """A folder of small files (a processor, a tokenizer): locally, that each needed file (or one of its
    alternatives) is there; on the hub, as _from_hub."""
    fix = _fix(scorer, source, key)
    if is_hub_id(spec):
        return _from_hub(scorer, spec, needed, fix=fix, offline=offline, built="", parameters=parameters, key=key,
                         check_cached=lambda paths: f"{paths[0].parent} (cached)")
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise _Failed(f"no folder at {folder}", str(not_found(scorer, spec, source=source, key=key,
                                                              why="no such folder")), fix, parameters)
    lacking = [" or ".join(group) for group in needed if not any((folder / name).is_file() for name in group)]
    if lacking:
        raise _Failed(f"{folder}: no {', '.join(lacking)}", str(not_found(scorer, spec, source=source, key=key, why=(
            f"the folder has no {', '.join(lacking)}"))), fix, parameters)
    return str(folder)


def _from_hub(scorer: str, repo: str, needed: list[tuple[str, ...]], *, fix: str, offline: bool, built: str,
              check_cached: Callable[[list[Path]], str], parameters: int | None = None, key: str = "weights") -> str:
    """Hub files (each group: alternatives, the first that is there counts). From the local cache when every one
    is there (checked like local files); else offline: not fetched; else the hub is asked that they exist."""
    built = f"{built}; " if built else ""
    cached = [_cached(repo, group) for group in needed]
    if all(cached):
        with _failing(f"{repo} in the hub cache", fix, parameters):
            return f"{built}from the hub cache: {check_cached(cached)}"
    names = ", ".join(group[0] for group in needed)
    if offline:
        return f"{built}hub {repo} ({names}) not fetched (offline)"
    return built + _ask_hub(scorer, repo, needed, fix=fix, parameters=parameters, key=key)


def _cached(repo: str, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` in huggingface_hub's local cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        try:
            hit = try_to_load_from_cache(repo, name)
        except ValueError:  # not a valid repo id: the hub check says so
            return None
        if isinstance(hit, str):  # a path; None or a "known missing" marker otherwise
            return Path(hit)
    return None


def _ask_hub(scorer: str, repo: str, needed: list[tuple[str, ...]], *, fix: str, parameters: int | None,
             key: str) -> str:
    """That the hub has ``repo`` and one file of each group: metadata requests only, nothing downloaded."""
    import huggingface_hub

    try:
        if not huggingface_hub.repo_exists(repo):
            raise _Failed(f"no hub repo {repo}", f"{scorer} scorer: the hub has no repo {repo} "
                          f"(evaluate.{scorer}.{key})", fix, parameters)
        lacking = [group for group in needed if not any(huggingface_hub.file_exists(repo, n) for n in group)]
    except _Failed:
        raise
    except Exception as err:  # no network, offline mode, a gated repo without a token
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise _Failed(f"hub {repo}: not reached", f"{scorer} scorer: could not ask the hub about {repo} "
                      f"({type(err).__name__}: {first_line})",
                      "check the network and HF_TOKEN (gated repos), or run the preflight with --offline",
                      parameters) from err
    if lacking:
        names = "; ".join(" or ".join(group) for group in lacking)
        raise _Failed(f"hub {repo}: no {names}", f"{scorer} scorer: the hub repo {repo} has no {names} "
                      f"(evaluate.{scorer}.{key})", fix, parameters)
    return f"hub {repo}: {', '.join(group[0] for group in needed)} there (not downloaded)"


# ------------------------------------------------------------------------------------------------- helpers


@contextmanager
def _failing(found: str, fix: str, parameters: int | None = None) -> Iterator[None]:
    """A loader's refusal inside (WeightsNotFound is a FileNotFoundError; misfits are ValueErrors) becomes a failed
    check with the loader's own message."""
    try:
        yield
    except (FileNotFoundError, ValueError) as err:
        raise _Failed(found, str(err), fix, parameters) from err


def _fix(scorer: str, source: str, key: str = "weights") -> str:
    return f"get {source}; set evaluate.{scorer}.{key}=<its local path> (or its hub id, where it is on the hub)"


def _built(what: str, model: torch.nn.Module) -> str:
    return f"{what} built on meta ({_count(model) / 1e6:,.1f}M parameters)"


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
