"""A sweep on the tiny SDXL and a 40-pair toy store at 32 px, one trial at a time (a 1-CPU driver + one 0.5-CPU
worker) on this 2-core machine. One sweep serves every check, to keep the suite short:

    train.lr   1e-12   finishes (policy == reference within ties: holdout accuracy stays at 0.5)
               1e+30   fails: the first Adam step makes the weights ~1e30, the next loss is not finite
               1e-11   finishes (as the first)
               1e-3    stopped by ASHA at step 2: from random weights training lowers the holdout accuracy
                       (measured 0.39 at step 2 with seed 0) below the 0.5 recorded there by the trial before it

The first run is a `jobs/sweep.py` process interrupted (SIGINT, as Ctrl-C) once its first trial has finished;
the test then runs the same sweep again in-process, which resumes it. Tune does not save ASHA's state, so the
stopping is decided among the trials of the resumed run (trials 3 and 4).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.precompute import run_precompute
from pipeline.tune.run import check_sweep, run_sweep
from pipeline.tune.space import samples_and_trials

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
SETTINGS = [
    "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0", "precompute.resolution=32", "data.toy_pairs=40",
    "data.toy_resolution=32",
    "data.holdout_fraction=0.2", "train.num_workers=1", "train.worker_num_cpus=0.5", "train.batch_size_per_worker=2",
    "loss.beta=500", f"train.max_steps={MAX_STEPS}", "train.log_every=2", f"train.checkpoint_every={MAX_STEPS}",
    "evaluate.every_steps=2", "tune.grace_period=2", "tune.scheduler=asha", "tune.metric=holdout_accuracy",
    "tune.search_space={train.lr: [1.0e-12, 1.0e+30, 1.0e-11, 1.0e-3]}",
    # the best trial's evaluation, as small as it goes
    "generate.num_prompts=2", "generate.seeds=[0]", "generate.num_inference_steps=2", "evaluate.scorers=[style]",
    "evaluate.bootstrap_resamples=100", "evaluate.grid_prompts=1",
]


def test_search_space_values_the_config_refuses_stop_the_sweep_before_it_starts():
    with pytest.raises(ConfigError, match=r"'loss.tau'.*value -0.1 would be refused.*loss.tau"):
        load_config(None, ["tune.search_space={loss.tau: [0.1, -0.1]}"])
    with pytest.raises(ConfigError, match=r"'loss.beta'.*loguniform needs low > 0"):
        load_config(None, ["tune.search_space={loss.beta: {loguniform: [0, 10]}}"])
    with pytest.raises(ConfigError, match=r"'train.max_steps'.*use a grid"):
        load_config(None, ["tune.search_space={train.max_steps: {uniform: [1, 9]}}"])
    with pytest.raises(ConfigError, match=r"'precompute.resolution'.*loss and train only"):
        load_config(None, ["tune.search_space={precompute.resolution: [32, 64]}"])
    with pytest.raises(ConfigError, match="unknown config key 'loss.betta'"):
        load_config(None, ["tune.search_space={loss.betta: [1]}"])
    cfg = load_config(None, ["tune.search_space={loss.alpha: {uniform: [0.0, 1.0]}}", "train.max_steps=20"])
    with pytest.raises(ConfigError, match="evaluate.every_steps"):
        check_sweep(cfg)  # ASHA would never see the holdout metric before its first rung


def test_trial_count_crosses_the_grid_with_the_draws_of_the_random_dimensions():
    grid = {"loss.beta": [1, 2], "loss.tau": {"grid": [0.1, 0.2, 0.3]}}
    assert samples_and_trials(grid, 4) == (1, 6)  # nothing to draw: each grid point once
    assert samples_and_trials({**grid, "loss.alpha": {"uniform": [0.0, 1.0]}}, 4) == (4, 24)
    assert samples_and_trials({"train.lr": {"loguniform": [1e-6, 1e-4]}}, 3) == (3, 3)


def _store_files(store: Path) -> dict[str, float]:
    return {str(p.relative_to(store)): p.stat().st_mtime for p in store.rglob("*") if p.is_file()}


def _run_first_trial_then_interrupt(storage: Path, sweep: Path) -> None:
    args = [sys.executable, str(ROOT / "jobs" / "sweep.py"), "--set", f"cluster.storage_path={storage}",
            "--set", "name=toy"] + [a for s in SETTINGS for a in ("--set", s)]
    log = open(storage / "first_run.log", "w")
    process = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 420
    try:
        while not list(sweep.glob("trials/*/model/final_metrics.json")):
            assert process.poll() is None, f"the sweep ended early: {(storage / 'first_run.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the first trial did not finish in time"
            time.sleep(1)
        process.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment's state and exits
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    said = (storage / "first_run.log").read_text()
    # interrupted, not finished: it says so, evaluates nothing and exits as after Ctrl-C
    assert process.returncode == 130 and "trials unfinished; run the same command again" in said, said[-3000:]
    assert "[sweep] best trial" not in said


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_session):
    storage = tmp_path_factory.mktemp("sweeps")
    cfg = load_config(None, [f"cluster.storage_path={storage}", "name=toy", *SETTINGS])
    run_precompute(cfg)
    store = Path(cfg.store_uri)
    before = (json.loads((store / "manifest.json").read_text()), _store_files(store))
    sweep_dir = storage / "toy" / "sweep"
    _run_first_trial_then_interrupt(storage, sweep_dir)
    first = {p.parent.parent.name: p.stat().st_mtime for p in sweep_dir.glob("trials/*/train/metrics.jsonl")}
    result = run_sweep(cfg)  # the same sweep again: resumes
    return cfg, result, first, before, store


def test_sweep_resumes_stops_the_worse_trial_fails_one_alone_and_reports_the_best(sweep):
    cfg, result, first, before, store = sweep
    rows = sorted(result.trials, key=lambda r: r["trial_id"])
    assert [r["config"]["train.lr"] for r in rows] == [1e-12, 1e30, 1e-11, 1e-3]
    assert [r["status"] for r in rows] == ["finished", "failed", "finished", "stopped"], rows
    # resumed: the trial finished before the interruption was not run again
    done_first = [r["trial_id"] for r in rows if r["trial_id"] in first]
    assert done_first and rows[0]["trial_id"] in done_first
    metrics_file = Path(result.sweep_uri) / "trials" / rows[0]["trial_id"] / "train" / "metrics.jsonl"
    assert metrics_file.stat().st_mtime == first[rows[0]["trial_id"]]
    # ASHA stopped the worse trial at its first rung, before train.max_steps
    assert rows[3]["last_step"] < MAX_STEPS and rows[3]["metric"] < 0.5, rows[3]
    assert rows[0]["last_step"] == rows[2]["last_step"] == MAX_STEPS
    # the impossible setting failed alone, with its reason
    assert "non-finite loss" in rows[1]["error"], rows[1]
    # the best finished trial was evaluated and reported
    assert result.best["trial_id"] == rows[0]["trial_id"] and result.best["metric"] == pytest.approx(0.5)
    summary = json.loads((Path(result.sweep_uri) / "sweep.json").read_text())
    assert summary["best"] == rows[0]["trial_id"] and len(summary["trials"]) == 4
    assert Path(summary["plot"]).stat().st_size > 0
    report = Path(result.report_path)
    assert report.exists() and rows[3]["trial_id"] in report.read_text()
    # a sweep encodes nothing: the store is as the precompute left it
    assert json.loads((store / "manifest.json").read_text()) == before[0]
    assert _store_files(store) == before[1]
