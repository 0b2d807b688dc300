"""Precompute and training against a real S3 API: moto's server on 127.0.0.1 (tests/conftest.py `s3_endpoint`)."""

import io

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import load_preferences
from pipeline.data.schema import image_hash
from pipeline.precompute import FeatureStore, read_manifest, read_training_dataset, run_precompute
from pipeline.precompute.store import committed_pair_ids
from pipeline.storage import StorageAccessError


def _upload(client, bucket: str, key: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    client.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    client = boto3.client("s3")
    client.create_bucket(Bucket="prefs")
    return client


def test_precompute_s3_to_s3_survives_a_crash_and_trains(world, bucket, ray_session, tmp_path, monkeypatch):
    import pipeline.precompute.run as run_module
    from pipeline.train.run import run_training

    monkeypatch.setattr(run_module, "COMMIT_EVERY_S", 0.0)  # commit finished features after every record batch
    toy = pq.read_table(world.toy_table)
    _upload(bucket, "prefs", "pickapic/part-0.parquet", toy.slice(0, 6))
    bucket.put_object(Bucket="prefs", Key="pickapic/part-1.parquet", Body=b"PAR1 cut short by a failed upload")
    cfg = world.config("s3://prefs/features", "data.source=s3://prefs/pickapic", "precompute.batch_size=2",
                       "precompute.rows_per_shard=2")
    with pytest.raises(Exception, match="part-1.parquet"):  # the run dies mid-way: one file is not Parquet
        run_precompute(cfg)
    crashed = FeatureStore("s3://prefs/features").read_manifest()
    if crashed is not None:
        assert crashed["counts"]["pairs"] == 0  # finished features may be committed; no pair is

    _upload(bucket, "prefs", "pickapic/part-1.parquet", toy.slice(6, 4))  # the upload is repaired
    summary = run_precompute(cfg)
    local = tmp_path / "table"
    local.mkdir()
    pq.write_table(toy.slice(0, 6), local / "part-0.parquet")
    pq.write_table(toy.slice(6, 4), local / "part-1.parquet")
    load = load_preferences(local)
    images = {image_hash(b) for column in ("image_w", "image_l") for b in load.pairs.column(column).to_pylist()}
    assert summary["new_images"] == len(images) - (crashed["counts"]["images"] if crashed else 0)
    manifest = read_manifest("s3://prefs/features")
    store = FeatureStore("s3://prefs/features")
    assert committed_pair_ids(store, manifest) == set(load.pairs.column("pair_id").to_pylist())
    assert manifest["counts"]["images"] == len(images)
    assert {r["source"] for r in store.read_table(manifest, "pairs").to_pylist()} == {
        "s3://prefs/pickapic/part-0.parquet", "s3://prefs/pickapic/part-1.parquet"}
    rows = read_training_dataset("s3://prefs/features").take_all()
    assert len(rows) == manifest["counts"]["train"] and rows[0]["latents_w"].shape == (4, 4, 4)

    train_cfg = world.config(
        "s3://prefs/features", "train.max_steps=2", "train.num_workers=1",
        "train.worker_num_cpus=0.5", "train.batch_size_per_worker=2", "train.log_every=1",
        "train.checkpoint_every=100", "evaluate.holdout_pairs=0", "train.lr=1e-4", "loss.beta=500",
    )
    result = run_training(train_cfg)  # same name as precompute: reuses its tiny model; the workers read S3
    assert result.metrics["step"] == 2 and result.metrics["loss"] == result.metrics["loss"]  # trained, not NaN


def test_a_missing_bucket_stops_the_run_before_any_work(world, s3_endpoint, tmp_path):
    cfg = world.config(tmp_path / "features", "data.source=s3://no-such-bucket/pickapic")
    with pytest.raises(StorageAccessError) as err:
        run_precompute(cfg)
    assert "s3://no-such-bucket/pickapic" in str(err.value) and "data.source" in str(err.value)
    assert "AWS_ENDPOINT_URL" in str(err.value) and not (tmp_path / "features").exists()
    cfg = world.config("s3://no-such-bucket/features", f"data.source={world.toy_table}")
    with pytest.raises(StorageAccessError, match="precompute.store"):
        run_precompute(cfg)


def test_an_s3_folder_of_parquet_and_jsonl_shards_is_read_whole_and_other_files_are_reported(world, bucket,
                                                                                              ray_session):
    """A JSONL shard (images beside it, named relative to its folder) next to a Parquet shard and a stray file, on
    S3: both shards are read by load_preferences and by precompute's streaming read tasks; the stray file is named."""
    import json

    from pipeline.data.readers import TableFile, list_table, table_files
    from pipeline.precompute.source import RowCheck, read_checked_rows

    toy = pq.read_table(world.toy_table)
    _upload(bucket, "prefs", "mixed/part-0.parquet", toy.slice(0, 4))
    lines = []
    for i, row in enumerate(toy.slice(4, 3).to_pylist()):
        names = [f"images/{i}_{side}.png" for side in (0, 1)]
        for name, column in zip(names, ("jpg_0", "jpg_1")):
            bucket.put_object(Bucket="prefs", Key=f"mixed/{name}", Body=row[column])
        lines.append(json.dumps({"caption": row["caption"], "image_0_path": names[0], "image_1_path": names[1],
                                 "label_0": row["label_0"]}))
    bucket.put_object(Bucket="prefs", Key="mixed/part-1.jsonl", Body="\n".join(lines).encode())
    bucket.put_object(Bucket="prefs", Key="mixed/notes.txt", Body=b"exported by hand")

    uri = "s3://prefs/mixed"
    assert table_files(uri) == [TableFile(f"{uri}/part-0.parquet", "parquet"),
                                TableFile(f"{uri}/part-1.jsonl", "jsonl")]
    assert list_table(uri).ignored == [f"{uri}/notes.txt"]
    load = load_preferences(uri)
    assert load.summary["ignored_files"] == [f"{uri}/notes.txt"] and load.quarantine.num_rows == 0
    assert {r["source"] for r in load.pairs.to_pylist()} == {f"{uri}/part-0.parquet", f"{uri}/part-1.jsonl"}
    assert load.pairs.num_rows == load.summary["kept"] > 4  # the JSONL shard's rows too

    check = RowCheck(drop_ties=True, max_image_pixels=world.config("unused").data.max_image_pixels,
                     max_aspect_ratio=3.0)
    streamed = read_checked_rows(table_files(uri), check, num_cpus=0.5).take_all()
    assert {r["pair_id"] for r in streamed if r["status"] == "pair"} == set(load.pairs.column("pair_id").to_pylist())
    assert {r["source"] for r in streamed} == {f"{uri}/part-0.parquet", f"{uri}/part-1.jsonl"}


def test_wrong_credentials_stop_the_run_naming_the_variables(world, bucket, monkeypatch, tmp_path):
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks access keys
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    cfg = world.config(tmp_path / "features", "data.source=s3://prefs/pickapic")
    with pytest.raises(StorageAccessError) as err:
        run_precompute(cfg)
    message = str(err.value)
    assert "s3://prefs/pickapic" in message and "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
