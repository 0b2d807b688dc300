"""The training reader: the feature store's committed pairs as logical training rows (a ``ray.data.Dataset``).

The store's format (layout, schemas, commit protocol) is ``pipeline.precompute.store``; this module only reads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.precompute.store import SPLITS, FeatureStore, read_manifest, stacked_tensors
from pipeline.storage import absolute

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


class PairFeatureJoin:
    """Ray Data stage of ``read_training_dataset``: turn pair rows into logical training rows.

    Each actor reads, once, the texts and images that the split's pairs refer to (with pyarrow, straight from
    the committed shards) into memory, then answers every batch with array lookups. Scaling trade-off: the actor
    holds the split's features in memory (an SDXL latent is ~130 KB, a caption's embeddings ~320 KB: 10^4 SDXL
    pairs are ~6 GB; 10^5 tiny-model pairs fit easily). Beyond that, ``Dataset.join`` (a distributed hash
    shuffle) is the scalable route. It is not used because Ray 2.60's join needs the ``polars`` package, which this
    environment lacks (the join fails with ImportError), and its aggregator actors would compete with the training
    workers for a small node's CPUs; this lookup needs one actor at a quarter CPU.
    """

    def __init__(self, store_uri: str, split: str):
        store = FeatureStore(store_uri)
        manifest = read_manifest(store_uri)
        self.split = split
        pairs = store.read_table(manifest, "pairs", columns=["caption_hash", "image_w_hash", "image_l_hash", "split"])
        pairs = pairs.filter(pc.equal(pairs.column("split"), split))
        image_keys = set(pairs.column("image_w_hash").to_pylist()) | set(pairs.column("image_l_hash").to_pylist())
        text_keys = set(pairs.column("caption_hash").to_pylist())
        images = store.read_table(manifest, "images", keys=sorted(image_keys))
        texts = store.read_table(manifest, "texts", keys=sorted(text_keys))
        self.image_index = {h: i for i, h in enumerate(images.column("image_hash").to_pylist())}
        self.text_index = {h: i for i, h in enumerate(texts.column("caption_hash").to_pylist())}
        self.latents = stacked_tensors(images.column("latents"), images.column("latent_shape").to_pylist())
        self.clip_image = stacked_tensors(images.column("clip_image"))
        self.add_time_ids = stacked_tensors(images.column("add_time_ids"))
        prompt_shapes = texts.column("prompt_embeds_shape").to_pylist()
        self.prompt_embeds = stacked_tensors(texts.column("prompt_embeds"), prompt_shapes)
        self.pooled = stacked_tensors(texts.column("pooled_prompt_embeds"))
        self.clip_text = stacked_tensors(texts.column("clip_text"))

    def _rows(self, index: dict[str, int], hashes: np.ndarray, what: str) -> np.ndarray:
        try:
            return np.array([index[h] for h in hashes], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"a committed pair refers to {what} {err.args[0]} that the store does not hold") from err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = batch["split"] == self.split
        w = self._rows(self.image_index, batch["image_w_hash"][keep], "image")
        l_ = self._rows(self.image_index, batch["image_l_hash"][keep], "image")
        t = self._rows(self.text_index, batch["caption_hash"][keep], "caption")
        return {
            "pair_id": batch["pair_id"][keep],
            "latents_w": self.latents[w],
            "latents_l": self.latents[l_],
            "prompt_embeds": self.prompt_embeds[t],
            "pooled_prompt_embeds": self.pooled[t],
            "add_time_ids_w": self.add_time_ids[w],
            "add_time_ids_l": self.add_time_ids[l_],
            "clip_text": self.clip_text[t],
            "clip_image_w": self.clip_image[w],
            "clip_image_l": self.clip_image[l_],
        }


def read_training_dataset(store_uri: str, *, split: str = "train", pair_ids: Sequence[str] | None = None):
    """A ``ray.data.Dataset`` of the logical training rows of ``split`` ("train" or "holdout").

    Rows: ``pair_id`` str; ``latents_w``, ``latents_l`` float16 [C, h, w]; ``prompt_embeds`` float16 [77, D];
    ``pooled_prompt_embeds`` float16 [P] (zero-length for SD1.5); ``add_time_ids_w``, ``add_time_ids_l`` float32
    [6] (per image: winner and loser may differ in original size and crop, an improvement on DESIGN's single
    ``add_time_ids``); ``clip_text``, ``clip_image_w``, ``clip_image_l`` float32 [E].

    ``pair_ids`` (optional) keeps only those pairs of the split: re-alignment's chosen mix of new and old pairs.

    ``pair_ids`` limits the rows to those pairs (in store order). Only shards listed in the manifest are read. The stages ask for a quarter CPU each so the dataset streams
    beside Ray Train workers on a 2-CPU node (two workers of 0.5 CPU) instead of waiting for a whole core.
    """
    import ray

    store_uri = absolute(store_uri)  # Ray workers do not share the driver's working directory
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {list(SPLITS)}")
    store = FeatureStore(store_uri)
    manifest = read_manifest(store_uri)
    columns = ["pair_id", "caption_hash", "image_w_hash", "image_l_hash", "split"]
    # The pair table is only ids and hashes (~300 bytes a pair), so the driver reads it, filtered to the split and
    # in manifest order, and hands it to Ray Data as blocks. Ray 2.60's read_parquet runs a 1-CPU file-listing task
    # that cannot be scheduled beside Ray Train workers on a small node; the heavy features are read by the actors.
    pairs = store.read_table(manifest, "pairs", columns=columns)
    pairs = pairs.filter(pc.equal(pairs.column("split"), split))
    if pair_ids is not None:
        pairs = pairs.filter(pc.is_in(pairs.column("pair_id"), pa.array(sorted(set(pair_ids)), pa.string())))
    if pairs.num_rows == 0:
        return ray.data.from_items([])  # a store with no pairs in this split: an empty dataset, not an error
    blocks = [pairs.slice(start, PAIR_BLOCK_ROWS) for start in range(0, pairs.num_rows, PAIR_BLOCK_ROWS)]
    return ray.data.from_arrow(blocks).map_batches(
        PairFeatureJoin,
        fn_constructor_kwargs={"store_uri": store_uri, "split": split},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_format="numpy",
        num_cpus=0.25,
    )
