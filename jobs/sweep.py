"""Sweep RPO's knobs on Ray Tune, one Ray Train run per trial, ASHA stopping the laggards; the best trial is
generated, scored and reported.

    python jobs/sweep.py --config jobs/configs/sweep_toy.yaml
    python jobs/sweep.py --config jobs/configs/toy.yaml --set evaluate.every_steps=10 \
        --set 'tune.search_space={loss.beta: [1000, 5000], loss.tau: {loguniform: [0.02, 0.5]}}' --set tune.num_samples=4
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sdxl_pickapic.yaml \
        --set 'tune.search_space={loss.beta: [2000, 5000], loss.alpha: [0.5, 1.0]}' --set tune.max_concurrent_trials=2
Run the same command again to resume the sweep (finished trials are not re-run). Prints one line per trial, the best
trial and the report's path.
"""

from pipeline.cli import init_ray, parse
from pipeline.preflight.run import require_preflight
from pipeline.tune.run import run_sweep


def main() -> None:
    cfg = parse(__doc__.splitlines()[0])
    require_preflight(cfg, job="sweep")  # the offline checks: a failure prints the table and exits (2)
    init_ray(cfg)
    result = run_sweep(cfg)
    if result.interrupted:
        raise SystemExit(130)  # as after Ctrl-C; run_sweep said how to resume
    if result.best is None:
        print(f"[sweep] no trial finished; see {result.sweep_uri}/sweep.json for each trial's reason")
        raise SystemExit(1)
    print(f"[sweep] best trial: {result.best['trial_id']} {result.best['config']} "
          f"{cfg.tune.metric}={result.best['metric']:.4g}")
    print(f"[sweep] report: {result.report_path}")


if __name__ == "__main__":
    main()
