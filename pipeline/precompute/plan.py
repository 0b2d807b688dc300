"""The batch plan: global training batches drawn from neighbourhoods of the CLIP embeddings, stored in the feature
store with their similarity matrices.

RPO contrasts every winner of a global batch with every loser, weighted by how related the two pairs are. In a
random batch of a large, varied table almost no two pairs are related, so the weights put nearly all their mass on
the diagonal and RPO does what DPO does. The plan groups related pairs instead:

1. a Ray Data pass over the pairs' CLIP embeddings (``read_training_dataset(features="clip")``) draws a sample;
   scipy's k-means on it gives about ``pairs / (global_batch * batches_per_cluster)`` centroids of the pair
   embedding [text | winner image | loser image] (each part unit-length);
2. a second pass assigns every pair its nearest centroid (tasks); the driver gets back only (pair_id, cluster,
   order), sorts by cluster (then by a seeded hash, a random order inside the cluster) and cuts the sequence into
   batches of ``global_batch``: each batch lies in one neighbourhood or spans two. The last ``pairs % global_batch``
   pairs are left out of this plan (counted in it); the batches' order is shuffled with the seed;
3. a third pass reads the embeddings again in plan order, in blocks of whole batches, and a task per block writes
   its batches' rows: ``s_text[i, j] = cos(t_i, t_j)`` and ``s_image[i, j] = cos(v_i^w, v_j^l)``, one row of each
   matrix per pair (slot i of its batch). Training turns them into weights with alpha and tau at run time, so a sweep
   over alpha and tau reuses one plan.

Layout: ``<store>/plans/<key>/part-<first batch>.parquet`` and ``plan.json``, written last (a folder without it is
an unfinished build, rebuilt). The key hashes everything the plan depends on: the committed pairs, the pair subset,
the global batch, the neighbourhood size, the seed and this format's version; so a run, its resume or restart, and
every trial of a sweep read the same batches in the same order, and a store that gained pairs gets a new plan.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import join_uri
from pipeline.precompute.reader import (
    PAIR_BLOCK_ROWS,
    feature_locations,
    locate_pairs,
    located_dataset,
    split_pairs,
)
from pipeline.precompute.store import FeatureStore, read_manifest, write_parquet_whole
from pipeline.storage import absolute, exists, filesystem, is_local, read_text, write_text

PLAN_VERSION = 1
PLAN_NAME = "plan.json"
CENTROID_SAMPLE = 20_000  # pairs k-means fits on; assignment then covers every pair
KMEANS_ITERATIONS = 20
PLAN_SCHEMA = pa.schema([("batch", pa.int64()), ("slot", pa.int32()), ("pair_id", pa.string()),
                         ("s_text", pa.list_(pa.float32())), ("s_image", pa.list_(pa.float32()))])


@dataclass(frozen=True)
class PlanSettings:
    global_batch: int  # pairs per global batch: workers x pairs per worker per micro-step
    batches_per_cluster: int = 4  # neighbourhood size in batches: smaller is tighter, larger mixes more
    seed: int = 0


def plan_key(manifest: dict, settings: PlanSettings, *, split: str, pair_ids: Sequence[str] | None) -> str:
    described = {
        "version": PLAN_VERSION, "settings": asdict(settings), "split": split,
        "pairs_shards": [shard["path"] for shard in manifest["tables"]["pairs"]],
        "pair_ids": hashlib.sha256("\n".join(sorted(pair_ids)).encode()).hexdigest() if pair_ids is not None else None,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ pure functions


def pair_embeddings(clip_text: np.ndarray, clip_image_w: np.ndarray, clip_image_l: np.ndarray) -> np.ndarray:
    """[N, 3E] float32: text, winner image and loser image embeddings, each unit-length, side by side."""
    parts = [np.asarray(x, dtype=np.float32) for x in (clip_text, clip_image_w, clip_image_l)]
    return np.concatenate([x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in parts], axis=1)


def order_keys(pair_ids: Sequence[str], seed: int) -> np.ndarray:
    """A seeded random order that does not depend on which task saw a pair: a hash of (seed, pair_id)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{p}".encode(), digest_size=7).digest(), "big")
                     for p in pair_ids], dtype=np.int64)


def group_into_batches(assigned: pa.Table, *, global_batch: int, seed: int) -> tuple[pa.Table, int]:
    """(membership, left out): ``assigned`` (pair_id, cluster, order) cut into batches of ``global_batch`` pairs
    along (cluster, order); the membership table (pair_id, batch, slot) is sorted by (batch, slot) with the
    batches in a seeded random order. The last ``len % global_batch`` pairs of that sequence are left out."""
    ordered = assigned.sort_by([("cluster", "ascending"), ("order", "ascending"), ("pair_id", "ascending")])
    batches = ordered.num_rows // global_batch
    kept = ordered.slice(0, batches * global_batch)
    position = np.random.default_rng(seed).permutation(batches)  # batch k of the sequence trains at position[k]
    sequence = np.repeat(np.arange(batches), global_batch)
    membership = pa.table({
        "pair_id": kept.column("pair_id"),
        "batch": pa.array(position[sequence].astype(np.int64)),
        "slot": pa.array(np.tile(np.arange(global_batch, dtype=np.int32), batches)),
    }).sort_by([("batch", "ascending"), ("slot", "ascending")])
    return membership, ordered.num_rows - kept.num_rows


def batch_similarities(clip_text: np.ndarray, clip_image_w: np.ndarray, clip_image_l: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(S_text, S_image) of one batch, float32 [G, G]: cos(t_i, t_j) and cos(v_i^w, v_j^l), as training computes
    them from the embeddings (``pipeline.losses.cosine_similarity_matrix``)."""
    import torch

    from pipeline.losses import cosine_similarity_matrix

    t = torch.as_tensor(np.asarray(clip_text, dtype=np.float32))
    s_text = cosine_similarity_matrix(t, t)
    s_image = cosine_similarity_matrix(torch.as_tensor(np.asarray(clip_image_w, dtype=np.float32)),
                                       torch.as_tensor(np.asarray(clip_image_l, dtype=np.float32)))
    return s_text.numpy(), s_image.numpy()


# ------------------------------------------------------------------------------------------- Ray Data stages


def assign_clusters(batch: dict[str, np.ndarray], *, centroids: np.ndarray, seed: int) -> pa.Table:
    """Task: each pair's nearest centroid and its seeded order key (no features travel back)."""
    embeddings = pair_embeddings(batch["clip_text"], batch["clip_image_w"], batch["clip_image_l"])
    distances = (embeddings**2).sum(1, keepdims=True) - 2 * embeddings @ centroids.T + (centroids**2).sum(1)[None]
    pair_ids = [str(p) for p in batch["pair_id"]]
    return pa.table({"pair_id": pa.array(pair_ids, pa.string()),
                     "cluster": pa.array(distances.argmin(1).astype(np.int32)),
                     "order": pa.array(order_keys(pair_ids, seed))})


def write_plan_block(batch: dict[str, np.ndarray], *, plan_uri: str, global_batch: int) -> pa.Table:
    """Task: a block of whole batches, in (batch, slot) order -> one plan file; returns (path, rows, first_batch)."""
    rows = len(batch["pair_id"])
    s_text_rows, s_image_rows = [], []
    for start in range(0, rows, global_batch):
        part = slice(start, start + global_batch)
        s_text, s_image = batch_similarities(batch["clip_text"][part], batch["clip_image_w"][part],
                                             batch["clip_image_l"][part])
        s_text_rows.extend(s_text)
        s_image_rows.extend(s_image)
    table = pa.table({
        "batch": pa.array(batch["batch"].astype(np.int64)), "slot": pa.array(batch["slot"].astype(np.int32)),
        "pair_id": pa.array([str(p) for p in batch["pair_id"]], pa.string()),
        "s_text": pa.array([r.tolist() for r in s_text_rows], pa.list_(pa.float32())),
        "s_image": pa.array([r.tolist() for r in s_image_rows], pa.list_(pa.float32())),
    }, schema=PLAN_SCHEMA)
    first = int(batch["batch"][0])
    relative = f"part-{first:08d}.parquet"
    fs, root = filesystem(plan_uri)
    fs.create_dir(root, recursive=True)
    # whole or not at all; a concurrent build of the same plan writes the same bytes
    write_parquet_whole(fs, f"{root.rstrip('/')}/{relative}", table, local=is_local(plan_uri),
                        row_group_size=global_batch)
    return pa.table({"path": [relative], "rows": [rows], "first_batch": [first]})


# ----------------------------------------------------------------------------------------------- the plan


def plans_uri(store_uri: str) -> str:
    return join_uri(store_uri, "plans")


def build_batch_plan(store_uri: str, settings: PlanSettings, *, split: str = "train",
                     pair_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """The batch plan of ``split`` (only ``pair_ids`` if given) for ``settings``: read if the store holds it, else
    built (three Ray Data passes, see the module docstring) and stored. Returns its ``plan.json`` with ``uri``."""
    import ray
    from scipy.cluster.vq import kmeans2

    store_uri = absolute(store_uri)
    store = FeatureStore(store_uri)
    manifest = read_manifest(store_uri)
    key = plan_key(manifest, settings, split=split, pair_ids=pair_ids)
    plan_uri = join_uri(plans_uri(store_uri), key)
    if exists(join_uri(plan_uri, PLAN_NAME)):
        return json.loads(read_text(join_uri(plan_uri, PLAN_NAME))) | {"uri": plan_uri}
    g = settings.global_batch
    pairs = split_pairs(store, manifest, split, pair_ids)
    if pairs.num_rows < g:
        raise ValueError(f"the feature store {store_uri} has {pairs.num_rows} {split} pairs, fewer than one global "
                         f"batch of {g} (train.num_workers x train.batch_size_per_worker): add data, lower the batch "
                         f"or use train.batches=random")
    images, texts = feature_locations(store, manifest, "images"), feature_locations(store, manifest, "texts")
    clip = located_dataset(store_uri, store, manifest, locate_pairs(pairs, images, texts), features="clip")
    fraction = min(1.0, CENTROID_SAMPLE / pairs.num_rows)
    if fraction == 1.0:  # small enough to hold: read the embeddings once for the sample and the assignment
        clip = clip.materialize()

    # 1. centroids from a sample
    sample = (clip if fraction == 1.0 else clip.random_sample(fraction, seed=settings.seed)).take_all()
    embeddings = pair_embeddings(*(np.stack([row[c] for row in sample])
                                   for c in ("clip_text", "clip_image_w", "clip_image_l")))
    clusters = max(1, min(len(embeddings), round(pairs.num_rows / (g * settings.batches_per_cluster))))
    centroids, _ = kmeans2(embeddings.astype(np.float64), clusters, iter=KMEANS_ITERATIONS, minit="++",
                           seed=settings.seed)
    # 2. every pair's neighbourhood; the driver holds ids and two integers a pair
    assigned = pa.concat_tables(ray.get(clip.map_batches(
        assign_clusters, fn_kwargs={"centroids": centroids.astype(np.float32), "seed": settings.seed},
        batch_size=None, batch_format="numpy", num_cpus=0.25).to_arrow_refs()))
    membership, left_out = group_into_batches(assigned, global_batch=g, seed=settings.seed)
    # 3. the embeddings again, in plan order and whole batches per block -> plan files
    ordered = _in_order(pairs, membership)
    located = locate_pairs(ordered, images, texts).append_column("batch", membership.column("batch")).append_column(
        "slot", membership.column("slot"))
    block_rows = g * max(1, PAIR_BLOCK_ROWS // g)
    records = pa.concat_tables(ray.get(
        located_dataset(store_uri, store, manifest, located, block_rows=block_rows, features="clip").map_batches(
            write_plan_block, fn_kwargs={"plan_uri": plan_uri, "global_batch": g}, batch_size=None,
            batch_format="numpy", num_cpus=0.25).to_arrow_refs())).sort_by("first_batch")
    plan = {
        "version": PLAN_VERSION, "key": key, "settings": asdict(settings), "split": split,
        "pairs": membership.num_rows, "batches": membership.num_rows // g, "left_out_pairs": left_out,
        "clusters": clusters, "files": [{"path": p, "rows": r} for p, r in
                                        zip(records.column("path").to_pylist(), records.column("rows").to_pylist())],
    }
    write_text(join_uri(plan_uri, PLAN_NAME), json.dumps(plan, indent=1))
    return plan | {"uri": plan_uri}


def _in_order(pairs: pa.Table, membership: pa.Table) -> pa.Table:
    """The rows of ``pairs`` for membership's pair_ids, in membership's order."""
    wanted = membership.select(["pair_id"]).append_column("position", pa.array(np.arange(membership.num_rows)))
    found = wanted.join(pairs, keys="pair_id", join_type="inner").sort_by("position").drop_columns(["position"])
    if found.num_rows != membership.num_rows:
        raise ValueError(f"{membership.num_rows - found.num_rows} pairs of the batch plan are not in the store's "
                         f"committed pairs; the plan is stale or damaged: delete its folder and run again")
    return found


def read_planned_datasets(store_uri: str, plan: dict[str, Any], *, per_rank: int, world: int) -> list:
    """Each rank's share of the plan as a ``ray.data.Dataset`` (list index = rank): of each batch, in plan order,
    the slots ``rank * per_rank`` to ``(rank + 1) * per_rank - 1``; training rows as ``read_training_dataset`` gives
    them, plus ``s_text`` and ``s_image`` [global_batch], the pair's rows of its batch's matrices (columns in slot
    order, the order in which training all-gathers the global batch). The plan's index, the pair table and the
    feature keys are read once for all ranks."""
    store_uri = absolute(store_uri)
    store = FeatureStore(store_uri)
    manifest = read_manifest(store_uri)
    g = plan["settings"]["global_batch"]
    if world * per_rank > g:
        raise ValueError(f"rank {world - 1} with {per_rank} pairs per micro-step falls outside the plan's global "
                         f"batch of {g}; the plan must be built for train.num_workers x train.batch_size_per_worker")
    fs, root = filesystem(plan["uri"])
    paths = [f"{root.rstrip('/')}/{f['path']}" for f in plan["files"]]
    index = pa.concat_tables([
        pq.read_table(path, filesystem=fs, columns=["pair_id", "slot"]).append_column(
            "p_shard", pa.array(np.full(f["rows"], shard, dtype=np.int32))).append_column(
            "p_row", pa.array(np.arange(f["rows"], dtype=np.int32)))
        for shard, (path, f) in enumerate(zip(paths, plan["files"]))])
    pairs = split_pairs(store, manifest, plan["split"])
    images, texts = feature_locations(store, manifest, "images"), feature_locations(store, manifest, "texts")
    datasets = []
    for rank in range(world):
        slots = index.column("slot")
        mine = index.filter(pc.and_(pc.greater_equal(slots, rank * per_rank), pc.less(slots, (rank + 1) * per_rank)))
        located = locate_pairs(_in_order(pairs, mine), images, texts).append_column(
            "p_shard", mine.column("p_shard")).append_column("p_row", mine.column("p_row"))
        datasets.append(located_dataset(store_uri, store, manifest, located, plan_paths=paths,
                                        block_rows=per_rank * max(1, PAIR_BLOCK_ROWS // per_rank)))
    return datasets


def read_planned_dataset(store_uri: str, plan: dict[str, Any], *, rank: int, per_rank: int):
    """Rank ``rank``'s dataset of ``read_planned_datasets``."""
    return read_planned_datasets(store_uri, plan, per_rank=per_rank, world=rank + 1)[rank]
