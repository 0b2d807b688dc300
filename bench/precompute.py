"""Precompute throughput on this machine: pairs per second versus encoder actors and batch size.

Run from the repository root:

    .venv/bin/python bench/precompute.py                     # 32 and 256 toy pairs at 64 px, tiny SDXL
    .venv/bin/python bench/precompute.py --pairs 64 512

For each number of encoder actors (1, 2) and batch size (4, 16), runs `run_precompute` from an empty store over
the first N rows of one toy world (64 px images, store resolution 64: 2 images and about 1 caption per pair), for
the two sizes N, in one local Ray with this machine's CPUs and encoder actors at 0.5 CPU each. A run's time is a
fixed part (starting two actor pools: new processes that import torch, diffusers and open_clip and load the
models, plus Ray Data's start-up) and a part per pair; the two sizes separate them (after one untimed warm-up run):

    marginal pairs/s = (N2 - N1) / (t2 - t1)          fixed s = t1 - N1 / marginal pairs/s

On a shared machine the per-pair part can drown in other jobs' noise (then "marginal" is n/a). Prints a table and
writes bench/results/precompute.json, with the load average before and after.
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throw-away Ray

import pyarrow.parquet as pq
import ray

from pipeline.config import load_config
from pipeline.precompute import resolve_data_source, resolve_model_path, run_precompute

ACTORS = (1, 2)
BATCH_SIZES = (4, 16)
RESULTS = Path(__file__).parent / "results" / "precompute.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, nargs=2, default=(32, 256), metavar=("N1", "N2"))
    args = parser.parse_args()
    small, large = sorted(args.pairs)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    folder = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    base = [f"cluster.storage_path={folder}", "model.pretrained=tiny", "model.clip_pretrained=random", f"data.toy_pairs={large}",
            "data.toy_resolution=64", "precompute.resolution=64", "precompute.actor_num_cpus=0.5"]
    # The tiny model and the toy world are built once, outside the timings.
    resolve_model_path(load_config(None, base))
    toy = pq.read_table(resolve_data_source(load_config(None, base)))
    sources = {}
    for n in (small, large):
        sources[n] = folder / f"first_{n}.parquet"
        pq.write_table(toy.slice(0, n), sources[n])

    # One untimed run first: the first use of a fresh Ray pays one-off costs (worker start-up, cold file caches).
    run_precompute(load_config(None, [*base, f"data.source={sources[small]}", f"precompute.store={folder}/warm-up"]))

    load_before = os.getloadavg()
    results = []
    for actors in ACTORS:
        for batch_size in BATCH_SIZES:
            runs = {}
            for n in (small, large):
                cfg = load_config(None, [
                    *base, f"data.source={sources[n]}", f"precompute.store={folder}/store-{actors}-{batch_size}-{n}",
                    f"precompute.num_encoder_actors={actors}", f"precompute.batch_size={batch_size}",
                ])
                runs[n] = run_precompute(cfg)
            pairs = {n: runs[n]["new_pairs"] for n in runs}
            seconds = {n: runs[n]["seconds"]["total"] for n in runs}
            extra = seconds[large] - seconds[small]
            marginal = (pairs[large] - pairs[small]) / extra if extra > 0 else None
            results.append({
                "encoder_actors": actors,
                "batch_size": batch_size,
                "pairs": [pairs[small], pairs[large]],
                "seconds_total": [round(seconds[small], 2), round(seconds[large], 2)],
                "seconds_texts": [round(runs[n]["seconds"]["texts"], 2) for n in (small, large)],
                "seconds_images": [round(runs[n]["seconds"]["images"], 2) for n in (small, large)],
                "pairs_per_s_end_to_end": round(pairs[large] / seconds[large], 2),
                "pairs_per_s_marginal": round(marginal, 2) if marginal else None,
                "seconds_fixed": round(seconds[small] - pairs[small] / marginal, 1) if marginal else None,
            })

    print(f"\n{'actors':>6} {'batch':>5} {'pairs':>9} {'seconds':>13} {'pairs/s':>8} {'marginal':>9} {'fixed s':>8}")
    for r in results:
        marginal, fixed = r["pairs_per_s_marginal"], r["seconds_fixed"]
        print(f"{r['encoder_actors']:>6} {r['batch_size']:>5} {r['pairs'][0]:>4}/{r['pairs'][1]:<4} "
              f"{r['seconds_total'][0]:>6.1f}/{r['seconds_total'][1]:<6.1f} {r['pairs_per_s_end_to_end']:>8.2f} "
              f"{'n/a' if marginal is None else f'{marginal:.2f}':>9} {'n/a' if fixed is None else f'{fixed:.1f}':>8}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray.__version__,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.write_text(json.dumps({"machine": machine, "toy_pairs": [small, large], "results": results}, indent=2))
    shutil.rmtree(folder)  # the stores, model and toy world were only for timing
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
