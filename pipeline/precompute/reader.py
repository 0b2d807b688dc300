"""The training reader: the feature store's committed pairs as logical training rows (a ``ray.data.Dataset``).

The store's format (layout, schemas, commit protocol) is ``pipeline.precompute.store``; this module only reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.precompute.store import SPLITS, TABLE_KEYS, FeatureStore, read_manifest, stacked_tensors
from pipeline.storage import absolute, filesystem

PAIR_BLOCK_ROWS = 256  # pairs per Ray Data block of the training dataset


def load_empty_prompt(store_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds [77, D] float16, pooled [P] float16) of the empty caption, for training's prompt dropout."""
    from pipeline.data.schema import caption_hash

    store = FeatureStore(store_uri)
    texts = store.read_table(read_manifest(store_uri), "texts", keys=[caption_hash("")])
    if texts.num_rows == 0:
        raise ValueError(f"feature store {store_uri} holds no embedding of the empty caption; re-run precompute on it")
    prompt = stacked_tensors(texts.column("prompt_embeds"), texts.column("prompt_embeds_shape").to_pylist())[0]
    pooled = stacked_tensors(texts.column("pooled_prompt_embeds"))[0]
    return prompt, pooled


def feature_locations(store: FeatureStore, manifest: dict, table: str) -> pa.Table:
    """Where each committed row of ``table`` ("images" or "texts") lives: its key, ``shard`` (index into the
    manifest's list of that table's shards) and ``row`` within the shard. Only the key column is read (about 70
    bytes a row), never the features; the shard boundaries are the manifest's row counts."""
    key = TABLE_KEYS[table]
    keys = store.read_table(manifest, table, columns=[key]).column(key)
    counts = [shard["rows"] for shard in manifest["tables"][table]]
    return pa.table({
        key: keys,
        "shard": pa.array(np.repeat(np.arange(len(counts), dtype=np.int32), counts)),
        "row": pa.array(np.concatenate([np.arange(n, dtype=np.int32) for n in counts] or [np.zeros(0, np.int32)])),
    })


def locate_pairs(pairs: pa.Table, images: pa.Table, texts: pa.Table) -> pa.Table:
    """``pairs`` (in its order) with the shard and row of its winner, loser and caption features:
    ``w_shard``, ``w_row``, ``l_shard``, ``l_row``, ``t_shard``, ``t_row``. A pair whose feature the store does not
    hold is an error naming it (a damaged store)."""
    located = pairs.select(["pair_id", "caption_hash", "image_w_hash", "image_l_hash"]).append_column(
        "position", pa.array(np.arange(pairs.num_rows, dtype=np.int64)))
    for side, locations, hash_column in (("w", images, "image_w_hash"), ("l", images, "image_l_hash"),
                                         ("t", texts, "caption_hash")):
        renamed = locations.rename_columns([hash_column + "_key", f"{side}_shard", f"{side}_row"])
        located = located.join(renamed, keys=hash_column, right_keys=hash_column + "_key", join_type="left outer")
        missing = located.filter(pc.is_null(located.column(f"{side}_shard")))
        if missing.num_rows:
            what = "caption" if side == "t" else "image"
            raise KeyError(f"committed pair {missing.column('pair_id')[0]} refers to {what} "
                           f"{missing.column(hash_column)[0]} that the store does not hold; the store is damaged, "
                           f"re-run precompute into a new store")
    located = located.sort_by("position")
    return located.select(["pair_id", "w_shard", "w_row", "l_shard", "l_row", "t_shard", "t_row"])


def gather_rows(fs, paths: Sequence[str], shards: np.ndarray, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """The rows (``shards[i]``, ``rows[i]``) of the shard files ``paths``, in request order, reading from each shard
    only the Parquet row groups that hold them: memory is the answer plus one shard's needed groups."""
    pieces, order = [], []
    requests = np.arange(len(rows))
    for shard in np.unique(shards):
        wanted = requests[shards == shard]
        with fs.open_input_file(paths[shard]) as handle:
            parquet = pq.ParquetFile(handle)
            sizes = np.array([parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            groups = np.searchsorted(starts, rows[wanted], side="right") - 1
            needed = np.unique(groups)
            # One read of all needed groups (per-call overhead dominates small groups); where each group's rows
            # land in it: the sizes of the groups read before it.
            landed = np.concatenate([[0], np.cumsum(sizes[needed])[:-1]])
            block = parquet.read_row_groups(needed.tolist(), columns=list(columns))
            at = landed[np.searchsorted(needed, groups)] + rows[wanted] - starts[groups]
            pieces.append(block.take(pa.array(at)))
            order.append(wanted)
    if not pieces:
        return pa.table({})
    gathered = pa.concat_tables(pieces)
    return gathered.take(pa.array(np.argsort(np.concatenate(order), kind="stable")))


IMAGE_COLUMNS = ("latents", "latent_shape", "clip_image", "add_time_ids")
TEXT_COLUMNS = ("prompt_embeds", "prompt_embeds_shape", "pooled_prompt_embeds", "clip_text")
PLAN_COLUMNS = ("s_text", "s_image")
FEATURE_SETS = ("all", "clip")  # "clip": only the CLIP embeddings (what the batch planner reads)
PASSED_THROUGH = ("batch", "slot")  # a batch plan's columns, when the located rows carry them


def pair_features(batch: dict[str, np.ndarray], *, store_uri: str, image_paths: Sequence[str],
                  text_paths: Sequence[str], plan_paths: Sequence[str] = (), features: str = "all",
                  ) -> dict[str, np.ndarray]:
    """Ray Data stage of ``read_training_dataset``: located pair rows -> logical training rows. A task per block,
    reading only the row groups its pairs need, so no process ever holds more than a few blocks of features.
    With ``plan_paths`` (a batch plan's files) each row also gets its rows of its batch's similarity matrices."""
    fs, _ = filesystem(store_uri)
    n = len(batch["pair_id"])
    clip_only = features == "clip"
    image_columns = ("clip_image",) if clip_only else IMAGE_COLUMNS
    text_columns = ("clip_text",) if clip_only else TEXT_COLUMNS
    images = gather_rows(fs, image_paths, np.concatenate([batch["w_shard"], batch["l_shard"]]),
                         np.concatenate([batch["w_row"], batch["l_row"]]), image_columns)
    texts = gather_rows(fs, text_paths, batch["t_shard"], batch["t_row"], text_columns)
    clip_image = stacked_tensors(images.column("clip_image"))
    rows = {"pair_id": batch["pair_id"], "clip_text": stacked_tensors(texts.column("clip_text")),
            "clip_image_w": clip_image[:n], "clip_image_l": clip_image[n:]}
    if not clip_only:
        latents = stacked_tensors(images.column("latents"), images.column("latent_shape").to_pylist())
        time_ids = stacked_tensors(images.column("add_time_ids"))
        rows.update({
            "latents_w": latents[:n],
            "latents_l": latents[n:],
            "prompt_embeds": stacked_tensors(texts.column("prompt_embeds"),
                                             texts.column("prompt_embeds_shape").to_pylist()),
            "pooled_prompt_embeds": stacked_tensors(texts.column("pooled_prompt_embeds")),
            "add_time_ids_w": time_ids[:n],
            "add_time_ids_l": time_ids[n:],
        })
    rows.update({name: batch[name] for name in PASSED_THROUGH if name in batch})
    if len(plan_paths):
        similarities = gather_rows(fs, plan_paths, batch["p_shard"], batch["p_row"], PLAN_COLUMNS)
        rows.update({name: stacked_tensors(similarities.column(name)) for name in PLAN_COLUMNS})
    return rows


def located_dataset(store_uri: str, store: FeatureStore, manifest: dict, located: pa.Table, *,
                    block_rows: int = PAIR_BLOCK_ROWS, features: str = "all", plan_paths: Sequence[str] = ()):
    """The Ray Data dataset of the pairs ``located`` names (``locate_pairs``' columns, in its order), in blocks of
    ``block_rows`` pairs, one ``pair_features`` task each."""
    import ray

    if features not in FEATURE_SETS:
        raise ValueError(f"features must be one of {FEATURE_SETS}, got {features!r}")
    blocks = [located.slice(start, block_rows) for start in range(0, located.num_rows, block_rows)]
    return ray.data.from_arrow(blocks).map_batches(
        pair_features,
        fn_kwargs={"store_uri": store_uri, "image_paths": store.shard_paths(manifest, "images"),
                   "text_paths": store.shard_paths(manifest, "texts"), "plan_paths": list(plan_paths),
                   "features": features},
        batch_size=None,  # one block, as planned: its pairs' features only
        batch_format="numpy",
        num_cpus=0.25,
    )


def split_pairs(store: FeatureStore, manifest: dict, split: str, pair_ids: Sequence[str] | None = None) -> pa.Table:
    """The committed pairs of ``split`` (ids and hashes, ~300 bytes a pair), in store order; only ``pair_ids`` if
    given."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    columns = ["pair_id", "caption_hash", "image_w_hash", "image_l_hash", "split"]
    pairs = store.read_table(manifest, "pairs", columns=columns)
    pairs = pairs.filter(pc.equal(pairs.column("split"), split))
    if pair_ids is not None:
        pairs = pairs.filter(pc.is_in(pairs.column("pair_id"), pa.array(sorted(set(pair_ids)), pa.string())))
    return pairs


def read_training_dataset(store_uri: str, *, split: str = "train", pair_ids: Sequence[str] | None = None,
                          features: str = "all"):
    """A ``ray.data.Dataset`` of the logical training rows of ``split`` ("train" or "holdout").

    Rows: ``pair_id`` str; ``latents_w``, ``latents_l`` float16 [C, h, w]; ``prompt_embeds`` float16 [77, D];
    ``pooled_prompt_embeds`` float16 [P] (zero-length for SD1.5); ``add_time_ids_w``, ``add_time_ids_l`` float32
    [6] (per image: winner and loser may differ in original size and crop, an improvement on DESIGN's single
    ``add_time_ids``); ``clip_text``, ``clip_image_w``, ``clip_image_l`` float32 [E]. ``features="clip"``: only
    ``pair_id`` and the three CLIP embeddings.

    ``pair_ids`` (optional) keeps only those pairs of the split (in store order): re-alignment's chosen mix of new
    and old pairs. Only shards listed in the manifest are read.

    How it scales: the driver reads the split's pair table (ids and hashes, ~300 bytes a pair) and the key columns of
    the feature shards, and joins them (pyarrow) into blocks of ``PAIR_BLOCK_ROWS`` pairs that name the shard and
    row of each feature. A task per block then reads just the Parquet row groups those rows sit in
    (``precompute.store.FEATURE_ROW_GROUP_ROWS`` rows each), so workers hold a few blocks, never the split. The
    tasks ask for a quarter CPU so the dataset streams beside Ray Train workers on a 2-CPU node. (The driver reads
    the pair table itself: Ray 2.60's read_parquet runs a 1-CPU file-listing task that cannot be scheduled beside
    Ray Train workers on a small node.)
    """
    import ray

    store_uri = absolute(store_uri)  # Ray workers do not share the driver's working directory
    store = FeatureStore(store_uri)
    manifest = read_manifest(store_uri)
    pairs = split_pairs(store, manifest, split, pair_ids)
    if pairs.num_rows == 0:
        return ray.data.from_items([])  # a store with no pairs in this split: an empty dataset, not an error
    located = locate_pairs(pairs, feature_locations(store, manifest, "images"),
                           feature_locations(store, manifest, "texts"))
    return located_dataset(store_uri, store, manifest, located, features=features)
