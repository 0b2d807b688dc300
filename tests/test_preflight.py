"""The preflight (pipeline/preflight/): every shipped config passes offline, and each failure class gives the line a
user reads, with its fix."""

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.toy import make_toy_world
from pipeline.preflight.checks import FAIL, SKIP
from pipeline.preflight.run import format_table, run_preflight, this_machine

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))


def failed(rows):
    return [r for r in rows if r.status == FAIL]


def config(tmp_path, *overrides, path=None):
    return load_config(path, [f"cluster.storage_path={tmp_path / 'runs'}", *overrides])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_passes_offline(path, tmp_path):
    job = "realign" if path.name.startswith("realign") else "sweep" if path.name.startswith("sweep") else "align"
    rows = run_preflight(config(tmp_path, path=path), job=job, offline=True)
    assert not failed(rows), format_table(rows)
    assert {r.stage for r in rows} >= {"model", "scorers", "resources", "storage", "semantics"}
    assert not (tmp_path / "runs").exists()  # the storage probe leaves nothing behind


def test_the_production_config_builds_the_real_architectures_offline(tmp_path):
    rows = run_preflight(config(tmp_path, path=ROOT / "jobs/configs/sdxl_pickapic.yaml"), offline=True)
    table = format_table(rows)
    assert "2,567,463,684 parameters" in table  # SDXL's UNet, built on the meta device from the shipped config
    assert "GiB GPU memory a worker" in table
    assert any(r.status == SKIP and r.stage == "data" for r in rows)  # s3:// is not read offline


def test_bad_rows_in_a_sample_are_counted_by_reason(tmp_path):
    table = pq.read_table(make_toy_world(tmp_path / "world", n_pairs=8, resolution=32))
    jpg = table.column("jpg_0").to_pylist()
    jpg[:3] = [b"not an image"] * 3
    table = table.set_column(table.schema.get_field_index("jpg_0"), "jpg_0", pa.array(jpg, pa.binary()))
    pq.write_table(table, tmp_path / "bad.parquet")
    rows = run_preflight(config(tmp_path, f"data.source={tmp_path / 'bad.parquet'}", "model.pretrained=tiny"),
                         offline=True)
    data = [r for r in rows if r.stage == "data"][0]
    assert data.status == "OK" and "3 would be quarantined (undecodable_image: 3)" in data.found


def test_a_missing_source_and_an_all_bad_table_fail_with_their_fix(tmp_path):
    rows = run_preflight(config(tmp_path, f"data.source={tmp_path / 'nope.parquet'}", "model.pretrained=tiny"),
                         offline=True)
    data = [r for r in rows if r.stage == "data"][0]
    assert data.status == FAIL and "nope.parquet does not exist" in data.found and "data.source" in data.fix
    pq.write_table(pa.table({"caption": ["a"], "label_0": [1.0]}), tmp_path / "cols.parquet")
    rows = run_preflight(config(tmp_path, f"data.source={tmp_path / 'cols.parquet'}", "model.pretrained=tiny"),
                         offline=True)
    data = [r for r in rows if r.stage == "data"][0]
    assert data.status == FAIL and "missing_column" in data.found and "jpg_0/jpg_1" in data.fix


def test_a_training_worker_that_cannot_fit_its_gpu_names_the_settings(tmp_path):
    cfg = config(tmp_path, "train.batch_size_per_worker=8", "train.gradient_checkpointing=false",
                 path=ROOT / "jobs/configs/sdxl_pickapic.yaml")
    rows = run_preflight(cfg, offline=True, gpu_memory_gib=80)
    memory = [r for r in rows if "GPU memory a worker" in r.needs][0]
    assert memory.status == FAIL and "train.gradient_checkpointing=true" in memory.fix
    assert "train.mode=lora" in memory.fix
    lora = config(tmp_path, "train.mode=lora", "train.batch_size_per_worker=1", path=ROOT / "jobs/configs/sdxl_pickapic.yaml")
    assert not failed(run_preflight(lora, offline=True, gpu_memory_gib=80))


def test_actors_asking_more_than_this_machine_fail(tmp_path):
    here = {"cluster": this_machine(), "where": "this machine"}
    rows = run_preflight(config(tmp_path, "precompute.num_encoder_actors=64", "model.pretrained=tiny"), offline=True,
                         **here)
    bad = failed(rows)
    assert len(bad) == 1 and bad[0].stage == "resources" and bad[0].needs.startswith("precompute: 32 CPU")
    assert "precompute.num_encoder_actors" in bad[0].fix
    gpus = run_preflight(config(tmp_path, "train.use_gpu=true", "generate.actor_num_gpus=1",
                                "evaluate.actor_num_gpus=1", "model.pretrained=tiny"), offline=True, **here)
    assert any(r.needs.startswith("train: 1 CPU, 1 GPU") and r.status == FAIL for r in gpus)  # no GPU here
    unknown = run_preflight(config(tmp_path, "precompute.num_encoder_actors=64", "model.pretrained=tiny"), offline=True)
    assert all(r.status == SKIP for r in unknown if r.stage == "resources")  # offline, the cluster is not known


def test_storage_that_cannot_be_written_fails(tmp_path):
    (tmp_path / "a-file").write_text("x")
    rows = run_preflight(load_config(None, [f"cluster.storage_path={tmp_path / 'a-file'}"]), offline=True)
    storage = [r for r in rows if r.stage == "storage"]
    assert storage and all(r.status == FAIL for r in storage) and "cluster.storage_path" in storage[0].fix


def test_contradicting_settings_are_named(tmp_path):
    rows = run_preflight(config(tmp_path, "train.use_gpu=true", "model.pretrained=tiny"), offline=True)
    assert any("generate.actor_num_gpus=0" in r.found and r.status == FAIL for r in rows)
    realign = run_preflight(config(tmp_path, "realign.gate_scorer=clip", "evaluate.scorers=[style]"), job="realign",
                            offline=True)
    assert any("realign.gate_scorer='clip' is not in evaluate.scorers" in r.found for r in failed(realign))
    sweep = run_preflight(config(tmp_path), job="sweep", offline=True)
    assert any("tune.search_space is empty" in r.found for r in failed(sweep))


def test_the_job_prints_the_table_and_exits_non_zero(tmp_path):
    run = subprocess.run([sys.executable, "jobs/preflight.py", "--offline", "--set", f"cluster.storage_path={tmp_path}",
                          "--set", f"data.source={tmp_path / 'missing'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    text = " ".join(run.stdout.split())  # long findings wrap across lines
    assert "FAIL" in text and "missing does not exist" in text
    assert run.stdout.strip().splitlines()[-1].startswith("[preflight] 12 checks: 1 failed")


def test_align_stops_on_a_failed_preflight_before_any_ray_work(tmp_path):
    run = subprocess.run([sys.executable, "jobs/align.py", "--set", f"cluster.storage_path={tmp_path}",
                          "--set", f"data.source={tmp_path / 'missing'}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "[preflight]" in run.stdout and "missing does not exist" in " ".join(run.stdout.split())
    assert "Started a local Ray instance" not in run.stdout + run.stderr


def test_a_folder_whose_unet_weights_do_not_fit_fails_naming_the_file(tmp_path):
    import shutil

    from pipeline.models.tiny import build_tiny_sd15, build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path / "sdxl")
    sd15 = build_tiny_sd15(tmp_path / "sd15")
    weights = "unet/diffusion_pytorch_model.safetensors"
    shutil.copyfile(sd15 / weights, folder / weights)
    rows = run_preflight(config(tmp_path, f"model.pretrained={folder}", "data.source=toy"), offline=True)
    bad = [r for r in failed(rows) if r.stage == "model"]
    assert bad and bad[0].needs.startswith("unet") and "diffusion_pytorch_model.safetensors" in bad[0].found, \
        format_table(rows)


def test_a_missing_scorer_file_fails_before_any_image(tmp_path):
    rows = run_preflight(config(tmp_path, "model.pretrained=tiny", "evaluate.scorers=[clip, aesthetic]",
                                f"evaluate.aesthetic.weights={tmp_path / 'head.pth'}"), offline=True)
    bad = failed(rows)
    assert len(bad) == 1 and bad[0].stage == "scorers" and bad[0].needs == "aesthetic", format_table(rows)
    assert "head.pth" in bad[0].found and "evaluate.aesthetic.weights" in bad[0].fix + bad[0].found
