"""Images/s for generation and for each scorer against the number of actors (1, 2), on the tiny models.

    .venv/bin/python bench/generate.py [--prompts 8] [--seeds 2] [--steps 10] [--resolution 64] [--out bench/results/generate.json]

Generation: the tiny SDXL-shaped pipeline (random weights), prompts x seeds images of one model. Scoring: each scorer
on its tiny random-weight twin (`save_tiny_twin`) over the same images. Times are wall-clock seconds of the whole
Ray Data pipeline, actor start-up (imports, model load) included, so they are what a job waits for; the `warm`
column is a second run whose actors start again but find the OS file cache warm.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--scorers", nargs="+", default=None, help="default: every scorer")
    parser.add_argument("--out", default="bench/results/generate.json")
    args = parser.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.evaluate.names import SCORER_NAMES
    from pipeline.evaluate.run import run_scoring
    from pipeline.evaluate.scorers import save_tiny_twin
    from pipeline.generate.run import run_generation

    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    seeds = list(range(args.seeds))
    base = [
        f"cluster.storage_path={work}", "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0",
        f"precompute.resolution={args.resolution}",
        f"generate.num_prompts={args.prompts}", f"generate.seeds={seeds}", f"generate.num_inference_steps={args.steps}",
    ]
    n_images = args.prompts * args.seeds
    rows = []
    index = None
    for actors in args.actors:
        cfg = load_config(None, base + [f"generate.num_actors={actors}", "generate.actor_num_cpus=0.5"])
        cfg.data.source = "toy"
        times = []
        for attempt in range(2):
            started = time.perf_counter()
            result = run_generation(cfg, {"base": "base"}, out_dir=str(work / f"gen_{actors}_{attempt}"))
            times.append(time.perf_counter() - started)
            index = result
        rows.append({"stage": "generate", "actors": actors, "images": n_images, "seconds": times[0],
                     "warm_seconds": times[1], "images_per_s": n_images / times[1]})
        print(rows[-1], flush=True)

    for name in args.scorers or list(SCORER_NAMES):
        options = [] if name == "style" else [
            f"evaluate.{name}.{key}={value}" for key, value in save_tiny_twin(name, work / f"twin_{name}").items()
            if value is not None
        ]
        for actors in args.actors:
            cfg = load_config(None, base + options + [f"evaluate.scorers=[{name}]", f"evaluate.num_actors={actors}"])
            times = []
            for _ in range(2):
                started = time.perf_counter()
                run_scoring(cfg, index.index, index.out_dir)
                times.append(time.perf_counter() - started)
            rows.append({"stage": f"score {name}", "actors": actors, "images": n_images, "seconds": times[0],
                         "warm_seconds": times[1], "images_per_s": n_images / times[1]})
            print(rows[-1], flush=True)

    print(f"\n{'stage':<20} {'actors':>6} {'images':>6} {'first s':>8} {'warm s':>7} {'images/s':>9}")
    for r in rows:
        print(f"{r['stage']:<20} {r['actors']:>6} {r['images']:>6} {r['seconds']:>8.1f} {r['warm_seconds']:>7.1f} "
              f"{r['images_per_s']:>9.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "gpu": None}
    out.write_text(json.dumps({"args": vars(args), "machine": machine, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
