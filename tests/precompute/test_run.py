"""run_precompute end to end on the tiny SDXL and the toy world, with a real Ray and real files."""

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import load_preferences
from pipeline.data.schema import PAIR_SCHEMA, caption_hash, image_hash
from pipeline.models.clip import ClipEmbedder
from pipeline.models.loader import load_components
from pipeline.models.text import encode_prompts
from pipeline.precompute import (
    FeatureStore,
    StoreMismatchError,
    format_summary,
    load_empty_prompt,
    read_manifest,
    read_training_dataset,
    run_precompute,
    store_settings,
)
from pipeline.precompute.stages import prepare_image, vae_input
from pipeline.precompute.store import committed_pair_ids, new_manifest, sibling_store_uri, stacked_tensors

RESOLUTION = 32  # the store resolution the world's config sets (tests/precompute/conftest.py)


def _direct(model_path: str, captions: list[str], images: list[bytes]) -> dict:
    """The same encoders run by hand, without Ray, on the given captions and encoded images."""
    parts = load_components(model_path, parts=("vae", "text"))
    clip = ClipEmbedder("tiny", "random")
    crops = [prepare_image(Image.open(io.BytesIO(data)).convert("RGB"), RESOLUTION) for data in images]
    pixels = np.stack([crop.pixels for crop in crops])
    with torch.no_grad():
        mean = parts.vae.encode(vae_input(pixels)).latent_dist.mean
        prompt, pooled = encode_prompts(parts.text_encoders, parts.tokenizers, captions, kind="sdxl")
    return {
        "latents": (mean * parts.vae.config.scaling_factor).numpy().astype(np.float16),
        "clip_image": clip.embed_images([Image.fromarray(p) for p in pixels]).numpy(),
        "time_ids": [[*c.original_size, *c.crop_top_left, RESOLUTION, RESOLUTION] for c in crops],
        "prompt": prompt.numpy().astype(np.float16),
        "pooled": pooled.numpy().astype(np.float16),
        "clip_text": clip.embed_texts(captions).numpy(),
    }


def _close(stored: np.ndarray, direct: np.ndarray) -> None:
    """Equal within float16 rounding. Another batch composition may pick another CPU kernel whose float32 result
    differs in the last bits (seen for the VAE at batch 1 against 4), which can move a value by one float16 step."""
    assert stored.dtype == direct.dtype and stored.shape == direct.shape
    if stored.dtype == np.float16:
        np.testing.assert_array_max_ulp(stored, direct, maxulp=1)
    else:
        np.testing.assert_allclose(stored, direct, rtol=0, atol=1e-6)


def _all_rows(store_uri: str) -> dict[str, dict]:
    rows = {}
    for split in ("train", "holdout"):
        rows.update({row["pair_id"]: row for row in read_training_dataset(store_uri, split=split).take_all()})
    return rows


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _pair_ids(table: pa.Table) -> set[str]:
    return set(table.column("pair_id").to_pylist())


@dataclass
class FirstRun:
    store: Path
    source: Path  # the table it was made from: the toy world's first 8 rows
    summary: dict


@pytest.fixture(scope="module")
def first_run(world, tmp_path_factory, ray_session) -> FirstRun:
    """One store made from the first 8 toy rows, shared by the tests that only read it or copy it."""
    folder = tmp_path_factory.mktemp("first_run")
    source = world.subset(folder, 8)
    summary = run_precompute(world.config(folder / "features", f"data.source={source}"))
    return FirstRun(folder / "features", source, summary)


def test_store_equals_direct_encoding(world, first_run):
    pairs = load_preferences(first_run.source).pairs
    assert first_run.summary["new_pairs"] == pairs.num_rows and not first_run.summary["nothing_new"]
    rows = _all_rows(str(first_run.store))
    assert set(rows) == _pair_ids(pairs)
    records = pairs.to_pylist()
    direct = _direct(world.model_path, [r["caption"] for r in records] + [""],
                     [r["image_w"] for r in records] + [r["image_l"] for r in records])
    n = len(records)
    for i, record in enumerate(records):
        row = rows[record["pair_id"]]
        assert row["latents_w"].dtype == np.float16 and row["latents_w"].shape == (4, 4, 4)
        _close(row["latents_w"], direct["latents"][i])
        _close(row["latents_l"], direct["latents"][n + i])
        _close(row["prompt_embeds"], direct["prompt"][i])
        _close(row["pooled_prompt_embeds"], direct["pooled"][i])
        _close(row["clip_text"], direct["clip_text"][i])
        _close(row["clip_image_w"], direct["clip_image"][i])
        _close(row["clip_image_l"], direct["clip_image"][n + i])
        assert row["add_time_ids_w"].tolist() == direct["time_ids"][i]
        assert row["add_time_ids_l"].tolist() == direct["time_ids"][n + i]
    empty_prompt, _ = load_empty_prompt(str(first_run.store))  # "" is always stored, for prompt dropout
    _close(empty_prompt, direct["prompt"][n])


def test_same_table_again_writes_nothing_and_says_so(world, first_run):
    manifest, files = read_manifest(str(first_run.store)), _files(first_run.store)
    again = run_precompute(world.config(first_run.store, f"data.source={first_run.source}"))
    assert again["nothing_new"] and again["new_pairs"] == 0 and again["new_images"] == again["new_texts"] == 0
    assert again["skipped_pairs"] == first_run.summary["new_pairs"]
    assert "nothing new" in format_summary(again)
    assert read_manifest(str(first_run.store)) == manifest and _files(first_run.store) == files


def test_store_of_other_settings_is_refused_or_left_for_a_sibling(world, first_run, tmp_path):
    other = world.config(first_run.store, f"data.source={world.subset(tmp_path, 3)}", "precompute.resolution=64")
    with pytest.raises(StoreMismatchError) as err:
        run_precompute(other)
    assert "resolution: store has 32, this run has 64" in str(err.value)
    assert "precompute.on_mismatch=new_store" in str(err.value) and "precompute.store" in str(err.value)

    before = read_manifest(str(first_run.store))
    other = world.config(first_run.store, f"data.source={other.data.source}", "precompute.resolution=64",
                         "precompute.on_mismatch=new_store")
    summary = run_precompute(other)
    sibling = sibling_store_uri(str(first_run.store), store_settings(other, world.model_path))
    assert summary["store_uri"] == sibling and summary["new_pairs"] > 0
    assert read_manifest(sibling)["resolution"] == 64
    assert read_manifest(str(first_run.store)) == before  # the first store is left as it was
    shutil.rmtree(sibling)


def test_grown_table_encodes_only_new_rows_and_quarantines_bad_ones(world, first_run, tmp_path):
    """The table grew by good rows (one with a wide image) and bad rows; the store was made from its first 8."""
    store = tmp_path / "features"
    shutil.copytree(first_run.store, store)
    before = read_manifest(str(store))
    toy = pq.read_table(world.toy_table).to_pylist()
    png = toy[0]["jpg_0"]
    wide = io.BytesIO()
    Image.new("RGB", (72, 48), (200, 30, 30)).save(wide, format="PNG")  # not square: resized and cropped
    rows = toy + [
        dict(toy[0], caption="a wide red picture", jpg_1=wide.getvalue(), label_0=1.0),
        dict(toy[1], jpg_0=png[: len(png) // 2]),
        dict(toy[1], caption="garbage", jpg_1=b"not an image at all"),
        dict(toy[2], caption=""),
        dict(toy[2], label_0=2.0),
        dict(toy[3]),  # a duplicate of an old row
        dict(toy[4], jpg_0=toy[4]["jpg_1"], jpg_1=toy[4]["jpg_0"], label_0=1.0 - toy[4]["label_0"]),  # swapped
    ]
    grown = tmp_path / "grown.parquet"
    pq.write_table(pa.Table.from_pylist(rows), grown)

    summary = run_precompute(world.config(store, f"data.source={grown}"))
    old, load = load_preferences(first_run.source).pairs, load_preferences(grown)
    # The streaming path and load_preferences count and quarantine the same table alike.
    assert summary["reader"] == load.summary and load.summary["duplicates"] >= 1
    found = FeatureStore(str(store)).read_table(read_manifest(str(store)), "quarantine")
    keys = ("source", "row", "reason", "detail")
    assert sorted(zip(*(found.column(k).to_pylist() for k in keys))) == sorted(
        zip(*(load.quarantine.column(k).to_pylist() for k in keys)))
    new = _pair_ids(load.pairs) - _pair_ids(old)
    assert summary["new_pairs"] == len(new) > 0 and summary["skipped_pairs"] == old.num_rows
    new_rows = [r for r in load.pairs.to_pylist() if r["pair_id"] in new]
    old_images = {image_hash(b) for column in ("image_w", "image_l") for b in old.column(column).to_pylist()}
    new_images = {image_hash(r[column]) for r in new_rows for column in ("image_w", "image_l")} - old_images
    assert summary["new_images"] == len(new_images)  # the wide pair reuses a stored image: not encoded again
    assert summary["new_texts"] == len({r["caption"] for r in new_rows} - set(old.column("caption").to_pylist()))

    manifest = read_manifest(str(store))
    for table in ("texts", "images", "pairs"):  # appended: the old shards are kept as they were
        assert manifest["tables"][table][: len(before["tables"][table])] == before["tables"][table]
    assert committed_pair_ids(FeatureStore(str(store)), manifest) == _pair_ids(load.pairs)  # every good row is there
    assert manifest["counts"]["pairs"] == manifest["counts"]["train"] + manifest["counts"]["holdout"]

    n = len(toy)
    quarantine = FeatureStore(str(store)).read_table(manifest, "quarantine")
    assert summary["quarantined"] == quarantine.num_rows == 4
    reasons = dict(zip(quarantine.column("row").to_pylist(), quarantine.column("reason").to_pylist()))
    assert reasons == {n + 1: "truncated_image", n + 2: "undecodable_image", n + 3: "bad_caption", n + 4: "bad_label"}

    wide_row = FeatureStore(str(store)).read_table(manifest, "images", keys=[image_hash(wide.getvalue())])
    assert wide_row.column("add_time_ids").to_pylist() == [[48, 72, 0, 8, 32, 32]]  # 72x48 -> 48x32, crop left 8
    latents = stacked_tensors(wide_row.column("latents"), wide_row.column("latent_shape").to_pylist())
    assert latents.shape == (1, 4, 4, 4)


def jsonl_shard(rows: list[dict], path: Path) -> Path:
    """Toy rows as a JSONL shard whose images are PNG files under an ``images`` folder beside it."""
    images = path.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        names = [f"images/{path.stem}_{i}_{side}.png" for side in (0, 1)]
        for name, column in zip(names, ("jpg_0", "jpg_1")):
            (path.parent / name).write_bytes(row[column])
        lines.append({"caption": row["caption"], "image_0_path": names[0], "image_1_path": names[1],
                      "label_0": row["label_0"]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_jsonl_shard_beside_parquet_ones_is_new_data_and_other_files_are_reported(world, first_run, tmp_path):
    """Re-alignment's case: a JSONL shard lands in the data folder beside the Parquet shard the store was made
    from. Its rows are read (nothing new would be a lie) and a stray file is named in the summary."""
    store = tmp_path / "features"
    shutil.copytree(first_run.store, store)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(first_run.source, data / "part-0.parquet")  # the 8 rows the store holds
    jsonl = jsonl_shard(pq.read_table(world.toy_table).to_pylist()[8:], data / "part-1.jsonl")
    (data / "notes.txt").write_text("exported by hand")

    summary = run_precompute(world.config(store, f"data.source={data}"))
    load = load_preferences(data)
    assert summary["reader"] == load.summary  # the streaming path reads the folder as load_preferences does
    assert summary["ignored_files"] == load.summary["ignored_files"] == [str(data / "notes.txt")]
    assert "notes.txt" in format_summary(summary)
    sources = {r["source"] for r in load.pairs.to_pylist()}
    assert sources == {str(data / "part-0.parquet"), str(jsonl)}
    new = _pair_ids(load.pairs) - _pair_ids(load_preferences(first_run.source).pairs)
    assert not summary["nothing_new"] and summary["new_pairs"] == len(new) > 0
    assert summary["skipped_pairs"] == first_run.summary["new_pairs"]
    manifest = read_manifest(str(store))
    assert committed_pair_ids(FeatureStore(str(store)), manifest) == _pair_ids(load.pairs)
    stored = FeatureStore(str(store)).read_table(manifest, "pairs").to_pylist()
    assert {r["source"] for r in stored if r["pair_id"] in new} == {str(jsonl)}
    assert set(new) <= set(_all_rows(str(store)))  # their features were encoded: training reads them


def crash_world(world, folder: Path) -> Path:
    """A table of two files: 4 good rows, then 2 good rows and one with a bad label (it writes a quarantine shard)."""
    folder.mkdir(parents=True)
    toy = pq.read_table(world.toy_table)
    pq.write_table(toy.slice(0, 4), folder / "a.parquet")
    b = toy.slice(4, 2).to_pylist()
    pq.write_table(pa.Table.from_pylist(b + [dict(b[0], label_0=2.0)]), folder / "b.parquet")
    return folder


def test_crash_mid_run_hides_everything_and_rerun_completes(world, tmp_path, ray_session, monkeypatch):
    import pipeline.precompute.run as run_module

    monkeypatch.setattr(run_module, "COMMIT_EVERY_S", 0.0)  # commit finished features after every record batch
    store = tmp_path / "features"
    store.mkdir()
    (store / "quarantine").write_text("a file where the quarantine folder goes: writing its shard fails mid-run")
    cfg = world.config(store, f"data.source={crash_world(world, tmp_path / 'data')}", "precompute.batch_size=2",
                       "precompute.rows_per_shard=2")
    with pytest.raises(Exception, match="quarantine"):
        run_precompute(cfg)
    crashed = FeatureStore(str(store)).read_manifest()
    if crashed is not None:  # features that finished before the crash may be committed; no pair is
        assert crashed["counts"]["pairs"] == 0 and read_training_dataset(str(store)).count() == 0
    (store / "images").mkdir(exist_ok=True)
    (store / "images" / ".tmp-half-written.parquet").write_bytes(b"PAR1 a shard cut short by the crash")

    (store / "quarantine").unlink()
    summary = run_precompute(cfg)
    before = crashed["counts"]["images"] if crashed else 0
    load = load_preferences(cfg.data.source)
    images = {image_hash(b) for column in ("image_w", "image_l") for b in load.pairs.column(column).to_pylist()}
    assert summary["new_images"] == len(images) - before  # nothing encoded twice
    assert summary["orphans_removed"] >= 1 and not (store / "images" / ".tmp-half-written.parquet").exists()
    expected = _pair_ids(load.pairs)
    manifest = read_manifest(str(store))
    assert summary["new_pairs"] == len(expected) == manifest["counts"]["pairs"]
    assert committed_pair_ids(FeatureStore(str(store)), manifest) == expected
    assert manifest["counts"]["images"] == len(images) and manifest["counts"]["quarantine"] == 1
    assert caption_hash("") in FeatureStore(str(store)).keys(manifest, "texts")
    assert len(_all_rows(str(store))) == len(expected)


def test_images_that_fail_to_decode_quarantine_their_pairs_and_never_stop_the_run(world, tmp_path):
    """Defence in depth: the table reader decodes every image too, so here the bytes go straight to the stages."""
    from pipeline.precompute.stream import (ITEM_SCHEMA, FeatureEncoder, decode_items, drop_pairs_with_bad_images,
                                            write_feature_shards)
    from pipeline.precompute.run import encoder_spec

    cfg = world.config(tmp_path / "features")
    settings = store_settings(cfg, world.model_path)
    good, other = pq.read_table(world.toy_table).slice(0, 1).to_pylist()[0]["jpg_0"], b"junk, not an image"
    items = pa.table({"kind": ["image", "image", "text"], "key": [image_hash(good), image_hash(other), "c"],
                      "caption": [None, None, "a caption"], "image": [good, other, None]}, schema=ITEM_SCHEMA)
    decoded = decode_items(items, resolution=RESOLUTION, max_image_pixels=cfg.data.max_image_pixels)
    features = FeatureEncoder(encoder_spec(cfg, world.model_path, settings))(decoded)
    records = write_feature_shards(features, store_uri=str(tmp_path / "features")).to_pylist()
    by_key = {r["key"]: r for r in records}
    assert by_key[image_hash(other)]["reason"] == "undecodable_image" and by_key[image_hash(other)]["shard"] == ""
    assert by_key[image_hash(good)]["shard"].startswith("images/") and by_key["c"]["shard"].startswith("texts/")

    bad = {image_hash(other): ("undecodable_image", "not an image")}
    pairs = pa.Table.from_pylist([
        {"pair_id": "ok", "caption_hash": "c", "image_w_hash": image_hash(good), "image_l_hash": image_hash(good),
         "split": "train", "source": "t", "row": 0},
        {"pair_id": "bad", "caption_hash": "c", "image_w_hash": image_hash(good), "image_l_hash": image_hash(other),
         "split": "train", "source": "t", "row": 1},
    ])
    kept, quarantined = drop_pairs_with_bad_images(pairs, bad)
    assert kept.column("pair_id").to_pylist() == ["ok"]
    assert quarantined.to_pylist() == [{"source": "t", "row": 1, "reason": "undecodable_image",
                                        "detail": "image_l not an image", "pair_id": "bad"}]
