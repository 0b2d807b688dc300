"""The stages of the streaming precompute: checked rows -> pair shards + unseen captions and images -> features.

    read_checked_rows (read tasks) -> plan_block (tasks) -> decode_items (tasks) -> FeatureEncoder (actor pool)
        -> write_feature_shards (tasks) -> small records to the driver

``plan_block`` asks the run's ``Ledger`` which pairs of its block are new and which captions and images nobody
has claimed yet, writes the block's new pairs (hashes only) and quarantine rows as uncommitted shards, and
passes on one item per caption or image to encode. The encoder actors take mixed batches of both, so there is
one actor pool per run. Every stage's output has one fixed schema, so Ray Data can batch any blocks together.
This module imports no torch: the encoders are loaded inside the actor on its first batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.schema import caption_hash, image_hash
from pipeline.precompute.store import (
    IMAGES_SCHEMA,
    PAIRS_SCHEMA,
    STORE_QUARANTINE_SCHEMA,
    TEXTS_SCHEMA,
    FeatureStore,
    assign_split,
    write_shard_batch,
)

ITEM_SCHEMA = pa.schema([("kind", pa.string()), ("key", pa.string()), ("caption", pa.string()),
                         ("image", pa.binary())])
DECODED_SCHEMA = pa.schema([
    ("kind", pa.string()), ("key", pa.string()), ("caption", pa.string()),
    ("pixels", pa.binary()),  # uint8 [R, R, 3] RGB bytes of the training crop
    ("original_height", pa.int32()), ("original_width", pa.int32()), ("crop_top", pa.int32()),
    ("crop_left", pa.int32()), ("reason", pa.string()), ("detail", pa.string()),
])


def _nullable(schema: pa.Schema) -> list[pa.Field]:
    return [field.with_nullable(True) for field in schema]


FEATURES_SCHEMA = pa.schema(
    [pa.field("table", pa.string())] + _nullable(TEXTS_SCHEMA) + _nullable(IMAGES_SCHEMA)
    + [pa.field("reason", pa.string()), pa.field("detail", pa.string())]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones are nulls."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


# ------------------------------------------------------------------------------------------- plan a block


def plan_block(block: pa.Table, *, ledger, store_uri: str, holdout_fraction: float) -> pa.Table:
    """Claim one block's pairs, captions, images and bad rows; write its new pairs and quarantine rows as
    uncommitted shards (the ledger lists them for the driver); return the captions and images to encode."""
    import ray

    rows = block.to_pylist()
    good = [r for r in rows if r["status"] == "pair"]
    bad = [r for r in rows if r["status"] == "bad"]
    by_reason: dict[str, int] = {}
    for r in bad:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    keys = [(r["pair_id"], caption_hash(r["caption"]), image_hash(r["image_w"]), image_hash(r["image_l"]))
            for r in good]
    counts = {"rows": len(rows), "ties": sum(bool(r["tie"]) for r in rows), "by_reason": by_reason}
    claimed = ray.get(ledger.claim.remote(keys, [(r["source"], r["row"], r["reason"]) for r in bad], counts,
                                          (caption_hash(""),)))

    store = FeatureStore(store_uri)
    new = [(r, k) for r, k, is_new in zip(good, keys, claimed["new_pairs"]) if is_new]
    entries: dict[str, list[dict[str, Any]]] = {"pairs": [], "quarantine": []}
    if new:
        pairs = pa.table({
            "pair_id": [k[0] for _, k in new], "caption_hash": [k[1] for _, k in new],
            "image_w_hash": [k[2] for _, k in new], "image_l_hash": [k[3] for _, k in new],
            "split": [assign_split(k[0], holdout_fraction) for _, k in new],
            "source": [r["source"] for r, _ in new], "row": [r["row"] for r, _ in new],
        }, schema=PAIRS_SCHEMA)
        entries["pairs"].append(store.write_shard("pairs", pairs))
    new_bad = [r for r, is_new in zip(bad, claimed["new_quarantine"]) if is_new]
    if new_bad:
        quarantine = pa.table({name: [r.get(name) for r in new_bad] for name in STORE_QUARANTINE_SCHEMA.names},
                              schema=STORE_QUARANTINE_SCHEMA)
        entries["quarantine"].append(store.write_shard("quarantine", quarantine))
    for table, written in entries.items():
        if written:
            ray.get(ledger.add_shards.remote(table, written))

    captions = {caption_hash(r["caption"]): r["caption"] for r in good} | {caption_hash(""): ""}
    images = {image_hash(r[c]): r[c] for r in good for c in ("image_w", "image_l")}
    items = [("text", h, captions[h], None) for h in claimed["texts"]]
    items += [("image", h, None, images[h]) for h in claimed["images"]]
    return pa.table({name: [item[i] for item in items] for i, name in enumerate(ITEM_SCHEMA.names)},
                    schema=ITEM_SCHEMA)


# ------------------------------------------------------------------------------------------------ decode


def decode_items(batch: pa.Table, *, resolution: int, max_image_pixels: int) -> pa.Table:
    """CPU task: image items -> training crops (a bad image gets a ``reason``); captions pass through."""
    from pipeline.data.images import BadImage, decode_image
    from pipeline.precompute.stages import prepare_image

    out: dict[str, list] = {name: [] for name in DECODED_SCHEMA.names}
    for item in batch.to_pylist():
        values = {"kind": item["kind"], "key": item["key"], "caption": item["caption"], "reason": "", "detail": ""}
        if item["kind"] == "image":
            try:
                prepared = prepare_image(decode_image(item["image"], max_image_pixels=max_image_pixels), resolution)
            except BadImage as err:
                values.update(reason=err.reason, detail=err.detail)
            else:
                values.update(pixels=prepared.pixels.tobytes(), original_height=prepared.original_size[0],
                              original_width=prepared.original_size[1], crop_top=prepared.crop_top_left[0],
                              crop_left=prepared.crop_top_left[1])
        for name in DECODED_SCHEMA.names:
            out[name].append(values.get(name))
    return pa.table(out, schema=DECODED_SCHEMA)


# ------------------------------------------------------------------------------------------------ encode


class FeatureEncoder:
    """Actor: mixed batches of captions and decoded images -> rows of the texts and images tables.

    The models load on the first batch, so a run with nothing to encode pays only the actor's process start.
    """

    def __init__(self, spec):
        self.spec = spec
        self.texts = None
        self.images = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.precompute.stages import ImageEncoder, TextEncoder

        kinds = batch.column("kind")
        parts = []
        texts = batch.filter(pc.equal(kinds, "text"))
        if texts.num_rows:
            self.texts = self.texts or TextEncoder(self.spec)
            rows = self.texts({"caption_hash": np.array(texts.column("key").to_pylist(), dtype=object),
                               "caption": np.array(texts.column("caption").to_pylist(), dtype=object)})
            parts.append(conform(rows.append_column("table", pa.array(["texts"] * rows.num_rows)), FEATURES_SCHEMA))
        images = batch.filter(pc.equal(kinds, "image"))
        if images.num_rows:
            self.images = self.images or ImageEncoder(self.spec)
            parts.append(conform(self._encode_images(images), FEATURES_SCHEMA))
        return pa.concat_tables(parts) if parts else FEATURES_SCHEMA.empty_table()

    def _encode_images(self, images: pa.Table) -> pa.Table:
        res = self.spec.resolution
        reasons = np.array(images.column("reason").to_pylist(), dtype=object)
        pixels = np.zeros((images.num_rows, res, res, 3), dtype=np.uint8)
        for i, data in enumerate(images.column("pixels").to_pylist()):
            if data is not None:
                pixels[i] = np.frombuffer(data, dtype=np.uint8).reshape(res, res, 3)

        def ints(name: str) -> np.ndarray:
            return np.array(pc.fill_null(images.column(name), 0).to_pylist(), dtype=np.int32)

        rows = self.images({
            "image_hash": np.array(images.column("key").to_pylist(), dtype=object), "pixels": pixels,
            "original_height": ints("original_height"), "original_width": ints("original_width"),
            "crop_top": ints("crop_top"), "crop_left": ints("crop_left"), "reason": reasons,
            "detail": np.array(images.column("detail").to_pylist(), dtype=object),
        })
        return rows.append_column("table", pa.array(["images"] * rows.num_rows))


# ------------------------------------------------------------------------------------------------- write


RECORD_SCHEMA = pa.schema([("table", pa.string()), ("key", pa.string()), ("shard", pa.string()),
                           ("shard_rows", pa.int64()), ("reason", pa.string()), ("detail", pa.string())])


def write_feature_shards(batch: pa.Table, *, store_uri: str) -> pa.Table:
    """Task: one shard per table present in ``batch``; one small record per row for the driver's manifest."""
    records = []
    for table in ("texts", "images"):
        rows = batch.filter(pc.equal(batch.column("table"), table))
        if rows.num_rows:
            written = write_shard_batch(rows, store_uri=store_uri, table=table)
            records.append(written.append_column("table", pa.array([table] * rows.num_rows)).select(RECORD_SCHEMA.names))
    return pa.concat_tables(records).cast(RECORD_SCHEMA) if records else RECORD_SCHEMA.empty_table()


# ------------------------------------------------------------------------------------ images bad at encode


def drop_pairs_with_bad_images(
    pairs: pa.Table, bad_images: dict[str, tuple[str, str]]
) -> tuple[pa.Table, pa.Table]:
    """(kept store pair rows, quarantine rows) when some images failed to decode in the encode stage.

    The reader decodes every image too, so this is defence in depth: it only runs when such images exist.
    """
    kept, bad = [], []
    for row in pairs.to_pylist():
        failed = [(which, bad_images[row[f"{which}_hash"]]) for which in ("image_w", "image_l")
                  if row[f"{which}_hash"] in bad_images]
        if failed:
            which, (reason, detail) = failed[0]
            bad.append({"source": row["source"], "row": row["row"], "reason": reason, "detail": f"{which} {detail}",
                        "pair_id": row["pair_id"]})
        else:
            kept.append(row)
    return (pa.Table.from_pylist(kept, schema=PAIRS_SCHEMA),
            pa.Table.from_pylist(bad, schema=STORE_QUARANTINE_SCHEMA))
