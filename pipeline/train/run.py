"""Driver side of training: build the `TorchTrainer` over the feature store, fit it, say where the model went.

Resume is Ray Train's own: the run lives at <storage>/<name>/train, so running the same command again (same
`cluster.storage_path` and `name`) continues from the newest checkpoint, and `train.max_failures` lets Ray restart
failed workers from it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from typing import Any

from pipeline.config import AlignConfig, join_uri
from pipeline.storage import absolute, write_text
from pipeline.train.metrics import MetricsLogger, mlflow_tracking_uri
from pipeline.train.worker import WorkerPlan, train_loop_per_worker

TRAIN_RUN_NAME = "train"


@dataclass
class TrainResult:
    model_uri: str  # diffusers UNet folder (full) or folder with pytorch_lora_weights.safetensors (LoRA)
    checkpoint_uri: str | None
    metrics: dict[str, Any]


def model_uri(cfg: AlignConfig) -> str:
    return join_uri(cfg.run_dir, "model")


def with_absolute_paths(cfg: AlignConfig) -> AlignConfig:
    """The config with its local run and store folders made absolute, as the workers get it: a Ray Train worker runs
    in Ray's own working directory, where a relative path (the default storage "runs") would send its writes, the
    exported model among them, somewhere the driver never looks."""
    out = AlignConfig.from_dict(cfg.to_dict())
    out.cluster.storage_path = absolute(cfg.cluster.storage_path)
    if cfg.precompute.store:
        out.precompute.store = absolute(cfg.precompute.store)
    return out


def holdout_sample(cfg: AlignConfig, manifest: dict[str, Any]):
    """A fixed sample of held-apart pairs, put in Ray's object store once for every worker (None if there are none).

    It is small by construction (evaluate.holdout_pairs), so each worker evaluates it whole instead of running a
    second Ray Data pipeline beside the training one.
    """
    import ray

    from pipeline.precompute import read_training_dataset

    if cfg.evaluate.holdout_pairs == 0 or manifest["counts"].get("holdout", 0) == 0:
        return None
    holdout = read_training_dataset(cfg.store_uri, split="holdout")
    return ray.put(holdout.take_batch(cfg.evaluate.holdout_pairs, batch_format="numpy"))


def metrics_logger(cfg: AlignConfig, run_uri: str) -> MetricsLogger:
    """TensorBoard + metrics.jsonl always; MLflow where a tracking URI is configured (or in the environment)."""
    from pipeline.precompute.store import flatten_settings

    mlflow_uri = mlflow_tracking_uri(cfg.cluster.mlflow_tracking_uri)
    if mlflow_uri and importlib.util.find_spec("mlflow") is None:
        raise RuntimeError(
            f"MLflow tracking URI {mlflow_uri!r} is set (cluster.mlflow_tracking_uri or MLFLOW_TRACKING_URI) but "
            f"mlflow is not installed: pip install mlflow-skinny, or unset it"
        )
    return MetricsLogger(run_uri, mlflow_uri=mlflow_uri, experiment=cfg.name, params=flatten_settings(cfg.to_dict()))


def training_pairs(cfg: AlignConfig, manifest: dict[str, Any]) -> tuple[list[str] | None, int]:
    """(pair_ids to train on or None for all, their count): ``train.pair_ids`` names a Parquet file of store pairs."""
    if cfg.train.pair_ids is None:
        return None, manifest["counts"]["train"]
    import pyarrow.parquet as pq

    from pipeline.precompute.store import FeatureStore
    from pipeline.storage import filesystem

    fs, path = filesystem(cfg.train.pair_ids)
    wanted = set(pq.read_table(path, columns=["pair_id"], filesystem=fs).column("pair_id").to_pylist())
    pairs = FeatureStore(cfg.store_uri).read_table(manifest, "pairs", columns=["pair_id", "split"]).to_pydict()
    chosen = sorted(p for p, split in zip(pairs["pair_id"], pairs["split"]) if split == "train" and p in wanted)
    if len(chosen) < len(wanted):
        raise ValueError(f"train.pair_ids {cfg.train.pair_ids}: {len(wanted) - len(chosen)} of its {len(wanted)} "
                         f"pair_ids are not train pairs of the store {cfg.store_uri}; list only pairs it holds")
    return chosen, len(chosen)


def training_datasets(cfg: AlignConfig, pair_ids: list[str] | None, train_rows: int) -> tuple[dict[str, Any], int]:
    """({name: dataset}, training pairs): random batches read the split (or ``pair_ids``) as one dataset; planned
    batches build (or read) the store's batch plan for this global batch and give each rank its own dataset."""
    from pipeline.precompute import read_training_dataset
    from pipeline.precompute.plan import PlanSettings, build_batch_plan, read_planned_datasets
    from pipeline.train.worker import train_dataset_name

    t = cfg.train
    if t.batches == "random":
        datasets = {"train": read_training_dataset(cfg.store_uri, split="train", pair_ids=pair_ids)}
    else:
        settings = PlanSettings(global_batch=t.num_workers * t.batch_size_per_worker,
                                batches_per_cluster=t.plan_batches_per_cluster, seed=t.seed)
        plan = build_batch_plan(cfg.store_uri, settings, pair_ids=pair_ids)
        print(f"[train] batch plan {plan['uri']}: {plan['batches']} batches of {settings.global_batch} pairs from "
              f"{plan['clusters']} neighbourhoods ({plan['left_out_pairs']} pairs left out)", flush=True)
        train_rows = plan["pairs"]
        per_rank = read_planned_datasets(cfg.store_uri, plan, per_rank=t.batch_size_per_worker, world=t.num_workers)
        datasets = {train_dataset_name(cfg, rank): dataset for rank, dataset in enumerate(per_rank)}
    if train_rows <= t.materialize_max_pairs:
        datasets = {name: dataset.materialize() for name, dataset in datasets.items()}
    return datasets, train_rows


def training_model_path(cfg: AlignConfig) -> str:
    """The pipeline folder the workers load the UNet (policy and reference) and the noise schedule from: the base
    model, or with ``train.init_unet`` a folder that is the base pipeline's model_index.json and scheduler with that
    UNet in place of the base one (re-alignment continues from the promoted model; the promoted model is the new
    reference). It lives in the run folder, which workers on other nodes reach where that is shared storage."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    from pipeline.precompute import resolve_model_path
    from pipeline.storage import is_local

    from pipeline.precompute.run import base_weights

    base = resolve_model_path(cfg)
    if cfg.train.init_unet is None:
        return base
    unet = Path(absolute(cfg.train.init_unet))
    if not (unet / "config.json").is_file():
        raise FileNotFoundError(f"train.init_unet {cfg.train.init_unet}: no diffusers UNet folder there (config.json "
                                f"missing); point it at a folder a full fine-tune wrote (<run>/model)")
    run_dir = Path(absolute(cfg.run_dir)) if is_local(cfg.run_dir) else Path(tempfile.gettempdir()) / cfg.name
    folder = run_dir / "init_pipeline"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "scheduler").mkdir(parents=True)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        if Path(base).is_dir():
            shutil.copyfile(Path(base) / name, folder / name)
        else:  # a hub id: the two small files from the hub (or its cache)
            from huggingface_hub import hf_hub_download

            shutil.copyfile(hf_hub_download(base, name, revision=base_weights(cfg)["revision"]), folder / name)
    os.symlink(unet, folder / "unet", target_is_directory=True)
    return str(folder)


def training_weights(cfg: AlignConfig) -> dict[str, str | None]:
    """The revision and variant the workers load ``training_model_path(cfg)`` with: the base model's
    (model.revision / model.variant, as precompute loaded it). With ``train.init_unet`` the folder is local (its
    model_index and scheduler were copied at the base's revision) and its UNet is a fine-tune that training wrote
    with the default file names, so neither applies."""
    from pipeline.precompute.run import base_weights

    if cfg.train.init_unet is not None:
        return {"revision": None, "variant": None}
    return base_weights(cfg)


def worker_plan(cfg: AlignConfig, worker_cfg: AlignConfig, manifest: dict[str, Any], train_rows: int) -> WorkerPlan:
    """What every worker loads and writes: the model folder with its revision and variant, the store's model kind,
    the training pairs, where the model goes, the holdout sample."""
    return WorkerPlan(
        model_path=training_model_path(cfg),
        kind=manifest["model"]["kind"],
        train_rows=train_rows,
        model_out=model_uri(worker_cfg),
        holdout=holdout_sample(cfg, manifest),
        **training_weights(cfg),
    )


def run_training(cfg: AlignConfig, *, callbacks: list | None = None) -> TrainResult:
    """``callbacks``: more Ray Train callbacks (a sweep's trial passes Tune's TuneReportCallback)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.precompute import read_manifest, resolve_model_path
    from pipeline.precompute.run import model_settings
    from pipeline.precompute.store import check_store_model

    manifest = read_manifest(cfg.store_uri)
    # A store made by another base model would train silently on features that do not fit it.
    check_store_model(manifest, model_settings(cfg, resolve_model_path(cfg)), cfg.store_uri)
    pair_ids, train_rows = training_pairs(cfg, manifest)
    datasets, train_rows = training_datasets(cfg, pair_ids, train_rows)
    worker_cfg = with_absolute_paths(cfg)
    plan = worker_plan(cfg, worker_cfg, manifest, train_rows)
    # Same order every epoch and every run: a resumed or restarted run sees exactly the batches it would have.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    resources = {"CPU": cfg.train.worker_num_cpus} | ({"GPU": 1} if cfg.train.use_gpu else {})
    storage = worker_cfg.run_dir
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": worker_cfg.to_dict(), "plan": vars(plan)},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=TRAIN_RUN_NAME,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[metrics_logger(cfg, join_uri(storage, TRAIN_RUN_NAME)), *(callbacks or [])],
        ),
        datasets=datasets,
        # planned: each worker reads its own dataset whole (its slots of every planned batch)
        dataset_config=DataConfig(execution_options=ingest,
                                  datasets_to_split="all" if cfg.train.batches == "random" else []),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    write_text(join_uri(model_uri(cfg), "align_config.json"), json.dumps(cfg.to_dict(), indent=2))
    write_text(join_uri(model_uri(cfg), "final_metrics.json"), json.dumps(metrics, indent=2))
    return TrainResult(
        model_uri=model_uri(cfg),
        checkpoint_uri=result.checkpoint.path if result.checkpoint else None,
        metrics=metrics,
    )
