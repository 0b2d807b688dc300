"""Finding a scorer's published weights (a local path or the Hugging Face hub) and checking that they fit.

Every failure here names the scorer, the path expected, where the real file comes from and which config key to
set: a reward model that silently ran with random or half-loaded weights would give confident, meaningless scores.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.models.check import key_differences

# "owner/repo" (a folder: the whole repo) or "owner/repo/path/in/repo" (one file).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.+-]+)*$")


class WeightsNotFound(FileNotFoundError):
    """A scorer's weights are not where the config says (or not given); the message says where they come from."""


def not_found(scorer: str, spec: str | None, *, source: str, key: str = "weights", why: str = "") -> WeightsNotFound:
    where = f"not found at {spec!r}" if spec else "not given"
    why = f" ({why})" if why else ""
    return WeightsNotFound(
        f"{scorer} scorer: weights {where}{why}. The real ones are {source}. Download them and set "
        f"evaluate.{scorer}.{key}=<local path> (or a hub id where the source is on the Hugging Face hub), "
        f"e.g. --set evaluate.{scorer}.{key}=/models/..."
    )


def _is_local(spec: str) -> bool:
    """A path the user means as local: it exists, or it cannot be a hub id."""
    return Path(spec).expanduser().exists() or spec.startswith(("/", ".", "~")) or not _HUB_ID.match(spec)


def is_hub_id(spec: str) -> bool:
    """``spec`` names the hub ("owner/repo" or "owner/repo/file"), as resolve_file and resolve_folder read it."""
    return not _is_local(spec)


def resolve_file(spec: str | None, *, scorer: str, source: str, key: str = "weights") -> Path:
    """A local file, or 'owner/repo/file' fetched (or found in the cache, offline) from the hub."""
    if not spec:
        raise not_found(scorer, spec, source=source, key=key)
    if _is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise not_found(scorer, spec, source=source, key=key, why="no such file")
        return path
    parts = spec.split("/")
    if len(parts) < 3:
        raise not_found(scorer, spec, source=source, key=key,
                        why="no such local file; a hub id here names the file too: owner/repo/file")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as err:  # offline, not cached, no such repo or file: all mean "not here"
        raise not_found(scorer, spec, source=source, key=key, why=f"no local file, and the hub said: {err}") from err


def resolve_folder(spec: str | None, *, scorer: str, source: str, key: str = "weights",
                   allow_patterns: list[str] | None = None) -> Path:
    """A local folder, or a hub repo id fetched (or found in the cache, offline) as a snapshot."""
    if not spec:
        raise not_found(scorer, spec, source=source, key=key)
    if _is_local(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise not_found(scorer, spec, source=source, key=key, why="no such folder")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=allow_patterns))
    except Exception as err:
        raise not_found(scorer, spec, source=source, key=key, why=f"no local folder, and the hub said: {err}") from err


def read_torch_file(path: Path, *, scorer: str, source: str, key: str = "weights", mmap: bool = False) -> Any:
    """torch.load without executing pickled code (published checkpoints hold only tensors, dicts and numbers).
    ``mmap``: map the tensors instead of reading them (nothing is read until touched), for checks that need only
    shapes; an old non-zip file cannot be mapped and is read whole, as the loaders read it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # unpickling, zip and EOF errors alike: the file is not what it should be
        raise ValueError(
            f"{scorer} scorer: {path} is not a readable PyTorch weights file: {unreadable_reason(path, err)}. "
            f"Expected {source}; download it again and set evaluate.{scorer}.{key} to that file."
        ) from err


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why torch.load failed, in the user's terms where the file's first bytes tell (torch's own message is about
    its unpickler, and suggests weights_only=False, which would run code from a file that is not the weights)."""
    with open(path, "rb") as file:
        head = file.read(64)
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file (the repo was cloned without git lfs)"
    if head.lstrip().startswith((b"<", b"{")):
        return "it is HTML or JSON text, not the weights (e.g. a download that saved an error or login page)"
    first_line = (str(err).splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {first_line} (a truncated or corrupt download?)"


def check_state_dict(expected: dict[str, torch.Tensor], got: Any, *, scorer: str, path: Path | str, source: str,
                     key: str = "weights", arch: str = "") -> None:
    """Raise a ValueError listing a few offending keys unless ``got`` has exactly ``expected``'s keys and shapes."""
    if not isinstance(got, dict) or not all(isinstance(v, torch.Tensor) for v in got.values()):
        raise ValueError(f"{scorer} scorer: {path} does not hold a state dict of tensors. Expected {source}; "
                         f"set evaluate.{scorer}.{key} to that file.")
    missing, unexpected, shapes = key_differences({k: tuple(v.shape) for k, v in expected.items()},
                                                  {k: tuple(v.shape) for k, v in got.items()})
    if not (missing or unexpected or shapes):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {_few(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {_few(unexpected)})")
    if shapes:
        problems.append("wrong shapes: " + ", ".join(
            f"{k} {tuple(got[k].shape)} instead of {tuple(expected[k].shape)}" for k in shapes[:3]))
    arch = f" the {arch} architecture" if arch else " the scorer's architecture"
    raise ValueError(
        f"{scorer} scorer: the weights in {path} do not fit{arch}: keys {'; '.join(problems)}. Expected {source}; "
        f"set evaluate.{scorer}.{key} to that file (and evaluate.{scorer}.arch to the architecture it was made for)."
    )


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
