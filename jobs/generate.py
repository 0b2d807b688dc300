"""Generate images for fixed prompts and seeds from the base model and trained ones (Ray Data batch inference).

    python jobs/generate.py                                     # base + <run>/model of the embedded default
    python jobs/generate.py --config jobs/configs/toy.yaml --model base=base --model dpo=runs/toy-dpo/model
    ray job submit --working-dir . -- python jobs/generate.py --config jobs/configs/sdxl_pickapic.yaml \
        --set generate.prompts=/data/prompts.txt --set generate.actor_num_gpus=1 --set generate.num_actors=8
Writes <run>/generate/<tag>/*.png and index.parquet; the same (prompt, seed) starts from the same noise for every model.
"""

from pipeline.cli import init_ray, parse
from pipeline.config import join_uri
from pipeline.generate.run import run_generation


def main() -> None:
    cfg, models = parse(__doc__.splitlines()[0], with_models=True)
    init_ray(cfg)
    result = run_generation(cfg, models, out_dir=join_uri(cfg.run_dir, "generate"))
    done = "reused (same prompts, settings and model files)" if result.reused else "generated"
    print(f"[generate] {result.index.num_rows} images of {', '.join(models)} {done}")
    print(f"[generate] index: {result.index_uri}")


if __name__ == "__main__":
    main()
