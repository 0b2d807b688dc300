"""End to end: preference table -> feature store -> RPO fine-tuning -> generation -> scoring -> report.

On a laptop (starts a local Ray; the embedded default is the toy world and a tiny SDXL, no downloads):
    python jobs/align.py
On one box with a running head:
    ray start --head && python jobs/align.py --config jobs/configs/toy.yaml
On a GPU cluster:
    ray job submit --working-dir . -- python jobs/align.py --config jobs/configs/sdxl_pickapic.yaml \
        --set data.source=s3://bucket/pickapic --set cluster.storage_path=s3://bucket/runs
Running the same command again resumes: finished stages are skipped, training continues from its last checkpoint.
The last line printed is the report's path (<run>/report/index.html): base vs aligned on fixed prompts and seeds.
"""

from pipeline.cli import init_ray, parse
from pipeline.preflight.run import require_preflight
from pipeline.evaluate.compare import summary_lines
from pipeline.evaluate.run import evaluate_models
from pipeline.precompute import format_summary, run_precompute
from pipeline.train.run import run_training


def main() -> None:
    cfg = parse(__doc__.splitlines()[0])
    require_preflight(cfg, job="align")  # the offline checks: a failure prints the table and exits (2)
    init_ray(cfg)
    summary = run_precompute(cfg)
    print(format_summary(summary))
    cfg.precompute.store = summary["store_uri"]  # precompute.on_mismatch=new_store may have chosen a new store
    result = run_training(cfg)
    shown = {k: float(f"{v:.4g}") for k, v in result.metrics.items() if isinstance(v, float)}
    print(f"[align] final metrics: {shown}")
    if "holdout_accuracy" in result.metrics and "start_holdout_accuracy" in result.metrics:
        m = result.metrics
        print(f"[align] held-apart pairs, implicit accuracy {m['start_holdout_accuracy']:.3f} -> "
              f"{m['holdout_accuracy']:.3f} (reward margin {m['holdout_margin']:+.3f})")
    print(f"[align] model: {result.model_uri}")
    judged = evaluate_models(cfg, {"base": "base", "aligned": result.model_uri}, out_dir=cfg.run_dir, baseline="base",
                             info={"final_metrics": result.metrics})
    print("\n".join(summary_lines(judged.comparison)))
    print(f"[align] report: {judged.report_path}")


if __name__ == "__main__":
    main()
