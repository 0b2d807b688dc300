"""The batch plan: grouping (pure), the similarity rows (float64 reference) and the Ray Data build over a store."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.schema import caption_hash
from pipeline.precompute.plan import (
    PlanSettings,
    batch_similarities,
    build_batch_plan,
    group_into_batches,
    pair_embeddings,
    read_planned_dataset,
)
from pipeline.precompute.store import FeatureStore, add_shards, images_rows, new_manifest, texts_rows

SETTINGS = {
    "model": {"source": "/models/a", "kind": "sdxl", "sha256": "aaa"},
    "clip": {"name": "tiny", "pretrained": None, "sha256": "ccc"},
    "resolution": 64,
    "encoder": {"latents": "mean"},
}
GROUPS, PER_GROUP, DIM = 4, 12, 8


def test_grouping_cuts_the_cluster_order_into_batches_and_shuffles_their_order():
    clusters = [0] * 10 + [1] * 7
    assigned = pa.table({"pair_id": [f"p{i:02d}" for i in range(17)], "cluster": pa.array(clusters, pa.int32()),
                         "order": pa.array(np.arange(17)[::-1].copy(), pa.int64())})
    membership, left_out = group_into_batches(assigned, global_batch=4, seed=3)
    assert left_out == 1 and membership.num_rows == 16
    assert membership.column("slot").to_pylist() == [0, 1, 2, 3] * 4
    batches = membership.column("batch").to_pylist()
    assert batches == sorted(batches) and sorted(set(batches)) == [0, 1, 2, 3]
    cluster_of = dict(zip(assigned.column("pair_id").to_pylist(), clusters))
    members = {}
    for pid, b in zip(membership.column("pair_id").to_pylist(), batches):
        members.setdefault(b, []).append(pid)
    # cluster 0 in reverse order (the order key), then cluster 1: two pure batches, one across, one pure
    compositions = sorted(tuple(sorted(cluster_of[p] for p in ps)) for ps in members.values())
    assert compositions == [(0, 0, 0, 0), (0, 0, 0, 0), (0, 0, 1, 1), (1, 1, 1, 1)]
    # the order key orders inside a cluster; the sequence's last pair is the one left out
    assert ["p09", "p08", "p07", "p06"] in members.values() and ["p01", "p00", "p16", "p15"] in members.values()
    assert "p10" not in membership.column("pair_id").to_pylist()
    again, _ = group_into_batches(assigned, global_batch=4, seed=3)
    assert again.equals(membership)
    other, _ = group_into_batches(assigned, global_batch=4, seed=4)
    assert other.column("pair_id").to_pylist() != membership.column("pair_id").to_pylist()  # another batch order


def test_batch_similarities_match_a_float64_reference():
    rng = np.random.default_rng(0)
    t, w, l = (rng.standard_normal((5, DIM)).astype(np.float32) * 3 for _ in range(3))
    s_text, s_image = batch_similarities(t, w, l)

    def cos(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        return (a @ b.T) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=1)[None, :]

    assert s_text.dtype == np.float32 and s_text.shape == (5, 5)
    np.testing.assert_allclose(s_text, cos(t, t), atol=1e-6)
    np.testing.assert_allclose(s_image, cos(w, l), atol=1e-6)  # winner i against loser j: not symmetric
    embeddings = pair_embeddings(t, w, l)
    np.testing.assert_allclose(np.linalg.norm(embeddings.reshape(5, 3, DIM), axis=2), 1.0, atol=1e-6)


def _grouped_store(uri: str) -> tuple[dict[str, int], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """A store of GROUPS x PER_GROUP train pairs whose CLIP embeddings sit near one of GROUPS far-apart directions
    (their group); every pair has its own caption and images. Returns pair -> group and pair -> embeddings."""
    rng = np.random.default_rng(7)
    centres = np.eye(GROUPS, DIM, dtype=np.float32) * 4
    captions, text_clip, image_ids, image_clip, pairs, group_of, embeddings = [""], [np.ones(DIM)], [], [], [], {}, {}
    for g in range(GROUPS):
        for k in range(PER_GROUP):
            pid = f"g{g}-{k:02d}"
            t, w, l = (centres[g] + 0.3 * rng.standard_normal(DIM).astype(np.float32) for _ in range(3))
            captions.append(f"caption {pid}")
            text_clip.append(t)
            image_ids += [f"{pid}-w", f"{pid}-l"]
            image_clip += [w, l]
            pairs.append((pid, caption_hash(f"caption {pid}"), f"{pid}-w", f"{pid}-l"))
            group_of[pid], embeddings[pid] = g, (t, w, l)
    n_text, n_image = len(captions), len(image_ids)
    texts = texts_rows([caption_hash(c) for c in captions], captions, np.zeros((n_text, 77, 4), np.float16),
                       np.zeros((n_text, 2), np.float16), np.stack(text_clip).astype(np.float32))
    images = images_rows(image_ids, list(np.zeros((n_image, 4, 2, 2), np.float16)), image_clip, [(16, 16)] * n_image,
                         [(0, 0)] * n_image, [[16, 16, 0, 0, 16, 16]] * n_image, [""] * n_image, [""] * n_image)
    pair_table = pa.table({
        "pair_id": [p[0] for p in pairs], "caption_hash": [p[1] for p in pairs], "image_w_hash": [p[2] for p in pairs],
        "image_l_hash": [p[3] for p in pairs], "split": ["train"] * len(pairs), "source": ["t"] * len(pairs),
        "row": pa.array(range(len(pairs)), pa.int64())})
    store = FeatureStore(uri)
    manifest = new_manifest(SETTINGS)
    for name, table in (("texts", texts), ("images", images.drop_columns(["reason", "detail"])), ("pairs", pair_table)):
        manifest = add_shards(manifest, name, [store.write_shard(name, table)])
    store.commit(manifest)
    return group_of, embeddings


@pytest.fixture(scope="module")
def grouped_plan(tmp_path_factory, ray_session):
    uri = str(tmp_path_factory.mktemp("plan") / "store")
    group_of, embeddings = _grouped_store(uri)
    plan = build_batch_plan(uri, PlanSettings(global_batch=4, batches_per_cluster=3, seed=0))
    return uri, plan, group_of, embeddings


def test_plan_batches_come_from_one_neighbourhood_and_store_their_matrices(grouped_plan):
    uri, plan, group_of, embeddings = grouped_plan
    assert (plan["pairs"], plan["batches"], plan["left_out_pairs"], plan["clusters"]) == (48, 12, 0, 4)
    rows = pa.concat_tables([pq.read_table(f"{plan['uri']}/{f['path']}") for f in plan["files"]])
    assert rows.column("batch").to_pylist() == sorted(rows.column("batch").to_pylist())
    assert sorted(rows.column("pair_id").to_pylist()) == sorted(group_of)  # every pair once
    for b in range(plan["batches"]):
        batch = rows.filter(pa.compute.equal(rows.column("batch"), b))
        ids = batch.column("pair_id").to_pylist()
        assert len({group_of[p] for p in ids}) == 1, f"batch {b} mixes neighbourhoods: {ids}"
        t, w, l = (np.stack([embeddings[p][k] for p in ids]) for k in range(3))
        s_text, s_image = batch_similarities(t, w, l)
        assert np.array_equal(np.stack(batch.column("s_text").to_numpy(zero_copy_only=False)), s_text)
        assert np.array_equal(np.stack(batch.column("s_image").to_numpy(zero_copy_only=False)), s_image)


def test_plan_is_built_once_and_each_rank_reads_its_slots_in_plan_order(grouped_plan):
    uri, plan, _, _ = grouped_plan
    files = {f["path"]: (FeatureStore(plan["uri"]).fs.get_file_info(f"{plan['uri']}/{f['path']}").mtime)
             for f in plan["files"]}
    again = build_batch_plan(uri, PlanSettings(global_batch=4, batches_per_cluster=3, seed=0))
    assert again == plan  # read back, not rebuilt
    assert {p: FeatureStore(plan["uri"]).fs.get_file_info(f"{plan['uri']}/{p}").mtime for p in files} == files
    other = build_batch_plan(uri, PlanSettings(global_batch=2, batches_per_cluster=3, seed=0))
    assert other["uri"] != plan["uri"] and other["batches"] == 24
    rows = pa.concat_tables([pq.read_table(f"{plan['uri']}/{f['path']}") for f in plan["files"]]).to_pylist()
    for rank in (0, 1):
        dataset = read_planned_dataset(uri, plan, rank=rank, per_rank=2)
        first, second = dataset.take_all(), dataset.take_all()
        expected = [r for r in rows if 2 * rank <= r["slot"] < 2 * rank + 2]
        assert [r["pair_id"] for r in first] == [r["pair_id"] for r in expected] == [r["pair_id"] for r in second]
        assert np.array_equal(first[3]["s_text"], np.array(expected[3]["s_text"], np.float32))
        assert first[0]["latents_w"].shape == (4, 2, 2) and first[0]["s_image"].shape == (4,)
    with pytest.raises(ValueError, match="falls outside the plan's global batch of 4"):
        read_planned_dataset(uri, plan, rank=1, per_rank=4)
