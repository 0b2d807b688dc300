"""``run_precompute(cfg)``: the preference table -> the feature store, on Ray Data, incrementally.

    summary = run_precompute(cfg)      # ray.init() first, or Ray Data starts a local Ray
    print(format_summary(summary))

Order of work, each step committed before the next relies on it:

1. Resolve the model and the data (``resolve_model_path``, ``resolve_data_source``: "tiny" and "toy" are built
   under the run folder) and the store's settings (model and CLIP identities, resolution, encoder settings).
   A store made with other settings is refused (``StoreMismatchError``) or, with
   ``precompute.on_mismatch=new_store``, left alone for a sibling store named after the settings' hash.
2. Read the table (bad rows -> quarantine). Pairs already committed or quarantined are skipped.
3. Unseen captions (always including "", which training's prompt dropout needs) -> ``TextEncoder`` actors ->
   text shards, committed.
4. Unseen images -> decode/resize/crop CPU tasks -> ``ImageEncoder`` actors -> image shards, committed. Images that
   fail to decode come back as records and quarantine their pairs; they never stop the run.
5. The new pairs (hashes only) and the new quarantine rows, committed last: a pair is never visible before
   the features it refers to.

Resource plan: each encoder actor takes ``precompute.actor_num_cpus`` CPUs (fractional by default) and
``precompute.actor_num_gpus`` GPUs; a decode task takes 1 CPU and a shard-writing task a quarter CPU. On a
2-CPU machine two 0.5-CPU actors leave a whole core for decoding, so the actors never starve the tasks that
feed them; on a GPU cluster the actors sit on the GPUs and the decode tasks use the CPUs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import AlignConfig
from pipeline.data import caption_hash, image_hash, load_preferences
from pipeline.precompute.store import (
    PAIRS_SCHEMA,
    STORE_QUARANTINE_SCHEMA,
    FeatureStore,
    assign_split,
    add_shards,
    check_settings,
    committed_pair_ids,
    new_manifest,
    settings_differences,
    sibling_store_uri,
    write_shard_batch,
)
from pipeline.storage import absolute, is_local

# The models and encoders (torch, diffusers, open_clip: ~7 s to import) are imported inside the functions that use
# them, so `import pipeline.precompute` stays light for readers such as the training dataset's lookup actors.

log = logging.getLogger(__name__)

DECODE_TASK_CPUS = 1.0
WRITE_TASK_CPUS = 0.25
COMMIT_EVERY_S = 60.0  # a crash loses at most this much finished encoding work


# ------------------------------------------------------------------------------------- what to work on


def local_run_dir(cfg: AlignConfig) -> Path:
    """A local folder for the run's generated inputs: the run folder itself, or a temp folder if that is remote."""
    if is_local(cfg.run_dir):
        return Path(absolute(cfg.run_dir))
    return Path(tempfile.gettempdir()) / "rpo-pipeline" / cfg.name


def tiny_model_dir(cfg: AlignConfig) -> Path:
    """Where "tiny" is built. The name carries the fit settings, so another setting builds another model and never
    reuses a stale one."""
    steps = cfg.model.tiny_fit_steps
    fit = f"_fit{steps}x{cfg.precompute.resolution}" if steps else ""
    kind = "_sd15" if cfg.model.kind == "sd15" else ""
    return local_run_dir(cfg) / f"tiny_model{kind}{fit}"


def resolve_model_path(cfg: AlignConfig) -> str:
    """The diffusers pipeline to load: "tiny" is built (once, seeded, its UNet fitted to the toy world for
    model.tiny_fit_steps) under the run folder; a local folder is made absolute (Ray workers do not share the
    driver's working directory); a hub id is returned as is."""
    if cfg.model.pretrained != "tiny":
        local = Path(cfg.model.pretrained).expanduser()
        return str(local.resolve()) if local.exists() else cfg.model.pretrained
    from pipeline.models.tiny import build_tiny_sd15, build_tiny_sdxl

    build = build_tiny_sd15 if cfg.model.kind == "sd15" else build_tiny_sdxl
    return str(build(tiny_model_dir(cfg), toy_fit_steps=cfg.model.tiny_fit_steps,
                     toy_fit_resolution=cfg.precompute.resolution))


def resolve_data_source(cfg: AlignConfig) -> str:
    """The preference table to read: "toy" is generated (same config, same bytes) under the run folder."""
    if cfg.data.source != "toy":
        return cfg.data.source
    from pipeline.data.toy import make_toy_world

    d = cfg.data
    path = make_toy_world(
        local_run_dir(cfg) / "toy_world", n_pairs=d.toy_pairs, resolution=d.toy_resolution,
        target_style=d.toy_target_style, seed=d.toy_seed,
    )
    return str(path)


def store_settings(cfg: AlignConfig, model_path: str) -> dict[str, Any]:
    """Everything that decides the stored values; two stores with equal settings are interchangeable."""
    from diffusers import AutoencoderKL

    from pipeline.models.clip import ClipEmbedder
    from pipeline.models.loader import model_identity

    identity = model_identity(model_path, revision=cfg.model.revision)
    if cfg.model.kind != "auto" and cfg.model.kind != identity["kind"]:
        raise ValueError(
            f"model.kind is {cfg.model.kind!r} but {model_path} is a {identity['kind']} pipeline; "
            f"set model.kind to 'auto' or {identity['kind']!r}"
        )
    vae_config = AutoencoderKL.load_config(model_path, subfolder="vae", revision=cfg.model.revision)
    return {
        "model": {**identity, "variant": cfg.model.variant},
        "clip": ClipEmbedder(cfg.model.clip_model, cfg.model.clip_pretrained).identity,
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
    load = load_preferences(
        source, drop_ties=cfg.data.drop_ties, max_image_pixels=cfg.data.max_image_pixels,
        max_aspect_ratio=cfg.data.max_aspect_ratio,
    )
    stored_quarantine = store.read_table(manifest, "quarantine")
    done = committed_pair_ids(manifest) | {p for p in stored_quarantine.column("pair_id").to_pylist() if p}
    is_done = pc.is_in(load.pairs.column("pair_id"), pa.array(sorted(done), pa.string()))
    new_pairs = load.pairs.filter(pc.invert(is_done))
    new_reader_quarantine = _unseen_quarantine(load.quarantine, stored_quarantine)

    texts = _unseen_texts(new_pairs, store.keys(manifest, "texts"))
    images = _unseen_images(new_pairs, store.keys(manifest, "images"))
    summary = {
        "store_uri": store_uri,
        "source": source,
        "rows_read": load.summary["rows"],
        "new_pairs": 0,
        "skipped_pairs": load.pairs.num_rows - new_pairs.num_rows,
        "quarantined": 0,
        "new_texts": texts.num_rows,
        "new_images": images.num_rows,
        "orphans_removed": len(orphans),
        "seconds": {"texts": 0.0, "images": 0.0},
    }
    if new_pairs.num_rows == 0 and new_reader_quarantine.num_rows == 0 and texts.num_rows == 0:
        return _finish(summary, manifest, started, nothing_new=True)

    spec = encoder_spec(cfg, model_path, settings)
    _warn_if_actors_starve_decoding(cfg)
    if texts.num_rows:
        tick = time.monotonic()
        manifest, _ = encode_rows(store, manifest, texts, "texts", cfg, spec)
        summary["seconds"]["texts"] = time.monotonic() - tick
    bad_images: dict[str, tuple[str, str]] = {}
    if images.num_rows:
        tick = time.monotonic()
        manifest, bad_images = encode_rows(store, manifest, images, "images", cfg, spec)
        summary["seconds"]["images"] = time.monotonic() - tick

    pairs, encode_quarantine = pair_rows(new_pairs, bad_images, cfg.data.holdout_fraction)
    quarantine = pa.concat_tables([_with_pair_id(new_reader_quarantine), encode_quarantine])
    shards = [store.write_shard("pairs", pairs.slice(start, cfg.precompute.rows_per_shard))
              for start in range(0, pairs.num_rows, cfg.precompute.rows_per_shard)]
    manifest = add_shards(manifest, "pairs", shards)
    if quarantine.num_rows:
        manifest = add_shards(manifest, "quarantine", [store.write_shard("quarantine", quarantine)])
    store.commit(manifest)
    summary.update(new_pairs=pairs.num_rows, quarantined=quarantine.num_rows)
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
    """One line for people: what this run did and what the store now holds."""
    holds = (f"store {summary['store_uri']} holds {summary['pairs_total']} pairs ({summary['train']} train, "
             f"{summary['holdout']} holdout), {summary['quarantine_total']} quarantined rows")
    if summary["nothing_new"]:
        return (f"precompute: nothing new in {summary['source']} ({summary['skipped_pairs']} pairs already done); "
                f"{holds}")
    return (f"precompute: {summary['new_pairs']} new pairs, {summary['skipped_pairs']} already done, "
            f"{summary['quarantined']} quarantined; encoded {summary['new_images']} images and "
            f"{summary['new_texts']} captions in {summary['seconds']['total']:.0f} s; {holds}")


# ------------------------------------------------------------------------------------ the steps of a run


def encoder_spec(cfg: AlignConfig, model_path: str, settings: dict[str, Any]):
    """What the encoder actors load, from the config and the store settings (``store_settings``)."""
    from pipeline.precompute.stages import EncoderSpec

    return EncoderSpec(
        model_path=model_path, kind=settings["model"]["kind"], revision=cfg.model.revision,
        variant=cfg.model.variant, clip_model=cfg.model.clip_model, clip_pretrained=cfg.model.clip_pretrained,
        resolution=cfg.precompute.resolution, use_gpu=cfg.precompute.actor_num_gpus > 0,
    )


def encode_rows(store: FeatureStore, manifest: dict[str, Any], rows: pa.Table, table: str, cfg: AlignConfig, spec):
    """Encode ``rows`` into shards of ``table``, committing them as they finish; returns (manifest, bad rows).

    One pipeline at a time (texts, then images), so at most ``num_encoder_actors`` actors hold CPUs or GPUs and
    the resource plan stays what the module docstring says. Running both at once (a union) was measured: on 2 CPUs
    it saved ~2 s of a ~30 s run with one actor per pool and cost time with two, as four processes then import
    torch at once.
    """
    pending: dict[str, int] = {}  # written, not yet committed shard -> rows
    bad: dict[str, tuple[str, str]] = {}
    last_commit = time.monotonic()
    dataset = _pipeline(rows, table, store.uri, cfg, spec)
    for records in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for record in records.to_pylist():
            if record["shard"]:
                pending[record["shard"]] = record["shard_rows"]
            else:
                bad[record["key"]] = (record["reason"], record["detail"])
        if pending and time.monotonic() - last_commit > COMMIT_EVERY_S:
            manifest = _commit(store, manifest, table, pending)
            last_commit = time.monotonic()
    if pending:
        manifest = _commit(store, manifest, table, pending)
    return manifest, bad


def pair_rows(pairs: pa.Table, bad_images: dict[str, tuple[str, str]], holdout_fraction: float):
    """(store pair rows, quarantine rows) for the new pairs; a pair with an image that failed to decode is
    quarantined."""
    good: dict[str, list] = {k: [] for k in ("pair_id", "caption_hash", "image_w_hash", "image_l_hash", "split",
                                            "source", "row")}
    bad: dict[str, list] = {k: [] for k in ("source", "row", "reason", "detail", "pair_id")}
    for row in pairs.select(["pair_id", "caption", "image_w", "image_l", "source", "row"]).to_pylist():
        w, l_ = image_hash(row["image_w"]), image_hash(row["image_l"])
        failed = [(which, bad_images[h]) for which, h in (("image_w", w), ("image_l", l_)) if h in bad_images]
        if failed:
            which, (reason, detail) = failed[0]
            for key, value in (("source", row["source"]), ("row", row["row"]), ("reason", reason),
                               ("detail", f"{which} {detail}"), ("pair_id", row["pair_id"])):
                bad[key].append(value)
            continue
        for key, value in (("pair_id", row["pair_id"]), ("caption_hash", caption_hash(row["caption"])),
                           ("image_w_hash", w), ("image_l_hash", l_),
                           ("split", assign_split(row["pair_id"], holdout_fraction)),
                           ("source", row["source"]), ("row", row["row"])):
            good[key].append(value)
    return pa.table(good, schema=PAIRS_SCHEMA), pa.table(bad, schema=STORE_QUARANTINE_SCHEMA)


# ------------------------------------------------------------------------------------------- helpers


def _pipeline(rows: pa.Table, table: str, store_uri: str, cfg: AlignConfig, spec):
    """The Ray dataset that encodes ``rows`` (unique captions or images) into shards of ``table``; yields records."""
    import ray

    from pipeline.precompute.stages import ImageEncoder, TextEncoder, decode_batch

    p = cfg.precompute
    blocks = [rows.slice(start, p.batch_size) for start in range(0, rows.num_rows, p.batch_size)]
    dataset = ray.data.from_arrow(blocks)
    if table == "images":
        dataset = dataset.map_batches(
            decode_batch, fn_kwargs={"resolution": p.resolution, "max_image_pixels": cfg.data.max_image_pixels},
            batch_size=p.batch_size, batch_format="numpy", num_cpus=DECODE_TASK_CPUS,
        )
    dataset = dataset.map_batches(
        ImageEncoder if table == "images" else TextEncoder,
        fn_constructor_kwargs={"spec": spec},
        compute=ray.data.ActorPoolStrategy(size=min(p.num_encoder_actors, len(blocks))),
        num_cpus=p.actor_num_cpus,
        num_gpus=p.actor_num_gpus,
        batch_size=p.batch_size,
        batch_format="numpy",
    )
    return dataset.map_batches(
        write_shard_batch, fn_kwargs={"store_uri": store_uri, "table": table},
        batch_size=p.rows_per_shard, batch_format="pyarrow", num_cpus=WRITE_TASK_CPUS,
    )


def _commit(store: FeatureStore, manifest: dict[str, Any], table: str, pending: dict[str, int]) -> dict[str, Any]:
    manifest = add_shards(manifest, table, [{"path": path, "rows": rows} for path, rows in sorted(pending.items())])
    store.commit(manifest)
    pending.clear()
    return manifest


def _unseen_quarantine(found: pa.Table, stored: pa.Table) -> pa.Table:
    """Reader quarantine rows not already stored (same file, row and reason)."""
    seen = set(zip(*(stored.column(c).to_pylist() for c in ("source", "row", "reason"))))
    keep = [key not in seen for key in zip(*(found.column(c).to_pylist() for c in ("source", "row", "reason")))]
    return found.filter(pa.array(keep, pa.bool_()))


def _with_pair_id(quarantine: pa.Table) -> pa.Table:
    return quarantine.append_column("pair_id", pa.nulls(quarantine.num_rows, pa.string()))


def _unseen_texts(pairs: pa.Table, known: set[str]) -> pa.Table:
    captions = sorted(set(pairs.column("caption").to_pylist()) | {""})  # "" always: prompt dropout needs it
    hashes = [caption_hash(c) for c in captions]
    keep = [(h, c) for h, c in zip(hashes, captions) if h not in known]
    return pa.table({"caption_hash": [h for h, _ in keep], "caption": [c for _, c in keep]},
                    schema=pa.schema([("caption_hash", pa.string()), ("caption", pa.string())]))


def _unseen_images(pairs: pa.Table, known: set[str]) -> pa.Table:
    unique: dict[str, bytes] = {}
    for column in ("image_w", "image_l"):
        for data in pairs.column(column).to_pylist():
            key = image_hash(data)
            if key not in known:
                unique.setdefault(key, data)
    return pa.table({"image_hash": list(unique), "image": list(unique.values())},
                    schema=pa.schema([("image_hash", pa.string()), ("image", pa.binary())]))


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
