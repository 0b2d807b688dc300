"""``run_precompute(cfg)``: the preference table -> the feature store, streamed through Ray Data, incrementally.

    summary = run_precompute(cfg)      # ray.init() first, or Ray Data starts a local Ray
    print(format_summary(summary))

Order of work, each step committed before the next relies on it:

1. Check that the source and the store can be reached (a missing bucket or credentials end the run here, naming
   the URI and what to set). Resolve the model and the data ("tiny" and "toy" are built under the run folder) and
   the store's settings. A store made with other settings is refused (``StoreMismatchError``) or, with
   ``precompute.on_mismatch=new_store``, left alone for a sibling store named after the settings' hash. List the
   source's shards (a folder's .parquet and .jsonl files); its other files are named in ``summary["ignored_files"]``
   and in ``format_summary``'s line, never passed over without a word.
2. One Ray Data pipeline (``pipeline.precompute.stream``): read tasks, one per table file, read and check rows
   (bad rows -> quarantine, the reasons of ``load_preferences``); tasks claim their block's keys in the run's
   ``Ledger`` actor (which knows what the store holds), write the new pairs (hashes only) and quarantine rows as
   uncommitted shards, and pass on each unseen caption (always including "", which prompt dropout needs) and image
   once; decode/resize/crop tasks; ``FeatureEncoder`` actors; shard-writing tasks. The driver sees only small
   records (shard names and counts) and commits the feature shards as they finish.
3. Last, the pair and quarantine shards are committed: a pair is never visible before the features it refers to.
   A crash leaves committed features (not encoded again) and unlisted files (removed by the next run).

Resource plan: each encoder actor takes ``precompute.actor_num_cpus`` CPUs (fractional by default) and
``precompute.actor_num_gpus`` GPUs; read and decode tasks take half a CPU, shard-writing tasks a quarter, the
ledger none. On a 2-CPU machine one 0.5-CPU actor leaves room for a read, a decode and a write task at once, so
the actors never starve the tasks that feed them; on a GPU cluster the actors sit on the GPUs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import AlignConfig
from pipeline.data.readers import list_table
from pipeline.data.toy import resolve_data_source
from pipeline.models.resolve import resolve_model_path, tiny_model_dir
from pipeline.precompute.store import (
    FeatureStore,
    add_shards,
    check_settings,
    new_manifest,
    settings_differences,
    sibling_store_uri,
)
from pipeline.storage import absolute, check_access, local_run_dir

# The models and encoders (torch, diffusers, open_clip: ~7 s to import) are imported inside the functions that use
# them, so `import pipeline.precompute` stays light for readers such as the training dataset's lookup actors.

log = logging.getLogger(__name__)

READ_TASK_CPUS = 0.5
DECODE_TASK_CPUS = 0.5
WRITE_TASK_CPUS = 0.25
COMMIT_EVERY_S = 60.0  # a crash loses at most this much finished encoding work

__all__ = ["local_run_dir", "resolve_data_source", "resolve_model_path", "tiny_model_dir"]  # moved; still here


def base_weights(cfg: AlignConfig) -> dict[str, str | None]:
    """Which files of the base model every stage loads: ``revision`` (hub branch, tag or commit) and ``variant``
    (e.g. "fp16": ``*.fp16.safetensors``), from model.revision / model.variant.

    The one place they are read: precompute's encoders, the store's model record (which training checks), the
    training workers' policy, reference and noise schedule, and generation's base pipeline all take them from
    here, so the store never vouches for weights that another stage does not load."""
    return {"revision": cfg.model.revision, "variant": cfg.model.variant}


def model_settings(cfg: AlignConfig, model_path: str) -> dict[str, Any]:
    """The model's identity as a store records it: source, kind, weights hash (+ hub commit), variant."""
    from pipeline.models.loader import model_identity

    weights = base_weights(cfg)
    identity = model_identity(model_path, revision=weights["revision"])
    if cfg.model.kind != "auto" and cfg.model.kind != identity["kind"]:
        raise ValueError(
            f"model.kind is {cfg.model.kind!r} but {model_path} is a {identity['kind']} pipeline; "
            f"set model.kind to 'auto' or {identity['kind']!r}"
        )
    return {**identity, "variant": weights["variant"]}


def store_settings(cfg: AlignConfig, model_path: str) -> dict[str, Any]:
    """Everything that decides the stored values; two stores with equal settings are interchangeable."""
    from diffusers import AutoencoderKL

    from pipeline.models.clip import ClipEmbedder
    from pipeline.models.resolve import resolve_clip_pretrained

    vae_config = AutoencoderKL.load_config(model_path, subfolder="vae", revision=base_weights(cfg)["revision"])
    return {
        "model": model_settings(cfg, model_path),
        "clip": ClipEmbedder(cfg.model.clip_model, resolve_clip_pretrained(cfg)).identity,
        "resolution": cfg.precompute.resolution,
        "encoder": {
            "latents": "vae latent_dist.mean * scaling_factor",
            "vae_scaling_factor": vae_config["scaling_factor"],
            "resize": "shorter side to resolution, bilinear; centre crop",
            "compute_dtype": "float32",
            "stored_dtype": "float16 (latents, prompt embeddings); float32 (CLIP, add_time_ids)",
            "clip_image_input": "the training crop",
        },
        "split": {"holdout_fraction": cfg.data.holdout_fraction, "rule": "sha256('split:' + pair_id) < fraction"},
    }


def resolve_store_uri(cfg: AlignConfig, settings: dict[str, Any]) -> str:
    """``cfg.store_uri`` (local paths made absolute: Ray workers do not share the driver's working directory), or
    its settings-named sibling when the store there was made with other settings and on_mismatch=new_store.

    Raises StoreMismatchError (naming the keys, both values and the two ways out) when it differs otherwise.
    """
    store_uri = absolute(cfg.store_uri)
    manifest = FeatureStore(store_uri).read_manifest()
    if manifest is None or not settings_differences(manifest, settings):
        return store_uri
    if cfg.precompute.on_mismatch == "error":
        check_settings(manifest, settings, store_uri)
    sibling = sibling_store_uri(store_uri, settings)
    sibling_manifest = FeatureStore(sibling).read_manifest()
    if sibling_manifest is not None:
        check_settings(sibling_manifest, settings, sibling)
    return sibling


# ------------------------------------------------------------------------------------------------ run


def run_precompute(cfg: AlignConfig) -> dict[str, Any]:
    """Bring the feature store up to date with the preference table; returns the run's summary (see module doc)."""
    import ray

    from pipeline.precompute.ledger import Ledger

    check_access(cfg.data.source, config_key="data.source")
    check_access(cfg.store_uri, config_key="precompute.store")
    if not ray.is_initialized():
        ray.init()  # no address: RAY_ADDRESS or a running head, by Ray's own rules
    started = time.monotonic()
    model_path = resolve_model_path(cfg)
    settings = store_settings(cfg, model_path)
    store_uri = resolve_store_uri(cfg, settings)
    store = FeatureStore(store_uri)
    manifest = store.read_manifest() or new_manifest(settings)
    orphans = store.remove_orphans(manifest)
    if orphans:
        log.warning("removed %d uncommitted file(s) a crashed run left in %s", len(orphans), store_uri)
    source = resolve_data_source(cfg)
    listing = list_table(source)  # a folder's other files are reported in the summary, never passed over silently
    files = listing.files

    _warn_if_actors_starve_decoding(cfg)
    ledger = ray.remote(num_cpus=0)(Ledger).remote(store_uri, manifest)
    try:
        manifest, bad_images = _stream(store, manifest, files, ledger, cfg, encoder_spec(cfg, model_path, settings))
        result = ray.get(ledger.result.remote())
    finally:
        ray.kill(ledger)
    counts, shards = result["counts"], result["shards"]
    if bad_images:
        shards, dropped = _drop_pairs_with_bad_images(store, shards, bad_images)
        counts["new_pairs"] -= dropped
        counts["new_quarantine"] += dropped
    summary = {
        "store_uri": store_uri,
        "source": source,
        "rows_read": counts["rows"],
        "new_pairs": counts["new_pairs"],
        "skipped_pairs": counts["skipped_pairs"],
        "quarantined": counts["new_quarantine"],
        "new_texts": counts["new_texts"],
        "new_images": counts["new_images"],
        "orphans_removed": len(orphans),
        "ignored_files": listing.ignored,
        # the same counts as load_preferences(source).summary
        "reader": {k: counts[k] for k in ("rows", "kept", "ties", "duplicates", "quarantined")}
        | {"quarantined_by_reason": result["by_reason"], "ignored_files": listing.ignored},
        "seconds": {},
    }
    if not shards["pairs"] and not shards["quarantine"] and not counts["new_texts"]:
        return _finish(summary, manifest, started, nothing_new=True)
    manifest = add_shards(manifest, "pairs", shards["pairs"])
    manifest = add_shards(manifest, "quarantine", shards["quarantine"])
    store.commit(manifest)
    return _finish(summary, manifest, started, nothing_new=False)


def _finish(summary: dict[str, Any], manifest: dict[str, Any], started: float, *, nothing_new: bool) -> dict[str, Any]:
    counts = manifest["counts"]
    summary["seconds"]["total"] = time.monotonic() - started
    summary.update(
        nothing_new=nothing_new, pairs_total=counts["pairs"], train=counts["train"], holdout=counts["holdout"],
        quarantine_total=counts["quarantine"],
    )
    log.info(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """One line for people: what this run did and what the store now holds (and which files it did not read)."""
    holds = (f"store {summary['store_uri']} holds {summary['pairs_total']} pairs ({summary['train']} train, "
             f"{summary['holdout']} holdout), {summary['quarantine_total']} quarantined rows")
    if summary["nothing_new"]:
        line = (f"precompute: nothing new in {summary['source']} ({summary['skipped_pairs']} pairs already done); "
                f"{holds}")
    else:
        line = (f"precompute: {summary['new_pairs']} new pairs, {summary['skipped_pairs']} already done, "
                f"{summary['quarantined']} quarantined; encoded {summary['new_images']} images and "
                f"{summary['new_texts']} captions in {summary['seconds']['total']:.0f} s; {holds}")
    return line + _ignored_note(summary.get("ignored_files", []))


def _ignored_note(ignored: list[str]) -> str:
    if not ignored:
        return ""
    shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
    return (f"; NOT READ: {len(ignored)} file(s) in the data folder that are not .parquet/.jsonl shards ({shown}): "
            f"convert them to Parquet or JSONL, or move them out of data.source")


# ------------------------------------------------------------------------------------ the steps of a run


def encoder_spec(cfg: AlignConfig, model_path: str, settings: dict[str, Any]):
    """What the encoder actors load, from the config and the store settings (``store_settings``)."""
    from pipeline.models.resolve import resolve_clip_pretrained
    from pipeline.precompute.stages import EncoderSpec

    return EncoderSpec(
        model_path=model_path, kind=settings["model"]["kind"], **base_weights(cfg),
        clip_model=cfg.model.clip_model, clip_pretrained=resolve_clip_pretrained(cfg),
        resolution=cfg.precompute.resolution, use_gpu=cfg.precompute.actor_num_gpus > 0,
        batch_size=cfg.precompute.batch_size,
    )


def feature_pipeline(files, ledger, store_uri: str, cfg: AlignConfig, spec):
    """The Ray dataset from the table files to written feature shards; yields ``stream.RECORD_SCHEMA`` records."""
    import ray

    from pipeline.precompute.source import RowCheck, read_checked_rows
    from pipeline.precompute.stream import FeatureEncoder, decode_items, plan_block, write_feature_shards

    p, d = cfg.precompute, cfg.data
    check = RowCheck(drop_ties=d.drop_ties, max_image_pixels=d.max_image_pixels, max_aspect_ratio=d.max_aspect_ratio)
    return (
        read_checked_rows(files, check, num_cpus=READ_TASK_CPUS)
        .map_batches(plan_block, fn_kwargs={"ledger": ledger, "store_uri": store_uri,
                                            "holdout_fraction": d.holdout_fraction},
                     batch_size=None, batch_format="pyarrow", num_cpus=READ_TASK_CPUS)
        .map_batches(decode_items, fn_kwargs={"resolution": p.resolution, "max_image_pixels": d.max_image_pixels},
                     batch_size=p.batch_size, batch_format="pyarrow", num_cpus=DECODE_TASK_CPUS)
        .map_batches(FeatureEncoder, fn_constructor_kwargs={"spec": spec},
                     compute=ray.data.ActorPoolStrategy(size=p.num_encoder_actors),
                     num_cpus=p.actor_num_cpus, num_gpus=p.actor_num_gpus, batch_size=p.batch_size,
                     batch_format="pyarrow")
        .map_batches(write_feature_shards, fn_kwargs={"store_uri": store_uri}, batch_size=p.rows_per_shard,
                     batch_format="pyarrow", num_cpus=WRITE_TASK_CPUS)
    )


def _stream(store: FeatureStore, manifest: dict[str, Any], files, ledger, cfg: AlignConfig, spec):
    """Run the feature pipeline, committing finished feature shards every COMMIT_EVERY_S; (manifest, bad images)."""
    pending: dict[str, dict[str, int]] = {"texts": {}, "images": {}}  # written, not yet committed shard -> rows
    bad: dict[str, tuple[str, str]] = {}
    last_commit = time.monotonic()
    for records in feature_pipeline(files, ledger, store.uri, cfg, spec).iter_batches(
            batch_size=None, batch_format="pyarrow"):
        for record in records.to_pylist():
            if record["shard"]:
                pending[record["table"]][record["shard"]] = record["shard_rows"]
            else:
                bad[record["key"]] = (record["reason"], record["detail"])
        if time.monotonic() - last_commit > COMMIT_EVERY_S:
            manifest = _commit(store, manifest, pending)
            last_commit = time.monotonic()
    return _commit(store, manifest, pending), bad


def _commit(store: FeatureStore, manifest: dict[str, Any], pending: dict[str, dict[str, int]]) -> dict[str, Any]:
    if not any(pending.values()):
        return manifest
    for table, shards in pending.items():
        manifest = add_shards(manifest, table, [{"path": path, "rows": rows} for path, rows in sorted(shards.items())])
        shards.clear()
    store.commit(manifest)
    return manifest


def _drop_pairs_with_bad_images(store: FeatureStore, shards: dict[str, list], bad_images: dict[str, tuple[str, str]]):
    """This run's pair shards rewritten without pairs whose images failed in the encode stage (quarantined instead);
    one shard at a time, and only when such images exist (the reader decodes every image first)."""
    import pyarrow.parquet as pq

    from pipeline.precompute.stream import drop_pairs_with_bad_images

    pairs, quarantine, dropped = [], list(shards["quarantine"]), 0
    for entry in shards["pairs"]:
        path = store._path(entry["path"])
        kept, bad = drop_pairs_with_bad_images(pq.read_table(path, filesystem=store.fs), bad_images)
        if bad.num_rows:
            store.fs.delete_file(path)
            dropped += bad.num_rows
            quarantine.append(store.write_shard("quarantine", bad))
            if kept.num_rows:
                pairs.append(store.write_shard("pairs", kept))
        else:
            pairs.append(entry)
    return {"pairs": pairs, "quarantine": quarantine}, dropped


def _warn_if_actors_starve_decoding(cfg: AlignConfig) -> None:
    import ray

    p = cfg.precompute
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if p.num_encoder_actors * p.actor_num_cpus + DECODE_TASK_CPUS > cpus:
        log.warning(
            "precompute: %d encoder actors x %.2f CPUs leave less than one CPU of this cluster's %.0f for the decode "
            "tasks; the pipeline waits until the cluster grows. Lower precompute.num_encoder_actors or "
            "precompute.actor_num_cpus on a small machine.", p.num_encoder_actors, p.actor_num_cpus, cpus,
        )
