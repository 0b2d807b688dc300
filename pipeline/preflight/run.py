"""The preflight: every check a run needs before it starts, as one table (pipeline.preflight.checks).

    rows = run_preflight(cfg, job="align", offline=True)
    print(format_table(rows)); failed = any(r.failed for r in rows)

`jobs/preflight.py` runs it for a config; `jobs/align.py`, `sweep.py` and `realign.py` run it first (offline: no
hub look-ups) and stop with the table when a check fails, before any Ray work.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from pipeline.config import AlignConfig
from pipeline.preflight.checks import (
    FAIL,
    SKIP,
    Check,
    check_data,
    check_resources,
    check_semantics,
    check_storage,
    worker_memory_gib,
)
from pipeline.storage import is_local

BUILT_IN_MODELS = ("toy", "tiny")
DEFAULT_GPU_MEMORY_GIB = 80.0  # an H100 / A100 80 GB


class PreflightFailed(SystemExit):
    """A failed preflight: the jobs exit with its table (exit code 2)."""

    def __init__(self, table: str):
        super().__init__(2)
        self.table = table


def run_preflight(cfg: AlignConfig, *, job: str = "align", offline: bool = False,
                  gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB, cluster: dict[str, float] | None = None,
                  where: str = "the cluster") -> list[Check]:
    """All checks for `job` (align, train, precompute, sweep, realign, generate, evaluate). `cluster`: the total
    resources of the cluster the job will run on (`where` names it); None: not known, so the stages' requests are
    listed and only the GPU memory is checked."""
    rows: list[Check] = []
    stages = set(_stages(job))
    if "data" in stages:
        rows += check_data(cfg, job=job, offline=offline)
    unet = None
    kind = None
    if "model" in stages:
        model_rows, unet, kind = check_model(cfg, offline=offline)
        rows += model_rows
        rows += check_clip(cfg, offline=offline)
    if "scorers" in stages:
        rows += check_scorers(cfg, offline=offline)
    if cluster is None:
        where = "not known (--offline)" if offline else "not known"
    memory = worker_memory_gib(cfg, kind, unet) if (unet is not None and "train" in stages) else None
    rows += check_resources(cfg, job=job, cluster=cluster, where=where, gpu_memory_gib=gpu_memory_gib,
                            worker_memory_gib=memory)
    rows += check_storage(cfg, offline=offline)
    rows += check_semantics(cfg, job=job)
    return rows


def _stages(job: str) -> tuple[str, ...]:
    return {
        "precompute": ("data", "model"),
        "train": ("model", "train"),
        "generate": ("model",),
        "evaluate": ("model", "scorers"),
    }.get(job, ("data", "model", "train", "scorers"))


def joins_a_cluster(cfg: AlignConfig) -> bool:
    """Whether the job would join a running Ray (an address in the config or RAY_ADDRESS) rather than start one."""
    address = cfg.cluster.ray_address
    return address not in (None, "local") or (address is None and bool(os.environ.get("RAY_ADDRESS")))


def this_machine() -> dict[str, float]:
    """The CPUs and GPUs a local Ray started here would have."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


# ---------------------------------------------------------------------------------------------- the model


def check_model(cfg: AlignConfig, *, offline: bool) -> tuple[list[Check], Any, str | None]:
    """The base pipeline resolves and its components build (and match their weight files, for a folder).
    Returns the rows, the UNet built on the meta device (for the memory model) and the kind."""
    pretrained = cfg.model.pretrained
    needs = f"base model model.pretrained={pretrained}"
    if pretrained in BUILT_IN_MODELS:
        what = {"toy": "the toy base (the fit shipped in pipeline/assets, or fitted once)",
                "tiny": "a tiny SDXL-shaped pipeline built from configs"}[pretrained]
        return [Check("model", needs, f"{what}, under the run folder")], None, None
    from pipeline.models.architectures import HUB_IDS, build_on_meta
    from pipeline.models.check import check_pipeline

    local = is_local(pretrained) and os.path.exists(os.path.expanduser(pretrained))
    if not local and offline and pretrained not in HUB_IDS:
        return [Check("model", needs, "hub id not looked up (--offline); the project ships no architecture for it",
                      SKIP)], None, None
    rows, unet, kind = [], None, None
    for component in check_pipeline(pretrained, kind=cfg.model.kind, revision=cfg.model.revision,
                                    variant=cfg.model.variant, offline=offline):
        count = f"{component.parameters:,} parameters; " if component.parameters else ""
        found = " ".join(part for part in (component.found, component.problem) if part and part != "-")
        rows.append(Check("model", f"{component.component} ({component.cls})", count + found,
                          "OK" if component.ok else FAIL, component.fix or ""))
    if all(not r.failed for r in rows):
        from pipeline.models.loader import detect_kind

        import json

        kind = detect_kind(pretrained) if local else HUB_IDS.get(pretrained)
        if local:
            config = json.loads((Path(pretrained).expanduser() / "unet" / "config.json").read_text())
            unet = build_on_meta(config, "unet")
        elif kind is not None:
            unet = build_on_meta(kind, "unet")
    if cfg.train.init_unet is not None:
        init = os.path.join(os.path.expanduser(cfg.train.init_unet), "config.json")
        ok = os.path.isfile(init)
        rows.append(Check("model", f"train.init_unet={cfg.train.init_unet}", "a UNet folder" if ok else "no config.json",
                          "OK" if ok else FAIL, "" if ok else "point train.init_unet at a UNet folder (<run>/model)"))
    return rows, unet, kind


def check_clip(cfg: AlignConfig, *, offline: bool) -> list[Check]:
    """The CLIP of RPO's similarity weights: its weights as the clip scorer's check sees them."""
    if cfg.model.clip_pretrained in ("toy", "random"):
        what = {"toy": "the tiny CLIP fitted on the toy world (shipped)", "random": "seeded random weights (tests)"}
        return [Check("model", f"CLIP {cfg.model.clip_model} / {cfg.model.clip_pretrained}",
                      what[cfg.model.clip_pretrained])]
    from pipeline.evaluate.scorer_check import check_scorer

    result = check_scorer("clip", weights=cfg.model.clip_pretrained, arch=cfg.model.clip_model, offline=offline)
    return [_scorer_row(result, stage="model", needs=f"CLIP {cfg.model.clip_model} / {cfg.model.clip_pretrained} "
                                      f"(model.clip_model / model.clip_pretrained)")]


# -------------------------------------------------------------------------------------------- the scorers


def check_scorers(cfg: AlignConfig, *, offline: bool) -> list[Check]:
    rows = []
    for name in cfg.evaluate.scorers:
        if name == "style":  # hand-made, no weights
            rows.append(Check("scorers", "style", "the toy world's style scorer (no weights)"))
            continue
        options = vars(getattr(cfg.evaluate, name)) if hasattr(cfg.evaluate, name) else {}
        if name == "clip" and options.get("weights") is None:  # the clip scorer defaults to model.clip_*
            options = {**options, "weights": cfg.model.clip_pretrained, "arch": options.get("arch") or cfg.model.clip_model}
            if options["weights"] in ("toy", "random"):
                rows.append(Check("scorers", "clip", f"model.clip_* ({options['weights']})"))
                continue
        from pipeline.evaluate.scorer_check import check_scorer

        result = check_scorer(name, offline=offline, **options)
        rows.append(_scorer_row(result, stage="scorers", needs=name))
    return rows


def _scorer_row(result, *, stage: str, needs: str) -> Check:
    found = result.found + (f"; {result.problem}" if result.problem else "")
    return Check(stage, needs, found, "OK" if result.ok else FAIL, result.fix or "")


# ------------------------------------------------------------------------------------------------- output


def format_table(rows: list[Check], *, width: int = 118) -> str:
    """One line per check (long findings wrapped), a fix under each failure, and a verdict line."""
    lines = [f"{'stage':<10} {'needs':<44} {'result':<8} found", "-" * width]
    for row in rows:
        needs = textwrap.shorten(row.needs, 44, placeholder="...")
        wrapped = textwrap.wrap(row.found, width - 65) or [""]
        lines.append(f"{row.stage:<10} {needs:<44} {row.status:<8} {wrapped[0]}")
        lines += [f"{'':<64} {more}" for more in wrapped[1:]]
        if row.failed and row.fix:
            lines += [f"{'':<10} fix: {part}" for part in textwrap.wrap(row.fix, width - 16)]
    failed = sum(r.failed for r in rows)
    skipped = sum(r.status == SKIP for r in rows)
    lines.append("-" * width)
    lines.append(f"[preflight] {len(rows)} checks: {failed} failed, {skipped} skipped"
                 + (" -- fix the rows marked FAIL and run again" if failed else " -- ready"))
    return "\n".join(lines)


def require_preflight(cfg: AlignConfig, *, job: str) -> None:
    """The jobs' first step: the offline checks (and this machine's resources when the job starts its own Ray here);
    a failure prints the table and exits (code 2)."""
    local = not joins_a_cluster(cfg)
    rows = run_preflight(cfg, job=job, offline=True, cluster=this_machine() if local else None,
                         where="this machine" if local else "the cluster")
    if any(r.failed for r in rows):
        table = format_table(rows)
        print(table, flush=True)
        raise PreflightFailed(table)
