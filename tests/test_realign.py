"""Scheduled re-alignment end to end on the toy world, from the toy base (which draws its scenes in every style, the
sketch style a minority), one registry across the steps (in order):

1. a first run trains v1 on sketch-preferred pairs, judges it against the base and promotes it on its merits (the
   gate's style win rate clears 0.5 with 95% confidence; promote_first_version stays off), while an overlapping
   second run is refused by the lock;
2. a run with no new data does nothing, says so, and changes nothing;
3. a new shard of deliberately inverted preferences (with two corrupt rows) is precomputed alone (the corrupt rows
   quarantined with reasons), trained on from v1 (new pairs only), judged against v1 and rejected by the gate: it
   draws fewer sketches than v1 and loses the paired comparison; v1 stays promoted.
"""

import json
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.toy import make_toy_world
from pipeline.generate.prompts import toy_prompts
from pipeline.realign import format_result, run_realign
from pipeline.registry import Registry, RegistryLockedError

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
GOOD_PAIRS = 160
INVERTED_PAIRS = 96


def toy_shard(folder: Path, name: str, *, pairs: int, seed: int, invert: bool = False, corrupt_rows: int = 0) -> Path:
    """A new Pick-a-Pic shard of toy pairs in `folder`: sketch preferred, or (invert) the other way round."""
    table = pq.read_table(make_toy_world(folder.parent / f"make-{name}", n_pairs=pairs, resolution=64, seed=seed))
    if invert:
        table = table.set_column(table.schema.get_field_index("label_0"), "label_0",
                                 pc.subtract(pa.scalar(1.0), table.column("label_0")))
    if corrupt_rows:
        jpg = table.column("jpg_0").to_pylist()
        jpg[:corrupt_rows] = [b"not an image"] * corrupt_rows
        table = table.set_column(table.schema.get_field_index("jpg_0"), "jpg_0", pa.array(jpg, pa.binary()))
    path = folder / f"{name}.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("realign")
    incoming = root / "incoming"
    incoming.mkdir()
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(toy_prompts(16)) + "\n")
    # old_pairs_per_new=0: the inverted version learns from its own shard alone, so the gate judges that shard
    cfg = load_config(ROOT / "jobs/configs/realign_toy.yaml", [
        f"cluster.storage_path={root / 'runs'}", f"data.source={incoming}", f"generate.prompts={prompts}",
        "evaluate.bootstrap_resamples=1000", "realign.old_pairs_per_new=0",
    ])
    assert not cfg.realign.promote_first_version
    registry = Registry(str(root / "runs" / cfg.name / "registry"))
    return {"root": root, "incoming": incoming, "cfg": cfg, "registry": registry, "results": {}}


def test_first_run_promotes_v1_and_an_overlapping_run_is_refused(world):
    toy_shard(world["incoming"], "shard-000", pairs=GOOD_PAIRS, seed=0)
    refused = {}

    def second_run():  # starts while the first holds the lock
        lock = Path(world["registry"].uri) / "lock.json"
        deadline = time.monotonic() + 300
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            run_realign(world["cfg"])
            refused["error"] = None
        except RegistryLockedError as err:
            refused["error"] = str(err)

    thread = threading.Thread(target=second_run)
    thread.start()
    result = run_realign(world["cfg"])
    thread.join(60)
    print("\n".join(format_result(result)))
    assert refused["error"] and "another re-alignment run is at work" in refused["error"]

    assert (result.status, result.version, result.promoted) == ("promoted", "v1", "v1"), result.reasons
    registry = world["registry"]
    assert registry.promoted() == "v1" and registry.versions() == ["v1"]
    record = registry.record("v1")
    assert record["status"] == "promoted" and record["started_from"] == "base"
    # Promoted on its merits: the gate's verdict against the base says promote, and it is what was recorded.
    verdict = record["decision"]["reasons"]
    assert record["decision"]["promote"], verdict
    assert record["reasons"] == result.reasons and result.reasons[-len(verdict):] == verdict
    share = record["comparison"]["style"]["share"]
    assert share["candidate"]["value"] > share["promoted"]["value"], share  # it draws more sketches than the base
    assert record["data"]["new_pairs"] > 0 and record["data"]["old_pairs"] == 0
    assert (Path(registry.model_uri("v1")) / "config.json").is_file()
    assert Path(record["report"]).is_file()
    world["results"]["v1_data"] = record["data"]


def test_a_run_with_no_new_data_changes_nothing(world):
    registry = world["registry"]
    index_before = (Path(registry.uri) / "index.json").read_bytes()
    result = run_realign(world["cfg"])
    assert result.status == "nothing_new" and result.version is None and result.promoted == "v1"
    assert format_result(result)[0].startswith("[realign] nothing new: 0 unseen train pair(s)")
    assert result.precompute["nothing_new"]  # nothing was encoded either
    assert registry.versions() == ["v1"]
    assert (Path(registry.uri) / "index.json").read_bytes() == index_before


def test_an_inverted_shard_is_precomputed_alone_trained_on_and_rejected(world):
    toy_shard(world["incoming"], "shard-001", pairs=INVERTED_PAIRS, seed=1, invert=True, corrupt_rows=2)
    result = run_realign(world["cfg"])
    print("\n".join(format_result(result)))
    summary = result.precompute
    v1_data = world["results"]["v1_data"]
    assert summary["skipped_pairs"] == v1_data["store_pairs"]  # the first shard's pairs: not encoded again
    assert summary["quarantined"] == 2 and summary["new_pairs"] > 0  # the corrupt rows; the rest is used
    quarantine = pa.concat_tables(
        pq.read_table(p) for p in (Path(summary["store_uri"]) / "quarantine").glob("part-*.parquet"))
    assert set(quarantine.column("reason").to_pylist()) == {"undecodable_image"}
    assert all("shard-001" in s for s in quarantine.column("source").to_pylist())

    assert (result.status, result.version, result.promoted) == ("kept", "v2", "v1"), result.reasons
    registry = world["registry"]
    assert registry.promoted() == "v1"
    record = registry.record("v2")
    assert record["status"] == "kept" and record["started_from"] == "v1"
    assert record["config"]["train"]["init_unet"] == registry.model_uri("v1")  # continued from the promoted model
    assert not record["decision"]["promote"]
    assert "not above 0.5" in record["decision"]["reasons"][0]
    train_pairs = pq.read_table(Path(registry.version_uri("v2")) / "train_pairs.parquet")
    assert sum(train_pairs.column("new").to_pylist()) == record["data"]["new_pairs"]  # the new pairs, all of them
    assert record["data"]["old_pairs"] == 0  # realign.old_pairs_per_new=0
    # Rejected on its merits: it draws fewer sketches than v1 and loses the paired style comparison.
    win = record["comparison"]["scorers"]["style"]["win_rate"]["candidate"]
    share = record["comparison"]["style"]["share"]
    print(json.dumps({"win": win, "share": share}))
    assert win["value"] < 0.5 and win["losses"] > win["wins"], win
    assert share["candidate"]["value"] < share["promoted"]["value"], share
