"""The preflight's checks, one function per stage of a run; each returns `Check` rows and never raises for a
user's mistake (the mistake is the row's problem, with its fix).

Each check reads only what it must: table headers and a sample of rows, configs and safetensors headers, models
built on the meta device (no weights in memory), a probe object in storage. `offline` skips what needs the network
(hub look-ups, remote data and storage, a live cluster): those rows say "skipped" and pass.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import AlignConfig, join_uri
from pipeline.storage import is_local

GIB = 2**30
OK, FAIL, SKIP = "OK", "FAIL", "skipped"


@dataclass(frozen=True)
class Check:
    stage: str  # data, model, scorers, resources, storage, semantics
    needs: str  # what the run needs
    found: str  # what the check found
    status: str = OK  # OK, FAIL or skipped
    fix: str = ""  # for a failure: what to change

    @property
    def failed(self) -> bool:
        return self.status == FAIL


# ------------------------------------------------------------------------------------------------ data


def check_data(cfg: AlignConfig, *, job: str, offline: bool, sample_rows: int = 64) -> list[Check]:
    """The source is reachable and a sample of its rows passes the validation precompute uses."""
    from pipeline.data.readers import Rejected, RowError, check_row, file_rows, list_table

    source = cfg.data.source
    needs = f"preference table data.source={source}"
    if source == "toy":
        return [Check("data", needs, f"the toy world: {cfg.data.toy_pairs} pairs made in code")]
    if offline and not is_local(source):
        return [Check("data", needs, "remote source not read (--offline)", SKIP)]
    try:
        listing = list_table(source)
    except (FileNotFoundError, ValueError, OSError) as err:
        if job == "realign" and isinstance(err, FileNotFoundError) and is_local(source):
            return [Check("data", needs, f"{source} does not exist yet: nothing new to re-align on", OK)]
        return [Check("data", needs, str(err), FAIL, "point data.source at a Pick-a-Pic Parquet file or folder, or a "
                                                      "JSONL file or folder of shards with their images")]
    reasons: dict[str, int] = {}
    read = 0
    for table in listing.files:
        for item in file_rows(table):
            if read >= sample_rows:
                break
            read += 1
            if isinstance(item, Rejected):
                reasons[item.reason] = reasons.get(item.reason, 0) + 1
                continue
            try:
                check_row(item, max_image_pixels=cfg.data.max_image_pixels, max_aspect_ratio=cfg.data.max_aspect_ratio)
            except RowError as err:
                reasons[err.reason] = reasons.get(err.reason, 0) + 1
        if read >= sample_rows:
            break
    bad = sum(reasons.values())
    found = (f"{len(listing.files)} table file(s); of a sample of {read} rows {read - bad} valid, {bad} would be "
             f"quarantined" + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if bad else ""))
    if listing.ignored:
        found += f"; {len(listing.ignored)} other file(s) not read ({', '.join(listing.ignored[:3])})"
    if read == 0 or bad == read:
        return [Check("data", needs, found, FAIL, "every sampled row would be quarantined: check the columns "
                                                  "(caption, jpg_0/jpg_1 or image_0_path/image_1_path, label_0) and "
                                                  "the image files (README 'Preference data')")]
    return [Check("data", needs, found)]


# ----------------------------------------------------------------------------------------------- storage


def check_storage(cfg: AlignConfig, *, offline: bool) -> list[Check]:
    """The run folder and the feature store are writable: a probe object is written, read back and removed."""
    rows = []
    for key, uri in (("cluster.storage_path", cfg.run_dir), ("precompute.store", cfg.store_uri)):
        needs = f"writable {key}"
        if offline and not is_local(uri):
            rows.append(Check("storage", needs, f"{uri}: remote storage not probed (--offline)", SKIP))
            continue
        try:
            probe_write(uri)
            rows.append(Check("storage", needs, f"{uri}: a probe object was written, read back and removed"))
        except OSError as err:
            rows.append(Check("storage", needs, f"{uri}: {type(err).__name__}: {err}", FAIL,
                              f"set {key} to a folder or bucket this job can write (credentials: README 'Object "
                              f"storage setup')"))
    return rows


def probe_write(uri: str) -> None:
    """Write, read back and delete a probe object under `uri`; local folders it had to create are removed again."""
    from pipeline.storage import filesystem

    fs, path = filesystem(join_uri(uri, f".preflight-{uuid.uuid4().hex}"))
    parent = path.rsplit("/", 1)[0]
    created = _missing_ancestors(Path(parent)) if is_local(uri) else []
    fs.create_dir(parent, recursive=True)
    try:
        with fs.open_output_stream(path) as out:
            out.write(b"probe")
        with fs.open_input_stream(path) as back:
            if back.read() != b"probe":
                raise OSError(f"{uri}: the probe object read back differently")
    finally:
        try:
            fs.delete_file(path)
        except OSError:
            pass
        for folder in created:  # deepest first: the run leaves no empty folder it did not find
            try:
                folder.rmdir()
            except OSError:
                break


def _missing_ancestors(folder: Path) -> list[Path]:
    """`folder` and its parents that do not exist yet, deepest first."""
    missing = []
    folder = folder.absolute()
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


# --------------------------------------------------------------------------------------------- semantics


def check_semantics(cfg: AlignConfig, *, job: str) -> list[Check]:
    """Settings that each pass validation alone but contradict each other or the job."""
    rows = []
    reward_models = [s for s in cfg.evaluate.scorers if s not in ("style", "clip")]
    evaluates = job in ("align", "realign", "sweep", "evaluate")
    if cfg.train.use_gpu and evaluates and cfg.generate.actor_num_gpus == 0:
        rows.append(Check("semantics", "generation on the hardware training uses",
                          "train.use_gpu=true but generate.actor_num_gpus=0: images would be generated on CPUs",
                          FAIL, "set generate.actor_num_gpus=1 (and generate.precision=fp16)"))
    if cfg.train.use_gpu and evaluates and reward_models and cfg.evaluate.actor_num_gpus == 0:
        rows.append(Check("semantics", "scoring on the hardware training uses",
                          f"train.use_gpu=true but evaluate.actor_num_gpus=0 for {', '.join(reward_models)}",
                          FAIL, "set evaluate.actor_num_gpus=1"))
    if job == "realign" and cfg.realign.gate_scorer not in cfg.evaluate.scorers:
        rows.append(Check("semantics", "a gate scorer that is scored",
                          f"realign.gate_scorer={cfg.realign.gate_scorer!r} is not in evaluate.scorers "
                          f"{cfg.evaluate.scorers}", FAIL,
                          f"add it to evaluate.scorers or set realign.gate_scorer to one of {cfg.evaluate.scorers}"))
    if job == "sweep" and not cfg.tune.search_space:
        rows.append(Check("semantics", "a sweep with something to sweep", "tune.search_space is empty", FAIL,
                          "set tune.search_space, e.g. --set 'tune.search_space={loss.beta: [2000, 5000]}'"))
    if not rows:
        rows.append(Check("semantics", "settings that agree with each other and the job",
                          "no contradiction found"))
    return rows


# ----------------------------------------------------------------------------------------------- resources


def stage_requests(cfg: AlignConfig, *, job: str) -> dict[str, dict[str, float]]:
    """What each stage of the job asks of the cluster at once: {stage: {"CPU": n, "GPU": n}}."""
    p, t, g, e = cfg.precompute, cfg.train, cfg.generate, cfg.evaluate
    stages = {
        "precompute": {"CPU": p.num_encoder_actors * p.actor_num_cpus, "GPU": p.num_encoder_actors * p.actor_num_gpus},
        "train": {"CPU": t.num_workers * t.worker_num_cpus, "GPU": t.num_workers * (1 if t.use_gpu else 0)},
        "generate": {"CPU": g.num_actors * g.actor_num_cpus, "GPU": g.num_actors * g.actor_num_gpus},
        "evaluate": {"CPU": e.num_actors * e.actor_num_cpus, "GPU": e.num_actors * e.actor_num_gpus},
    }
    if job == "sweep":  # each concurrent trial is a driver (1 CPU) plus its workers
        trials = cfg.tune.max_concurrent_trials
        stages["train"] = {"CPU": trials * (1 + stages["train"]["CPU"]), "GPU": trials * stages["train"]["GPU"]}
    used = {"precompute": ("precompute",), "train": ("precompute", "train"), "sweep": ("precompute", "train"),
            "generate": ("generate",), "evaluate": ("generate", "evaluate")}.get(job, tuple(stages))
    return {name: ask for name, ask in stages.items() if name in used}


def check_resources(cfg: AlignConfig, *, job: str, cluster: dict[str, float] | None, where: str,
                    gpu_memory_gib: float, worker_memory_gib: float | None) -> list[Check]:
    """Each stage's actors and workers against the cluster (`cluster`: its total CPU/GPU, None when unknown), and
    one training worker's GPU memory (`worker_memory_gib`, from the memory model) against `gpu_memory_gib`."""
    rows = []
    for stage, ask in stage_requests(cfg, job=job).items():
        needs = f"{stage}: {ask['CPU']:g} CPU" + (f", {ask['GPU']:g} GPU" if ask["GPU"] else "")
        if cluster is None:
            rows.append(Check("resources", needs, f"the cluster is {where}", SKIP))
            continue
        cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
        # Ray Data's read tasks need CPU beside the actors (a pool that takes every CPU deadlocks the pipeline).
        problems = []
        if ask["CPU"] >= cpus:
            problems.append(f"{ask['CPU']:g} CPU asked of {cpus:g} (none left for Ray Data's reads)")
        if ask["GPU"] > gpus:
            problems.append(f"{ask['GPU']:g} GPU asked of {gpus:g}")
        found = f"{where}: {cpus:g} CPU, {gpus:g} GPU"
        if problems:
            rows.append(Check("resources", needs, f"{found}; " + "; ".join(problems), FAIL, _resource_fix(stage)))
        else:
            rows.append(Check("resources", needs, found))
    if worker_memory_gib is not None:
        needs = f"train: {worker_memory_gib:.1f} GiB GPU memory a worker"
        if worker_memory_gib > gpu_memory_gib:
            rows.append(Check("resources", needs, f"GPUs of {gpu_memory_gib:g} GiB", FAIL,
                              "lower train.batch_size_per_worker, set train.gradient_checkpointing=true, "
                              "train.zero_stage=3 (with more workers) or train.offload_optimizer=true, or "
                              "train.mode=lora"))
        else:
            rows.append(Check("resources", needs, f"GPUs of {gpu_memory_gib:g} GiB"))
    return rows


def _resource_fix(stage: str) -> str:
    keys = {"precompute": "precompute.num_encoder_actors / actor_num_cpus / actor_num_gpus",
            "train": "train.num_workers / worker_num_cpus / use_gpu (sweeps: tune.max_concurrent_trials)",
            "generate": "generate.num_actors / actor_num_cpus / actor_num_gpus",
            "evaluate": "evaluate.num_actors / actor_num_cpus / actor_num_gpus"}
    return f"ask for less ({keys[stage]}) or join a bigger cluster"


def worker_memory_gib(cfg: AlignConfig, kind: str, unet: Any) -> float | None:
    """One training worker's GPU memory from the memory model, for a meta-built `unet` of `kind`; None on CPUs
    or for a kind the model has no activation measurement of."""
    from pipeline.train.deepspeed_config import resolve_zero_stage
    from pipeline.train.memory import ACTIVATION_BYTES_PER_IMAGE, training_memory_per_gpu

    t = cfg.train
    if not t.use_gpu or kind not in ACTIVATION_BYTES_PER_IMAGE:
        return None
    params = sum(p.numel() for p in unet.parameters())
    lora = lora_parameters(unet, rank=t.lora_rank) if t.mode == "lora" else None
    memory = training_memory_per_gpu(
        kind, params, resolution=cfg.precompute.resolution, pairs_per_worker=t.batch_size_per_worker,
        stage=resolve_zero_stage(t), gpus=t.num_workers, checkpointing=t.gradient_checkpointing,
        lora_parameters=lora, offload_optimizer=t.offload_optimizer, reference=cfg.loss.objective != "sft",
    )
    return memory.total / GIB


def lora_parameters(unet: Any, *, rank: int) -> int:
    """Adapter parameters training adds: rank * (in + out) per adapted Linear (pipeline.train.models.LORA_TARGETS)."""
    import torch

    from pipeline.train.models import LORA_TARGETS

    count = 0
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{target}") for target in LORA_TARGETS):
            count += rank * (module.in_features + module.out_features)
    return count
