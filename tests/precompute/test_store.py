"""The feature store on real files: shard round trips, the commit protocol, settings checks, the training reader."""

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.data.schema import caption_hash
from pipeline.precompute.reader import feature_locations, gather_rows, load_empty_prompt, locate_pairs, read_training_dataset
from pipeline.precompute.store import (
    FeatureStore,
    StoreMismatchError,
    add_shards,
    assign_split,
    check_settings,
    images_rows,
    new_manifest,
    read_manifest,
    settings_hash,
    sibling_store_uri,
    stacked_tensors,
    tensor_column,
    texts_rows,
    write_shard_batch,
)

SETTINGS = {
    "model": {"source": "/models/a", "kind": "sdxl", "sha256": "aaa"},
    "clip": {"name": "tiny", "pretrained": None, "sha256": "ccc"},
    "resolution": 64,
    "encoder": {"latents": "mean"},
}


def _texts(captions, *, dim=8, pooled_dim=4, seed=0):
    rng = np.random.default_rng(seed)
    n = len(captions)
    arrays = {
        "prompt_embeds": rng.standard_normal((n, 77, dim)).astype(np.float16),
        "pooled_prompt_embeds": rng.standard_normal((n, pooled_dim)).astype(np.float16),
        "clip_text": rng.standard_normal((n, 6)).astype(np.float32),
    }
    table = texts_rows([caption_hash(c) for c in captions], captions, **arrays)
    return table, arrays


def _images(n, *, seed=1):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((n, 4, 8, 8)).astype(np.float16)
    clip = rng.standard_normal((n, 6)).astype(np.float32)
    sizes = [(60 + i, 80 + i) for i in range(n)]
    crops = [(0, 5 + i) for i in range(n)]
    time_ids = [[h, w, top, left, 64, 64] for (h, w), (top, left) in zip(sizes, crops)]
    hashes = [f"img{i}" for i in range(n)]
    table = images_rows(hashes, list(latents), list(clip), sizes, crops, time_ids, [""] * n, [""] * n)
    arrays = {"hashes": hashes, "latents": latents, "clip": clip, "time_ids": time_ids}
    return table.drop_columns(["reason", "detail"]), arrays


def _pairs(rows):
    columns = ["pair_id", "caption_hash", "image_w_hash", "image_l_hash", "split"]
    table = pa.table({name: [row[i] for row in rows] for i, name in enumerate(columns)})
    return table.append_column("source", pa.array(["t.parquet"] * len(rows))).append_column(
        "row", pa.array(range(len(rows)), pa.int64())
    )


def _make_store(uri, *, pooled_dim=4):
    """A committed store: 2 captions (+ the empty one), 3 images, 3 pairs (2 train, 1 holdout)."""
    store = FeatureStore(uri)
    texts, text_arrays = _texts(["", "a cat", "a dog"], pooled_dim=pooled_dim)
    images, image_arrays = _images(3)
    cat, dog = caption_hash("a cat"), caption_hash("a dog")
    pairs = _pairs([("p0", cat, "img0", "img1", "train"), ("p1", dog, "img2", "img0", "train"),
                    ("p2", dog, "img1", "img2", "holdout")])
    manifest = new_manifest(SETTINGS)
    for name, table in (("texts", texts), ("images", images), ("pairs", pairs)):
        manifest = add_shards(manifest, name, [store.write_shard(name, table)])
    store.commit(manifest)
    return store, text_arrays, image_arrays


def test_shards_round_trip_bitwise_and_leave_no_temp_files(tmp_path):
    store, text_arrays, image_arrays = _make_store(f"file://{tmp_path}/store")
    manifest = read_manifest(f"file://{tmp_path}/store")
    texts = store.read_table(manifest, "texts")
    prompt = stacked_tensors(texts.column("prompt_embeds"), texts.column("prompt_embeds_shape").to_pylist())
    assert prompt.dtype == np.float16 and np.array_equal(prompt, text_arrays["prompt_embeds"])
    assert np.array_equal(stacked_tensors(texts.column("clip_text")), text_arrays["clip_text"])
    images = store.read_table(manifest, "images", keys=["img2", "img0"])
    assert sorted(images.column("image_hash").to_pylist()) == ["img0", "img2"]
    latents = stacked_tensors(images.column("latents"), images.column("latent_shape").to_pylist())
    assert latents.shape == (2, 4, 8, 8)
    assert {p.name for p in (tmp_path / "store" / "images").iterdir()} == {manifest["tables"]["images"][0]["path"][7:]}
    assert manifest["counts"] == {"texts": 3, "images": 3, "pairs": 3, "quarantine": 0, "train": 2, "holdout": 1}
    assert store.read_table(manifest, "pairs").column("pair_id").to_pylist() == ["p0", "p1", "p2"]
    assert manifest["model"]["kind"] == "sdxl"


def test_split_is_a_stable_share_of_pair_ids():
    ids = [f"pair-{i}" for i in range(4000)]
    splits = [assign_split(pid, 0.25) for pid in ids]
    assert splits == [assign_split(pid, 0.25) for pid in ids]  # same pair, same split, every run
    assert 0.22 < splits.count("holdout") / len(ids) < 0.28
    assert {assign_split(pid, 0.0) for pid in ids} == {"train"}


def test_tensor_columns_keep_nulls_shapes_and_chunks():
    values, shapes = tensor_column([np.ones((2, 3)), None, np.zeros((2, 3))], np.float16)
    assert values.null_count == 1 and shapes.to_pylist() == [[2, 3], None, [2, 3]]
    first, _ = tensor_column([np.full(4, 1.5)], np.float32)
    second, _ = tensor_column([np.full(4, 2.5), np.full(4, 3.5)], np.float32)
    stacked = stacked_tensors(pa.chunked_array([first, second]))  # as read from several shards
    assert stacked.dtype == np.float32 and stacked[:, 0].tolist() == [1.5, 2.5, 3.5] and stacked.shape == (3, 4)
    with pytest.raises(ValueError, match="different shapes"):
        stacked_tensors(values.filter(pa.array([True, False, True])), [[2, 3], [3, 2]])


def test_uncommitted_shards_are_invisible_and_removed_as_orphans(tmp_path):
    store, _, _ = _make_store(str(tmp_path / "store"))
    manifest = read_manifest(str(tmp_path / "store"))
    extra, _ = _images(2, seed=5)
    uncommitted = store.write_shard("images", extra.set_column(0, "image_hash", pa.array(["new0", "new1"])))
    (tmp_path / "store" / "images" / ".tmp-crashed.parquet").write_bytes(b"PAR1 half a shard")

    assert store.keys(manifest, "images") == {"img0", "img1", "img2"}  # only what the manifest lists
    removed = store.remove_orphans(manifest)
    assert sorted(removed) == sorted([uncommitted["path"], "images/.tmp-crashed.parquet"])
    assert store.read_table(manifest, "images").num_rows == 3  # committed shards untouched


def test_settings_mismatch_names_keys_values_and_both_ways_out(tmp_path):
    manifest = new_manifest(SETTINGS)
    check_settings(manifest, SETTINGS, "/s")  # same settings: fine
    moved = json.loads(json.dumps(SETTINGS))
    moved["model"]["source"] = "/elsewhere/same-weights"
    check_settings(manifest, moved, "/s")  # the same weights under another path are the same model
    assert settings_hash(moved) == settings_hash(SETTINGS)

    other = json.loads(json.dumps(SETTINGS))
    other["model"]["sha256"] = "bbb"
    other["resolution"] = 32
    with pytest.raises(StoreMismatchError) as err:
        check_settings(manifest, other, str(tmp_path / "features"))
    message = str(err.value)
    for text in ("model.sha256", "'aaa'", "'bbb'", "resolution", "64", "32", "precompute.on_mismatch=new_store",
                 "precompute.store", sibling_store_uri(str(tmp_path / "features"), other)):
        assert text in message
    assert settings_hash(other) != settings_hash(SETTINGS)
    assert sibling_store_uri("s3://b/features/", other) == f"s3://b/features-{settings_hash(other)}"


def test_read_manifest_of_missing_store_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="jobs/precompute.py"):
        read_manifest(str(tmp_path / "nothing"))


def test_write_shard_batch_writes_good_rows_and_reports_bad_ones(tmp_path):
    uri = str(tmp_path / "store")
    latents = [np.ones((4, 2, 2)), None, np.zeros((4, 2, 2))]
    batch = images_rows(
        ["a", "b", "c"], latents, [np.ones(3), None, np.ones(3)], [(8, 8)] * 3, [(0, 0)] * 3,
        [[8, 8, 0, 0, 8, 8], None, [8, 8, 0, 0, 8, 8]], ["", "truncated_image", ""], ["", "ends early", ""],
    )
    records = write_shard_batch(batch, store_uri=uri, table="images").to_pylist()
    assert [r["key"] for r in records] == ["a", "b", "c"]
    assert records[1] == {"key": "b", "shard": "", "shard_rows": 2, "reason": "truncated_image", "detail": "ends early"}
    assert records[0]["shard"] == records[2]["shard"] != ""
    store = FeatureStore(uri)
    manifest = add_shards(new_manifest(SETTINGS), "images", [{"path": records[0]["shard"], "rows": 2}])
    assert store.keys(manifest, "images") == {"a", "c"}


def test_load_empty_prompt(tmp_path):
    _, text_arrays, _ = _make_store(str(tmp_path / "store"))
    prompt, pooled = load_empty_prompt(str(tmp_path / "store"))
    assert prompt.dtype == np.float16 and np.array_equal(prompt, text_arrays["prompt_embeds"][0])
    assert np.array_equal(pooled, text_arrays["pooled_prompt_embeds"][0])


def _rows_by_id(dataset):
    return {row["pair_id"]: row for row in dataset.take_all()}


def test_read_training_dataset_gives_logical_rows(tmp_path, ray_session):
    _, text_arrays, image_arrays = _make_store(str(tmp_path / "store"))
    train = _rows_by_id(read_training_dataset(str(tmp_path / "store"), split="train"))
    assert sorted(train) == ["p0", "p1"]
    row = train["p1"]  # caption "a dog" (text row 2), winner img2, loser img0
    assert row["latents_w"].dtype == np.float16 and np.array_equal(row["latents_w"], image_arrays["latents"][2])
    assert np.array_equal(row["latents_l"], image_arrays["latents"][0])
    assert np.array_equal(row["prompt_embeds"], text_arrays["prompt_embeds"][2])
    assert np.array_equal(row["pooled_prompt_embeds"], text_arrays["pooled_prompt_embeds"][2])
    assert row["add_time_ids_w"].dtype == np.float32
    assert row["add_time_ids_w"].tolist() == image_arrays["time_ids"][2]
    assert row["add_time_ids_l"].tolist() == image_arrays["time_ids"][0]
    assert np.array_equal(row["clip_text"], text_arrays["clip_text"][2])
    assert np.array_equal(row["clip_image_w"], image_arrays["clip"][2])
    assert np.array_equal(row["clip_image_l"], image_arrays["clip"][0])

    holdout = _rows_by_id(read_training_dataset(str(tmp_path / "store"), split="holdout"))
    assert sorted(holdout) == ["p2"] and holdout["p2"]["latents_l"].shape == (4, 8, 8)


def test_gather_reads_rows_across_shards_and_row_groups_in_request_order(tmp_path):
    from pipeline.precompute.store import FEATURE_ROW_GROUP_ROWS

    store = FeatureStore(str(tmp_path / "store"))
    n = FEATURE_ROW_GROUP_ROWS * 2 + 5  # three row groups in each shard
    first, first_arrays = _images(n, seed=1)
    second, second_arrays = _images(n, seed=2)
    second = second.set_column(0, "image_hash", pa.array([f"b{i}" for i in range(n)]))
    entries = [store.write_shard("images", first), store.write_shard("images", second)]
    manifest = add_shards(new_manifest(SETTINGS), "images", entries)
    locations = feature_locations(store, manifest, "images")
    assert locations.num_rows == 2 * n and locations.column("shard").to_pylist()[n] == 1
    shards = np.array([1, 0, 1, 0, 0, 1])
    rows = np.array([n - 1, 3, 0, FEATURE_ROW_GROUP_ROWS + 1, 3, FEATURE_ROW_GROUP_ROWS * 2])
    got = gather_rows(store.fs, store.shard_paths(manifest, "images"), shards, rows, ["latents", "latent_shape"])
    latents = stacked_tensors(got.column("latents"), got.column("latent_shape").to_pylist())
    expected = [(second_arrays if s else first_arrays)["latents"][r] for s, r in zip(shards, rows)]
    assert np.array_equal(latents, np.stack(expected))


def test_pairs_are_located_in_their_order_and_a_missing_feature_is_named():
    images = pa.table({"image_hash": ["x", "y", "z"], "shard": pa.array([0, 1, 1], pa.int32()),
                       "row": pa.array([4, 0, 7], pa.int32())})
    texts = pa.table({"caption_hash": ["c"], "shard": pa.array([2], pa.int32()), "row": pa.array([9], pa.int32())})
    pairs = pa.table({"pair_id": ["p2", "p1", "p3"], "caption_hash": ["c", "c", "c"],
                      "image_w_hash": ["z", "x", "y"], "image_l_hash": ["x", "y", "z"]})
    located = locate_pairs(pairs, images, texts)
    assert located.column("pair_id").to_pylist() == ["p2", "p1", "p3"]
    assert located.column("w_shard").to_pylist() == [1, 0, 1] and located.column("w_row").to_pylist() == [7, 4, 0]
    assert located.column("l_row").to_pylist() == [4, 0, 7] and located.column("t_row").to_pylist() == [9, 9, 9]
    broken = pairs.set_column(3, "image_l_hash", pa.array(["x", "gone", "z"]))
    with pytest.raises(KeyError, match="pair p1 refers to image gone"):
        locate_pairs(broken, images, texts)


def test_read_training_dataset_sd15_has_zero_length_pooled(tmp_path, ray_session):
    _make_store(str(tmp_path / "store"), pooled_dim=0)
    batch = next(iter(read_training_dataset(str(tmp_path / "store")).iter_batches(batch_size=2, batch_format="numpy")))
    assert batch["pooled_prompt_embeds"].shape == (2, 0)
    assert batch["pooled_prompt_embeds"].dtype == np.float16


def test_a_store_of_another_model_is_refused_naming_both():
    from pipeline.precompute.store import check_store_model

    manifest = new_manifest(SETTINGS | {"model": {**SETTINGS["model"], "variant": None}})
    same_weights_elsewhere = {"source": "/copies/a", "kind": "sdxl", "sha256": "aaa", "variant": None}
    check_store_model(manifest, same_weights_elsewhere, "/s")  # the path alone may differ
    for change in ({"sha256": "bbb"}, {"variant": "fp16"}, {"kind": "sd15"}):
        run_model = same_weights_elsewhere | change
        with pytest.raises(StoreMismatchError) as err:
            check_store_model(manifest, run_model, "s3://b/features")
        message = str(err.value)
        key, value = next(iter(change.items()))
        assert "s3://b/features" in message and f"{key}={value!r}" in message
        assert f"{key}={SETTINGS['model'].get(key)!r}" in message and "/models/a" in message and "/copies/a" in message
