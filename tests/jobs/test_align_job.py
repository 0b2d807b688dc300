"""The README's main command, as a user runs it: `python jobs/align.py`, here shrunk by --set overrides."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import UNet2DConditionModel

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


def test_align_job_runs_end_to_end_and_resumes(tmp_path):
    args = [
        sys.executable, "jobs/align.py",
        "--set", f"cluster.storage_path={tmp_path}",
        "--set", "cluster.ray_address=local",  # its own Ray, whatever else runs on this machine
        "--set", "data.toy_pairs=12", "--set", "data.toy_resolution=32", "--set", "precompute.resolution=32",
        "--set", "model.tiny_fit_steps=10",  # the fit runs, briefly
        "--set", "train.max_steps=2", "--set", "train.checkpoint_every=1", "--set", "train.batch_size_per_worker=2",
        "--set", "generate.num_prompts=2", "--set", "generate.seeds=[0]", "--set", "generate.num_inference_steps=2",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    first = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "precompute: " in first.stdout and "[align] model: " in first.stdout
    model = tmp_path / "toy" / "model"
    UNet2DConditionModel.from_pretrained(model)  # plain diffusers loads what the job wrote
    assert json.loads((model / "final_metrics.json").read_text())["step"] == 2
    report = tmp_path / "toy" / "report" / "index.html"
    assert first.stdout.strip().splitlines()[-1] == f"[align] report: {report}"  # the report's path comes last
    shown = json.loads((report.parent / "report.json").read_text())
    assert shown["comparison"]["models"] == ["base", "aligned"]
    assert set(shown["comparison"]["scorers"]) == {"style", "clip"}  # the default scorers
    assert "[evaluate] style: mean base" in first.stdout

    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing new" in again.stdout  # the store was complete: nothing re-encoded
    assert again.stdout.strip().splitlines()[-1] == f"[align] report: {report}"


def test_bad_override_is_a_clear_error():
    run = subprocess.run([sys.executable, "jobs/align.py", "--set", "loss.objective=ppo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "config key 'loss.objective': 'ppo' is not one of ['rpo', 'dpo', 'sft']" in run.stderr
