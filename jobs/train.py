"""Fine-tune on an existing feature store (made by jobs/precompute.py): Ray Train workers running DeepSpeed ZeRO.

    python jobs/train.py --config jobs/configs/toy.yaml
    python jobs/train.py --set loss.objective=dpo --set train.zero_stage=3 --set train.num_workers=2
    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/sdxl_pickapic.yaml
Run the same command again to resume from the newest checkpoint (same cluster.storage_path and name).
"""

from pipeline.cli import init_ray, parse
from pipeline.train.run import run_training


def main() -> None:
    cfg = parse(__doc__.splitlines()[0])
    init_ray(cfg)
    result = run_training(cfg)
    print(f"[train] final metrics: { {k: v for k, v in result.metrics.items()} }")
    print(f"[train] model: {result.model_uri}")


if __name__ == "__main__":
    main()
