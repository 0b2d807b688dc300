"""Encode a preference table into the feature store: VAE latents, text and CLIP embeddings, on Ray Data actors.

On a laptop (starts a local Ray; the defaults are the toy world and a tiny SDXL, no downloads):
    python jobs/precompute.py
On one box with a running head:
    ray start --head && python jobs/precompute.py --config jobs/configs/toy.yaml
On a GPU cluster:
    ray job submit --working-dir . -- python jobs/precompute.py --config jobs/configs/toy.yaml
    ray job submit --working-dir . -- python jobs/precompute.py --config jobs/configs/sdxl_pickapic.yaml \
        --set data.source=/data/pickapic_v2 --set cluster.storage_path=s3://your-bucket/runs
Running it again encodes only the rows the store does not hold yet; a store made with other models or settings
is refused (or, with --set precompute.on_mismatch=new_store, left alone for a new sibling store).
"""

from pipeline.cli import init_ray, parse
from pipeline.precompute import format_summary, run_precompute


def main() -> None:
    cfg = parse(__doc__.splitlines()[0])
    init_ray(cfg)
    summary = run_precompute(cfg)  # Ray Data shows each pipeline's progress as it runs
    print(format_summary(summary))
    print(f"[precompute] feature store: {summary['store_uri']}")


if __name__ == "__main__":
    main()
