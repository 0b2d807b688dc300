"""A sweep: Ray Tune over a driver function that fits one Ray Train run per trial, ASHA on the holdout metric, then
the best trial generated, scored and reported.

    result = run_sweep(cfg)          # cfg.tune.search_space = {"loss.beta": [1000, 5000], ...}
    result.best["trial_id"], result.report_path

Layout under ``<storage>/<name>/<tune.name>`` (the sweep folder): Tune's experiment state, ``trials/<trial id>/``
(each trial's run folder: ``train/`` and ``model/``, as a training run's), ``sweep.json`` (every trial's settings,
last metric, status), ``sweep_metric.png`` and the best trial's ``generate/``, ``evaluate/``, ``report/``.

Ray Train V2 no longer runs as a Tune trainable (``Tuner(trainer)``); the supported pattern is a Tune function
that builds and fits a ``TorchTrainer`` with ``TuneReportCallback``, so the trial's Train reports reach Tune.
The trial function only drives: its workers ask for their own resources (train.num_workers x
train.worker_num_cpus / GPU), and a trial that ASHA stops takes its Train run (and so its workers) with it.
Running the same command again restores the sweep (``Tuner.restore``): finished and failed trials stay as they
are, unfinished ones run again, resuming their Train run from its newest checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import AlignConfig, join_uri
from pipeline.storage import absolute, exists, write_text
from pipeline.tune.space import samples_and_trials, tune_param_space, with_values

TRIALS_FOLDER = "trials"
DRIVER_NUM_CPUS = 1.0  # the trial's own process, beside its Train workers (it never trains itself)


@dataclass
class SweepResult:
    sweep_uri: str
    trials: list[dict[str, Any]]  # one row per trial, see trial_row
    best: dict[str, Any] | None  # the best finished trial's row (None when no trial finished)
    report_path: str | None  # the best trial's report (None without evaluation)
    interrupted: bool = False  # stopped (Ctrl-C) before every trial ended: run the same command again to resume


def sweep_uri(cfg: AlignConfig) -> str:
    return join_uri(cfg.run_dir, cfg.tune.name)


def trial_config(base: dict[str, Any], params: dict[str, Any], *, trial_id: str, sweep: str, store_uri: str,
                 model_path: str) -> AlignConfig:
    """The config of one trial: the sweep's config with the trial's values, its own run folder under the sweep
    (so no trial overwrites another's checkpoints or model), the one feature store and the one base model."""
    return AlignConfig.from_dict(with_values(base, {
        **params,
        "name": trial_id,
        "cluster.storage_path": join_uri(sweep, TRIALS_FOLDER),
        "precompute.store": store_uri,
        "model.pretrained": model_path,
        "tune.search_space": {},
    }))


def run_trial(params: dict[str, Any], *, base: dict[str, Any], sweep: str, store_uri: str, model_path: str) -> None:
    """Tune's function trainable: fit this trial's TorchTrainer; its reports reach Tune through the callback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.run import run_training

    cfg = trial_config(base, params, trial_id=tune.get_context().get_trial_id(), sweep=sweep, store_uri=store_uri,
                       model_path=model_path)
    run_training(cfg, callbacks=[TuneReportCallback()])


def scheduler(cfg: AlignConfig):
    """ASHA on the sweep metric with optimizer steps as time, or None (FIFO: every trial runs to the end).

    Its last rung lies below train.max_steps and trials reaching max_steps are not stopped there: a stop at the last
    report would kill the trial while it writes its model.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler

    t = cfg.tune
    if t.scheduler == "fifo":
        return None
    return AsyncHyperBandScheduler(
        time_attr="step", metric=t.metric, mode=t.mode, max_t=cfg.train.max_steps - 1,
        grace_period=t.grace_period, reduction_factor=t.reduction_factor, stop_last_trials=False,
    )


def check_sweep(cfg: AlignConfig) -> None:
    """What the config alone cannot see: a sweep needs a space, and ASHA needs its metric while trials run."""
    from pipeline.config import ConfigError

    t = cfg.tune
    if not t.search_space:
        raise ConfigError("config key 'tune.search_space' is empty: name the keys to sweep, e.g. "
                          "--set 'tune.search_space={loss.beta: [1000, 5000]}' (README \"Sweeps\")")
    if t.scheduler == "asha":
        if t.grace_period >= cfg.train.max_steps:
            raise ConfigError(f"config key 'tune.grace_period': {t.grace_period} leaves ASHA no rung before "
                              f"train.max_steps={cfg.train.max_steps}; lower it or use tune.scheduler=fifo")
        if t.metric.startswith("holdout_") and not 0 < cfg.evaluate.every_steps <= t.grace_period:
            raise ConfigError(f"config key 'evaluate.every_steps': {cfg.evaluate.every_steps} does not report "
                              f"{t.metric} by ASHA's first rung (tune.grace_period={t.grace_period}); set it to a "
                              f"divisor of the grace period, e.g. --set evaluate.every_steps={t.grace_period}")


def build_tuner(cfg: AlignConfig, *, store_uri: str, model_path: str):
    """A new Tuner, or the one restored from the sweep folder when this sweep ran before."""
    from ray import tune

    base = cfg.to_dict()
    path = absolute(sweep_uri(cfg))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=base, sweep=path, store_uri=store_uri, model_path=model_path),
        {"cpu": DRIVER_NUM_CPUS},
    )
    if tune.Tuner.can_restore(path):
        print(f"[sweep] resuming {path}: finished and failed trials are kept, unfinished ones run again", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    t = cfg.tune
    num_samples, _ = samples_and_trials(t.search_space, t.num_samples)
    return tune.Tuner(
        trainable,
        param_space=tune_param_space(t.search_space),
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=t.max_concurrent_trials,
                                    scheduler=scheduler(cfg)),
        run_config=tune.RunConfig(name=t.name, storage_path=absolute(cfg.run_dir),
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def failure_reason(error: BaseException | None) -> str | None:
    """The line of a trial's error that says what went wrong (the worker's exception), not the whole traceback."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (named[-1] if named else lines[-1] if lines else type(error).__name__)[:400]


def trial_row(result, cfg: AlignConfig, trial_cfg: AlignConfig | None) -> dict[str, Any]:
    """trial_id, config (its swept values), metric (last reported), last_step, status (finished | stopped |
    failed), stopped_early, error, model (its model folder when it finished), beta and tau (for the plot)."""
    metrics = dict(result.metrics or {})
    params = {k: v for k, v in (result.config or metrics.get("config") or {}).items() if k in cfg.tune.search_space}
    last_step = metrics.get("step")
    reason = failure_reason(result.error)
    model = join_uri(trial_cfg.run_dir, "model") if trial_cfg is not None else None
    finished = (reason is None and last_step == cfg.train.max_steps and model is not None
                and exists(join_uri(model, "final_metrics.json")))  # written once the model is complete
    status = "failed" if reason is not None else "finished" if finished else "stopped"
    value = metrics.get(cfg.tune.metric)
    return {
        "trial_id": metrics["trial_id"], "config": params,
        "metric": float(value) if isinstance(value, (int, float)) else None,
        "last_step": last_step, "status": status, "stopped_early": status == "stopped", "error": reason,
        "model": model if finished else None,
        "beta": trial_cfg.loss.beta if trial_cfg else None, "tau": trial_cfg.loss.tau if trial_cfg else None,
    }


def unfinished_trials(grid, expected: int) -> int:
    """How many of the sweep's `expected` trials have not ended. Tune returns from fit on SIGINT with its state
    saved; trials it had not created yet are missing from the grid, and created ones are neither terminated nor
    errored."""
    trials = grid._experiment_analysis.trials  # the Trial objects; a Result carries no status
    ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
    return max(expected - ended, len(trials) - ended)


def best_trial(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The finished trial with the best last metric (ties: the first); stopped and failed trials have no model."""
    done = [r for r in rows if r["status"] == "finished" and r["metric"] is not None]
    if not done:
        return None
    pick = max if mode == "max" else min
    return pick(done, key=lambda r: r["metric"])


def run_sweep(cfg: AlignConfig, *, evaluate: bool = True) -> SweepResult:
    """Precompute once, sweep, record every trial, evaluate and report the best (see the module doc)."""
    import ray

    from pipeline.precompute import resolve_model_path, run_precompute
    from pipeline.tune.plot import plot_sweep

    check_sweep(cfg)
    if not ray.is_initialized():
        ray.init(address=cfg.cluster.ray_address)
    store_uri = run_precompute(cfg)["store_uri"]  # nothing new to encode when the store is up to date
    model_path = resolve_model_path(cfg)
    sweep = absolute(sweep_uri(cfg))
    grid = build_tuner(cfg, store_uri=store_uri, model_path=model_path).fit()

    rows = []
    for result in grid:
        trial_id = (result.metrics or {})["trial_id"]
        params = {k: v for k, v in (result.config or {}).items() if k in cfg.tune.search_space}
        trial_cfg = trial_config(cfg.to_dict(), params, trial_id=trial_id, sweep=sweep, store_uri=store_uri,
                                 model_path=model_path)
        rows.append(trial_row(result, cfg, trial_cfg))
    unfinished = unfinished_trials(grid, samples_and_trials(cfg.tune.search_space, cfg.tune.num_samples)[1])
    best = best_trial(rows, cfg.tune.mode)
    section = {"metric": cfg.tune.metric, "mode": cfg.tune.mode, "best": best["trial_id"] if best else None,
               "trials": rows, "plot": plot_sweep(rows, cfg.tune.metric, f"{sweep}/sweep_metric.png")}
    write_text(join_uri(sweep, "sweep.json"), json.dumps(section, indent=1))
    for row in rows:
        print(f"[sweep] {row['trial_id']} {row['status']} at step {row['last_step']}: {cfg.tune.metric}="
              f"{row['metric']} {row['config']}" + (f" ({row['error']})" if row["error"] else ""), flush=True)
    if unfinished:  # Ctrl-C: Tune saved the sweep's state and returned; the best trial is not known yet
        print(f"[sweep] interrupted with {unfinished} trials unfinished; run the same command again to resume",
              flush=True)
        return SweepResult(sweep, rows, None, None, interrupted=True)
    if best is None or not evaluate:
        return SweepResult(sweep, rows, best, None)
    from pipeline.evaluate.run import evaluate_models

    best_cfg = trial_config(cfg.to_dict(), best["config"], trial_id=best["trial_id"], sweep=sweep,
                            store_uri=store_uri, model_path=model_path)
    evaluation = evaluate_models(best_cfg, {"base": "base", "best": best["model"]}, out_dir=sweep, baseline="base",
                                 info={"sweep": cfg.tune.name, "best_trial": best["trial_id"]}, sweep=section)
    return SweepResult(sweep, rows, best, evaluation.report_path)
