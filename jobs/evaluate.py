"""Judge models: generate paired images (reused when unchanged), score them with evaluate.scorers, compare with
the base, write the report.

    python jobs/evaluate.py                                      # base vs <run>/model of the embedded default
    python jobs/evaluate.py --model base=base --model rpo=runs/toy/model --model dpo=runs/toy-dpo/model
    python jobs/evaluate.py --config jobs/configs/sdxl_pickapic.yaml --set evaluate.scorers=[pickscore,hpsv2] \
        --set evaluate.pickscore.weights=/models/PickScore_v1 --set evaluate.hpsv2.weights=/models/HPS_v2.1_compressed.pt
Prints one line per scorer, then the report's path.
"""

from pipeline.cli import init_ray, parse
from pipeline.evaluate.compare import summary_lines
from pipeline.evaluate.run import evaluate_models


def main() -> None:
    cfg, models = parse(__doc__.splitlines()[0], with_models=True)
    init_ray(cfg)
    baseline = "base" if "base" in models else next(iter(models))
    result = evaluate_models(cfg, models, out_dir=cfg.run_dir, baseline=baseline)
    print("\n".join(summary_lines(result.comparison)))
    print(f"[evaluate] report: {result.report_path}")


if __name__ == "__main__":
    main()
