"""The feature store: what precompute writes once and training reads many times.

Layout under the store URI (a local folder, ``s3://...`` or ``gs://...``, through pyarrow's filesystems)::

    manifest.json               the commit point: settings, and every committed shard of every table with its rows
    texts/part-<uuid>.parquet   one row per caption:  caption_hash, caption, prompt_embeds (+ shape), pooled, clip_text
    images/part-<uuid>.parquet  one row per image:    image_hash, latents (+ shape), clip_image, original size, crop,
                                                      add_time_ids
    pairs/part-<uuid>.parquet   one row per comparison: pair_id, caption_hash, image_w_hash, image_l_hash, split, ...
    quarantine/part-<uuid>.parquet  rows that could not be used: source, row, reason, detail, pair_id (if known)

Each thing is stored once: Pick-a-Pic repeats captions and images across pairs, and an SDXL ``prompt_embeds`` is
~315 KB, so pairs refer to texts and images by content hash. Tensors are stored flat (``list<halffloat>`` /
``list<float>``) next to a shape column, which any Parquet reader understands.

Commit protocol (crash safety). A shard is written completely before anything refers to it: on a local disk to a
``.tmp-`` name that is renamed into place, on an object store under its final unique name (an object becomes
visible only when its upload completes). Then ``manifest.json``, listing the new shards, is written to a temp
name and moved into place (a rename on a local disk, a server-side copy on object stores: either way readers see
the old manifest or the new one, never half of one). Readers (``pipeline.precompute.reader``) only ever read shards the manifest lists,
so the manifest write *is* the commit: a crash leaves at most unlisted files, which readers never see and the
next run deletes (``remove_orphans``). One writer per store at a time is assumed (a precompute job); readers
may run at any time.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import join_uri
from pipeline.data.schema import QUARANTINE_SCHEMA
from pipeline.storage import filesystem, is_local, read_text, write_text

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "holdout")

TEXTS_SCHEMA = pa.schema(
    [
        pa.field("caption_hash", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("prompt_embeds", pa.list_(pa.float16())),  # [77, D] flattened
        pa.field("prompt_embeds_shape", pa.list_(pa.int32())),
        pa.field("pooled_prompt_embeds", pa.list_(pa.float16())),  # [P]; empty for SD1.5
        pa.field("clip_text", pa.list_(pa.float32())),  # [E], L2-normalised
    ]
)
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_hash", pa.string(), nullable=False),
        pa.field("latents", pa.list_(pa.float16())),  # [C, h, w] flattened, already times the VAE scaling factor
        pa.field("latent_shape", pa.list_(pa.int32())),
        pa.field("clip_image", pa.list_(pa.float32())),  # [E], L2-normalised
        pa.field("original_height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("crop_top", pa.int32()),
        pa.field("crop_left", pa.int32()),
        pa.field("add_time_ids", pa.list_(pa.float32())),  # [6]: original (h, w), crop (top, left), target (h, w)
    ]
)
PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("caption_hash", pa.string(), nullable=False),
        pa.field("image_w_hash", pa.string(), nullable=False),
        pa.field("image_l_hash", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "holdout"
        pa.field("source", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
    ]
)
# The data module's quarantine table, plus the pair_id where one is known (rows rejected while encoding), so a
# re-run knows that pair is already dealt with.
STORE_QUARANTINE_SCHEMA = QUARANTINE_SCHEMA.append(pa.field("pair_id", pa.string()))

TABLE_SCHEMAS = {
    "texts": TEXTS_SCHEMA,
    "images": IMAGES_SCHEMA,
    "pairs": PAIRS_SCHEMA,
    "quarantine": STORE_QUARANTINE_SCHEMA,
}
# Feature shards are written in row groups this small, so the training reader can read one pair's latents or
# caption embeddings without the rest of its shard (an SDXL text row is ~315 KB: an 8-row group is ~2.5 MB).
FEATURE_ROW_GROUP_ROWS = 8
TABLE_KEYS = {"texts": "caption_hash", "images": "image_hash", "pairs": "pair_id", "quarantine": None}
# Settings recorded for information only: the same weights under another path or tag are the same model.
INFORMATIONAL_SETTINGS = ("model.source", "clip.pretrained")


class StoreMismatchError(ValueError):
    """The store at this URI was made with other models or settings; it is never mixed with new rows."""


# ---------------------------------------------------------------------------------------- tensor columns


def tensor_column(arrays: Sequence[np.ndarray | None], dtype: np.dtype) -> tuple[pa.ListArray, pa.ListArray]:
    """(flat values, shapes) list columns for a sequence of arrays; ``None`` becomes a null in both."""
    value_type = pa.from_numpy_dtype(np.dtype(dtype))
    flats = [np.ascontiguousarray(a, dtype=dtype).reshape(-1) for a in arrays if a is not None]
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([a.size if a is not None else 0 for a in arrays])
    values = pa.array(np.concatenate(flats) if flats else np.zeros(0, dtype=dtype), type=value_type)
    mask = pa.array([a is None for a in arrays], type=pa.bool_())
    flat_column = pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)
    shapes = pa.array([list(a.shape) if a is not None else None for a in arrays], type=pa.list_(pa.int32()))
    return flat_column, shapes


def stacked_tensors(values: pa.ChunkedArray | pa.Array, shapes: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """[N, *shape] numpy array from a flat list column (all rows one shape; ``shapes`` None means 1-D rows).

    Chunk by chunk: a whole store's prompt embeddings overflow the 32-bit offsets of one combined list array.
    """
    chunks = values.chunks if isinstance(values, pa.ChunkedArray) else [values]
    if shapes is None:
        distinct = {(length,) for chunk in chunks for length in pc.unique(pc.list_value_length(chunk)).to_pylist()}
    else:
        distinct = {tuple(shape) for shape in shapes}
    if len(distinct) > 1:
        raise ValueError(f"tensor rows have different shapes {sorted(distinct)}; a store holds one resolution")
    row_shape = distinct.pop() if distinct else (0,)
    dtype = values.type.value_type.to_pandas_dtype()
    flats = [chunk.flatten().to_numpy(zero_copy_only=False) for chunk in chunks]
    flat = np.concatenate(flats) if flats else np.zeros(0, dtype=dtype)
    return flat.astype(dtype, copy=False).reshape((sum(len(chunk) for chunk in chunks), *row_shape))


def texts_rows(
    caption_hashes: Sequence[str],
    captions: Sequence[str],
    prompt_embeds: np.ndarray,
    pooled_prompt_embeds: np.ndarray,
    clip_text: np.ndarray,
) -> pa.Table:
    """Rows of the texts table from stacked arrays ([N, 77, D], [N, P] with P = 0 for SD1.5, [N, E])."""
    prompt, prompt_shape = tensor_column(list(prompt_embeds), np.float16)
    pooled, _ = tensor_column(list(pooled_prompt_embeds), np.float16)
    clip, _ = tensor_column(list(clip_text), np.float32)
    keys, texts = pa.array(caption_hashes, pa.string()), pa.array(captions, pa.string())
    return pa.Table.from_arrays([keys, texts, prompt, prompt_shape, pooled, clip], schema=TEXTS_SCHEMA)


def images_rows(
    image_hashes: Sequence[str],
    latents: Sequence[np.ndarray | None],
    clip_image: Sequence[np.ndarray | None],
    original_sizes: Sequence[tuple[int, int]],
    crops_top_left: Sequence[tuple[int, int]],
    add_time_ids: Sequence[Sequence[int] | None],
    reasons: Sequence[str],
    details: Sequence[str],
) -> pa.Table:
    """Rows of the images table plus ``reason``/``detail``; a bad row (reason != "") has null features."""
    latent_values, latent_shapes = tensor_column(latents, np.float16)
    clip, _ = tensor_column(clip_image, np.float32)
    time_ids, _ = tensor_column([None if t is None else np.asarray(t) for t in add_time_ids], np.float32)
    columns = [
        pa.array(image_hashes, pa.string()),
        latent_values,
        latent_shapes,
        clip,
        pa.array([size[0] for size in original_sizes], pa.int32()),
        pa.array([size[1] for size in original_sizes], pa.int32()),
        pa.array([crop[0] for crop in crops_top_left], pa.int32()),
        pa.array([crop[1] for crop in crops_top_left], pa.int32()),
        time_ids,
        pa.array(reasons, pa.string()),
        pa.array(details, pa.string()),
    ]
    schema = IMAGES_SCHEMA.append(pa.field("reason", pa.string())).append(pa.field("detail", pa.string()))
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------------------------- settings


def flatten_settings(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten_settings(value, dotted))
        else:
            out[dotted] = value
    return out


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flatten_settings(settings).items() if k not in INFORMATIONAL_SETTINGS}


def settings_hash(settings: dict[str, Any]) -> str:
    """Short stable hash of what makes two stores interchangeable (names the sibling store)."""
    text = json.dumps(comparable_settings(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def sibling_store_uri(store_uri: str, settings: dict[str, Any]) -> str:
    return f"{store_uri.rstrip('/')}-{settings_hash(settings)}"


def settings_differences(manifest: dict[str, Any], settings: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored value, wanted value) for every setting that differs."""
    stored = comparable_settings({key: manifest.get(key) for key in settings})
    wanted = comparable_settings(settings)
    keys = sorted(set(stored) | set(wanted))
    return [(k, stored.get(k), wanted.get(k)) for k in keys if stored.get(k) != wanted.get(k)]


def check_settings(manifest: dict[str, Any], settings: dict[str, Any], store_uri: str) -> None:
    """Raise StoreMismatchError naming each differing key with both values, and the two ways out."""
    differences = settings_differences(manifest, settings)
    if not differences:
        return
    listed = "; ".join(f"{key}: store has {old!r}, this run has {new!r}" for key, old, new in differences)
    raise StoreMismatchError(
        f"feature store {store_uri} was made with other models or settings ({listed}). A store never mixes "
        f"settings. Either set precompute.on_mismatch=new_store (this run then writes to "
        f"{sibling_store_uri(store_uri, settings)}) or point precompute.store at a different store URI."
    )


def check_store_model(manifest: dict[str, Any], model: dict[str, Any], store_uri: str) -> None:
    """Raise StoreMismatchError when the store's features were made by another model than ``model`` (the run's
    ``model_settings``): another weights hash, kind, hub commit or variant. The source path alone may differ
    (the same weights under another folder are the same model)."""
    stored = manifest.get("model") or {}
    keys = sorted((set(stored) | set(model)) - {"source"})
    differing = [key for key in keys if stored.get(key) != model.get(key)]
    if not differing:
        return
    def describe(m: dict[str, Any]) -> str:
        return ", ".join(f"{key}={m.get(key)!r}" for key in ["source", *keys])

    raise StoreMismatchError(
        f"feature store {store_uri} was made by another model ({', '.join(differing)} differ): the store has "
        f"[{describe(stored)}], this run's model.pretrained is [{describe(model)}]. Its latents and embeddings do not "
        f"fit this model: re-run precompute for this model (another precompute.store), or set model.pretrained, "
        f"model.revision and model.variant to the store's model."
    )


# ---------------------------------------------------------------------------------------------- manifest


def new_manifest(settings: dict[str, Any]) -> dict[str, Any]:
    """An empty store's manifest: the settings at the top level (``manifest["model"]["kind"]``), no shards."""
    manifest = {"format_version": FORMAT_VERSION, **settings, "tables": {name: [] for name in TABLE_SCHEMAS}}
    manifest["counts"] = manifest_counts(manifest)
    return manifest


def add_shards(manifest: dict[str, Any], table: str, shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``manifest`` with ``shards`` (entries from ``FeatureStore.write_shard``) listed and counts updated."""
    updated = json.loads(json.dumps(manifest))
    updated["tables"][table].extend(shards)
    updated["counts"] = manifest_counts(updated)
    return updated


def manifest_counts(manifest: dict[str, Any]) -> dict[str, int]:
    tables = manifest["tables"]
    counts = {name: sum(shard["rows"] for shard in tables[name]) for name in TABLE_SCHEMAS}
    for split in SPLITS:
        counts[split] = sum(shard.get("splits", {}).get(split, 0) for shard in tables["pairs"])
    return counts


def assign_split(pair_id: str, holdout_fraction: float) -> str:
    """"holdout" for a fixed share of pairs by hash of pair_id: a pair lands in the same split in every run."""
    draw = int(hashlib.sha256(f"split:{pair_id}".encode()).hexdigest()[:16], 16) / 2**64
    return "holdout" if draw < holdout_fraction else "train"


def committed_pair_ids(store: "FeatureStore", manifest: dict[str, Any]) -> set[str]:
    """Every committed pair id (read from the pair shards: the manifest lists shards and counts, not ids)."""
    return store.keys(manifest, "pairs")


# ------------------------------------------------------------------------------------------------- store


def write_parquet_whole(fs, path: str, rows: pa.Table, *, local: bool, row_group_size: int | None) -> None:
    """Write ``rows`` to ``path`` so that readers see the whole file or none: a temp file renamed into place locally
    (atomic on one filesystem); on an object store an object appears only once its upload completes."""
    if local:
        folder, name = path.rsplit("/", 1)
        temp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
        pq.write_table(rows, temp, filesystem=fs, row_group_size=row_group_size)
        fs.move(temp, path)
    else:
        pq.write_table(rows, path, filesystem=fs, row_group_size=row_group_size)


class FeatureStore:
    """One store at ``uri``: shard writes, manifest commits, reads of committed shards."""

    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem(uri)

    def _path(self, relative: str) -> str:
        return f"{self.root.rstrip('/')}/{relative}"

    def read_manifest(self) -> dict[str, Any] | None:
        manifest_uri = join_uri(self.uri, MANIFEST_NAME)
        if self.fs.get_file_info(self._path(MANIFEST_NAME)).type == pafs.FileType.NotFound:
            return None
        try:
            manifest = json.loads(read_text(manifest_uri))
        except ValueError as err:
            raise ValueError(f"{manifest_uri} is not valid JSON ({err}); the store is damaged, rebuild it") from err
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{manifest_uri} has format_version {manifest.get('format_version')!r}, this code reads "
                f"{FORMAT_VERSION}; rebuild the store or point precompute.store elsewhere"
            )
        return manifest

    def commit(self, manifest: dict[str, Any]) -> None:
        """Make ``manifest`` (and so every shard it lists) visible to readers, all at once."""
        manifest = dict(manifest, updated_at=datetime.datetime.now(datetime.timezone.utc).isoformat())
        write_text(join_uri(self.uri, MANIFEST_NAME), json.dumps(manifest, indent=1))

    def write_shard(self, table: str, rows: pa.Table) -> dict[str, Any]:
        """Write ``rows`` as one new shard of ``table``; returns its manifest entry. Not visible until committed."""
        rows = rows.select(TABLE_SCHEMAS[table].names).cast(TABLE_SCHEMAS[table])
        relative = f"{table}/part-{uuid.uuid4().hex}.parquet"
        group_rows = FEATURE_ROW_GROUP_ROWS if table in ("images", "texts") else None
        self.fs.create_dir(self._path(table), recursive=True)
        write_parquet_whole(self.fs, self._path(relative), rows, local=is_local(self.uri), row_group_size=group_rows)
        entry: dict[str, Any] = {"path": relative, "rows": rows.num_rows}
        if table == "pairs":
            splits = rows.column("split").to_pylist()
            entry["splits"] = {split: splits.count(split) for split in SPLITS}
        return entry

    def shard_paths(self, manifest: dict[str, Any], table: str) -> list[str]:
        """Filesystem paths (for ``self.fs``) of the committed shards of ``table``."""
        return [self._path(shard["path"]) for shard in manifest["tables"][table]]

    def read_table(
        self,
        manifest: dict[str, Any],
        table: str,
        *,
        columns: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> pa.Table:
        """The committed rows of ``table`` (optionally only some columns, only rows whose key is in ``keys``)."""
        schema = TABLE_SCHEMAS[table]
        parts = []
        row_filter = pc.field(TABLE_KEYS[table]).isin(list(keys)) if keys is not None else None
        for path in self.shard_paths(manifest, table):
            parts.append(pq.read_table(path, filesystem=self.fs, columns=columns, filters=row_filter))
        if not parts:
            wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
            return wanted.empty_table()
        return pa.concat_tables(parts)

    def keys(self, manifest: dict[str, Any], table: str) -> set[str]:
        key = TABLE_KEYS[table]
        return set(self.read_table(manifest, table, columns=[key]).column(key).to_pylist())

    def remove_orphans(self, manifest: dict[str, Any]) -> list[str]:
        """Delete files in the table folders that the manifest does not list (left by a crashed run)."""
        listed = {shard["path"] for shards in manifest["tables"].values() for shard in shards}
        root = self.root.rstrip("/")
        removed = []
        for info in self.fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True)):
            relative = info.path[len(root) + 1:]
            in_table_folder = relative.split("/")[0] in TABLE_SCHEMAS and "/" in relative
            if info.type == pafs.FileType.File and in_table_folder and relative not in listed:
                self.fs.delete_file(info.path)
                removed.append(relative)
        return sorted(removed)


def write_shard_batch(batch: pa.Table, *, store_uri: str, table: str) -> pa.Table:
    """Ray Data stage: write one batch of encoder output as one shard; return one small record per input row.

    Rows with a non-empty ``reason`` (found bad while decoding) are not written. Records: ``key``, ``shard`` (the
    relative shard path, "" for a bad row), ``shard_rows``, ``reason``, ``detail``; the driver commits shards from them.
    """
    empty = pa.array([""] * batch.num_rows, type=pa.string())
    reasons = pc.fill_null(batch.column("reason"), "") if "reason" in batch.column_names else empty
    details = pc.fill_null(batch.column("detail"), "") if "detail" in batch.column_names else empty
    good = pc.equal(reasons, "")
    good_rows = batch.filter(good)
    shard = FeatureStore(store_uri).write_shard(table, good_rows)["path"] if good_rows.num_rows else ""
    return pa.table(
        {
            "key": batch.column(TABLE_KEYS[table]),
            "shard": pc.if_else(good, shard, ""),
            "shard_rows": pa.array([good_rows.num_rows] * batch.num_rows, pa.int64()),
            "reason": reasons,
            "detail": details,
        }
    )


# ----------------------------------------------------------------------------------------------- reading


def read_manifest(store_uri: str) -> dict[str, Any]:
    manifest = FeatureStore(store_uri).read_manifest()
    if manifest is None:
        raise FileNotFoundError(
            f"no feature store at {store_uri} ({MANIFEST_NAME} is missing); make one with "
            f"`python jobs/precompute.py --config <your config>` or set precompute.store to an existing store"
        )
    return manifest

