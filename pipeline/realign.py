"""Scheduled re-alignment: when new preference pairs have arrived, train a new version from the promoted model and
promote it only if it beats that model.

    result = run_realign(cfg)      # ray.init() first (jobs/realign.py does)
    result.status                  # "promoted" | "kept" | "nothing_new"

One run, holding the registry's lock from start to end (a second, overlapping run refuses at once):

1. Precompute brings the feature store up to date with ``data.source`` (a folder that grows by new Parquet/JSONL
   shards); it encodes only pairs the store does not hold and quarantines bad rows with their reasons.
2. New pairs = the store's train pairs that no decided version has seen (each version records the pairs the store
   held when it ran). Fewer than ``realign.min_new_pairs``: nothing is trained or changed, and the run says so.
3. A new version ``v<N>`` trains (its own run, ``<name>-v<N>``, so it never resumes another version's) from the
   promoted model, which is also its reference (``train.init_unet``), on the new pairs plus
   ``realign.old_pairs_per_new`` seeded-sampled old pairs per new one (``train.pair_ids``).
4. The candidate and the promoted model (or the base before any promotion) generate the registry's fixed prompts
   with the same seeds, and are scored and compared (``pipeline.evaluate.run.evaluate_models``).
5. The gate (``pipeline.gate.decide``) promotes the candidate (an atomic index change) or keeps the promoted model;
   either way the version's record holds the decision and its reasons.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AlignConfig, ConfigError, join_uri
from pipeline.gate import decide
from pipeline.registry import Lock, Registry, version_number
from pipeline.storage import exists, filesystem, read_text, write_text

log = logging.getLogger(__name__)

PROMPTS_NAME = "prompts.jsonl"
CANDIDATE, BASELINE = "candidate", "promoted"  # the model tags of the comparison


@dataclass
class RealignResult:
    status: str  # "promoted" | "kept" | "nothing_new"
    version: str | None  # the version this run made (None when nothing was new)
    promoted: str | None  # the promoted version after the run (None: still the base model)
    reasons: list[str] = field(default_factory=list)
    report_path: str | None = None
    precompute: dict[str, Any] = field(default_factory=dict)


def registry_uri(cfg: AlignConfig) -> str:
    return cfg.realign.registry or join_uri(cfg.run_dir, "registry")


def run_owner() -> str:
    """Who holds the lock, for the refusal message: the Ray job's submission id where there is one (Ray's job
    supervisor hands the driver its metadata, which holds it, in RAY_JOB_CONFIG_JSON_ENV_VAR)."""
    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except ValueError:
        metadata = {}
    job = metadata.get("job_submission_id", "a local run")
    return f"{job} (pid {os.getpid()} on {socket.gethostname()})"


def check_realign_config(cfg: AlignConfig) -> None:
    if cfg.train.mode != "full":
        raise ConfigError("config key 'train.mode': re-alignment continues full fine-tunes from the promoted UNet; "
                          "set train.mode=full")
    if cfg.realign.gate_scorer not in cfg.evaluate.scorers:
        raise ConfigError(f"config key 'realign.gate_scorer': {cfg.realign.gate_scorer!r} is not one of "
                          f"evaluate.scorers {cfg.evaluate.scorers}; add it there or gate on one of those")


def run_realign(cfg: AlignConfig) -> RealignResult:
    """One re-alignment run (module docstring); raises RegistryLockedError if another run holds the registry."""
    check_realign_config(cfg)
    registry = Registry(registry_uri(cfg))
    with registry.lock(run_owner(), stale_after_s=cfg.realign.lock_stale_s) as lock:
        return _realign(cfg, registry, lock)


# ------------------------------------------------------------------------------------------------ steps


def _realign(cfg: AlignConfig, registry: Registry, lock: Lock) -> RealignResult:
    from pipeline.precompute import read_manifest, resolve_model_path, run_precompute
    from pipeline.precompute.store import FeatureStore

    # The base model is resolved once, so every version trains and generates from the very same folder (and the
    # store, keyed by it, is shared: the VAE and text encoders never change).
    cfg = AlignConfig.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                           "pretrained": resolve_model_path(cfg)}})
    summary = run_precompute(cfg)
    cfg.precompute.store = summary["store_uri"]
    manifest = read_manifest(cfg.store_uri)
    pairs = FeatureStore(cfg.store_uri).read_table(manifest, "pairs", columns=["pair_id", "split"]).to_pydict()
    train_ids = {p for p, split in zip(pairs["pair_id"], pairs["split"]) if split == "train"}

    promoted = registry.promoted()
    last = registry.last_decided()
    seen = _pair_ids(join_uri(registry.version_uri(last), "pairs_seen.parquet")) if last else set()
    new = sorted(train_ids - seen)
    if len(new) < cfg.realign.min_new_pairs:
        reason = (f"nothing new: {len(new)} unseen train pair(s) in {cfg.store_uri} (realign.min_new_pairs="
                  f"{cfg.realign.min_new_pairs}); the last decided version is {last}, the promoted one "
                  f"{promoted or 'none (the base model)'}; nothing trained, nothing changed")
        return RealignResult("nothing_new", None, promoted, [reason], precompute=summary)

    name = registry.new_version()
    vdir = registry.version_uri(name)
    old = sorted(train_ids & seen)
    n_old = min(len(old), round(cfg.realign.old_pairs_per_new * len(new)))
    rng = np.random.default_rng([cfg.train.seed, version_number(name)])
    chosen_old = sorted(rng.choice(np.array(old, dtype=object), n_old, replace=False).tolist()) if n_old else []
    _write_pairs(join_uri(vdir, "pairs_seen.parquet"), sorted(pairs["pair_id"]))
    _write_pairs(join_uri(vdir, "train_pairs.parquet"), new + chosen_old, new=[True] * len(new) + [False] * n_old)

    init = registry.model_uri(promoted) if promoted else None
    vcfg = _version_config(cfg, name, init=init, pair_ids=join_uri(vdir, "train_pairs.parquet"),
                           prompts=_fixed_prompts(cfg, registry))
    record: dict[str, Any] = {
        "status": "training", "run_name": vcfg.name, "run_dir": vcfg.run_dir, "started_from": promoted or "base",
        "config": vcfg.to_dict(),
        "data": {"source": summary["source"], "store_uri": cfg.store_uri, "store_pairs": len(pairs["pair_id"]),
                 "store_train_pairs": len(train_ids), "pair_shards": [s["path"] for s in manifest["tables"]["pairs"]],
                 "new_pairs": len(new), "old_pairs": n_old, "seen_before": last,
                 "precompute": {k: summary[k] for k in ("new_pairs", "skipped_pairs", "quarantined",
                                                        "quarantine_total", "rows_read")}},
    }
    registry.write_record(name, record)
    log.info("[realign] %s: %d new + %d old pairs, from %s", name, len(new), n_old, promoted or "the base model")

    from pipeline.train.run import run_training

    trained = run_training(vcfg)
    model = registry.store_model(name, trained.model_uri)
    record.update(status="evaluating", model=model, metrics=trained.metrics)
    registry.write_record(name, record)

    from pipeline.evaluate.run import evaluate_models

    evaluation = evaluate_models(vcfg, {BASELINE: init or "base", CANDIDATE: model}, out_dir=join_uri(vdir, "eval"),
                                 baseline=BASELINE)
    r = cfg.realign
    decision = decide(evaluation.comparison, candidate=CANDIDATE, gate_scorer=r.gate_scorer,
                      min_win_rate_lower=r.min_win_rate_lower, max_regression=r.max_regression)
    reasons = decision.reasons
    if promoted is None and r.promote_first_version and not decision.promote:
        reasons = ["first version: promoted without passing the gate (realign.promote_first_version=true); "
                   "the gate's verdict against the base model was:", *decision.reasons]
    record.update(report=evaluation.report_path, comparison=evaluation.comparison, decision=decision.to_dict(),
                  reasons=reasons)
    if decision.promote or (promoted is None and r.promote_first_version):
        registry.promote(name, expected=promoted, lock=lock, reason="; ".join(reasons))
        record["status"], now_promoted = "promoted", name
    else:
        record["status"], now_promoted = "kept", promoted
    registry.write_record(name, record)
    return RealignResult(record["status"], name, now_promoted, reasons, evaluation.report_path, summary)


def _version_config(cfg: AlignConfig, name: str, *, init: str | None, pair_ids: str, prompts: str) -> AlignConfig:
    values = cfg.to_dict()
    values["name"] = f"{cfg.name}-{name}"  # its own training run: never resumes another version's
    values["train"] = {**values["train"], "init_unet": init, "pair_ids": pair_ids}
    values["generate"] = {**values["generate"], "prompts": prompts}
    return AlignConfig.from_dict(values)


def _fixed_prompts(cfg: AlignConfig, registry: Registry) -> str:
    """A local file of the registry's prompts, chosen once (by the first version) so that every version is judged
    on the same ones even as the store's held-apart captions grow. Returns a local path (prompt files are local)."""
    from pipeline.generate.prompts import prompt_set

    uri = join_uri(registry.uri, PROMPTS_NAME)
    if not exists(uri):
        write_text(uri, "".join(json.dumps({"prompt": p}) + "\n" for p in prompt_set(cfg)))
    local = Path(tempfile.mkdtemp(prefix="realign-prompts-")) / PROMPTS_NAME
    local.write_text(read_text(uri))
    return str(local)


def _write_pairs(uri: str, pair_ids: list[str], new: list[bool] | None = None) -> None:
    columns = {"pair_id": pa.array(pair_ids, pa.string())}
    if new is not None:
        columns["new"] = pa.array(new, pa.bool_())
    fs, path = filesystem(uri)
    pq.write_table(pa.table(columns), path, filesystem=fs)


def _pair_ids(uri: str) -> set[str]:
    fs, path = filesystem(uri)
    return set(pq.read_table(path, columns=["pair_id"], filesystem=fs).column("pair_id").to_pylist())


def format_result(result: RealignResult) -> list[str]:
    """Lines for people: what the run decided and why (and the data folder's files that were not read)."""
    ignored = (result.precompute or {}).get("ignored_files") or []
    not_read = ([f"[realign] not read (not .parquet/.jsonl shards): {', '.join(ignored[:5])}"
                 + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")] if ignored else [])
    if result.status == "nothing_new":
        return [f"[realign] {result.reasons[0]}", *not_read]
    verb = "promoted" if result.status == "promoted" else f"kept {result.promoted or 'the base model'}; rejected"
    lines = [f"[realign] {verb} {result.version}", *not_read]
    lines += [f"[realign]   {reason}" for reason in result.reasons]
    lines.append(f"[realign] report: {result.report_path}")
    return lines
