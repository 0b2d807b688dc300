"""Data scale: does precompute and the training reader hold memory flat as the preference table grows?

    .venv/bin/python bench/data_scale.py                          # 2k, 8k and 32k pairs (long on 2 cores)
    .venv/bin/python bench/data_scale.py --sizes 1000 2000 4000   # what fits a short run

For each size, a fresh process (its own local Ray, so peaks do not carry over) writes a synthetic Pick-a-Pic table
(Parquet files of 1,000 rows with JPEG bytes in ``jpg_0``/``jpg_1``, 32 px images; captions and images recur
across pairs, as in Pick-a-Pic), runs ``run_precompute`` into an empty store with the tiny SDXL (random weights),
then reads the whole train split once with ``read_training_dataset(...).iter_batches``. A sampler thread records
the driver's resident set and every Ray worker process's (``ray::*``) every 0.2 s. Printed per phase: pairs/s,
driver peak RSS, largest worker peak RSS; the goal is peaks growing < 10% from the smallest to the largest size
and pairs/s not falling. Writes bench/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "data_scale.json"
ROWS_PER_FILE = 1000


def synthetic_table(folder: Path, n_pairs: int, *, resolution: int, seed: int = 0) -> Path:
    """Pick-a-Pic-shaped Parquet files: each caption is used by ~4 pairs, each image by ~2 (so dedupe matters)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    n_images = max(2, n_pairs)  # ~2 uses per image
    n_captions = max(1, n_pairs // 4)

    def jpeg(index: int) -> bytes:
        colour = np.random.default_rng(index).integers(0, 256, size=(resolution, resolution, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(colour).save(buffer, format="JPEG", quality=80)
        return buffer.getvalue()

    images = [jpeg(i) for i in range(n_images)]
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n_pairs, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, n_pairs - start)
        a = rng.integers(0, n_images, size=n)
        b = (a + 1 + rng.integers(0, n_images - 1, size=n)) % n_images  # never the same image twice in a pair
        table = pa.table({
            "caption": [f"scene {int(c)} in a synthetic style" for c in rng.integers(0, n_captions, size=n)],
            "jpg_0": [images[i] for i in a], "jpg_1": [images[i] for i in b],
            "label_0": rng.choice([0.0, 1.0], size=n).astype(np.float64),
        })
        pq.write_table(table, folder / f"part-{start // ROWS_PER_FILE:05d}.parquet")
    return folder


class PeakSampler:
    """Peak RSS of this process and of every Ray worker process, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2, *, worker_title: str = ""):
        import psutil

        self.worker_title = worker_title  # only Ray workers whose process title contains this

        self.psutil, self.interval_s = psutil, interval_s
        self.driver_peak = 0
        self.worker_peaks: dict[int, tuple[int, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            for proc in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    title = " ".join(proc.info["cmdline"] or [])
                    if (title.startswith("ray::") and self.worker_title in title
                            and proc.info["memory_info"] is not None):
                        rss = proc.info["memory_info"].rss
                        if rss > self.worker_peaks.get(proc.pid, (0, ""))[0]:
                            self.worker_peaks[proc.pid] = (rss, title[:60])
                except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                    continue
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        rss, title = max(self.worker_peaks.values(), default=(0, ""))
        return {"driver_peak_mib": self.driver_peak / 2**20, "worker_peak_mib": rss / 2**20, "worker": title}


def start_ray() -> None:
    import ray

    for attempt in range(3):  # a busy 2-core machine sometimes misses Ray's node start-up deadline
        try:
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
            time.sleep(10)


def one_size(n_pairs: int, resolution: int, workdir: Path) -> dict:
    """Runs in a fresh process: table, precompute, one pass of the training reader."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    from pipeline.config import load_config
    from pipeline.precompute import read_training_dataset, resolve_model_path, run_precompute

    start_ray()
    table = synthetic_table(workdir / f"table-{n_pairs}", n_pairs, resolution=resolution)
    cfg = load_config(None, [
        f"cluster.storage_path={workdir}", "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0", f"data.source={table}",
        f"precompute.store={workdir}/store-{n_pairs}", f"precompute.resolution={resolution}",
        "precompute.batch_size=64", "precompute.rows_per_shard=512", "data.holdout_fraction=0.0",
    ])
    resolve_model_path(cfg)  # built once, outside the measurement
    with PeakSampler() as sampler:
        summary = run_precompute(cfg)
    precompute = {"pairs": summary["new_pairs"], "seconds": summary["seconds"]["total"], **sampler.result()}
    ray.shutdown()  # the reader gets fresh worker processes: precompute's pooled workers keep their memory
    start_ray()
    with PeakSampler(worker_title="pair_features") as sampler:  # the reader's tasks (not Ray's own actors)
        start, rows = time.monotonic(), 0
        for batch in read_training_dataset(summary["store_uri"]).iter_batches(batch_size=64, batch_format="numpy"):
            rows += len(batch["pair_id"])
        seconds = time.monotonic() - start
    reader = {"pairs": rows, "seconds": seconds, **sampler.result()}
    ray.shutdown()
    for phase in (precompute, reader):
        phase["pairs_per_s"] = phase["pairs"] / phase["seconds"]
    return {"n_pairs": n_pairs, "precompute": precompute, "reader": reader}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure one size in this process
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_size(args.one, args.resolution, args.workdir)))
        return

    workdir = Path(tempfile.mkdtemp(prefix="bench-data-scale-"))
    runs, load_before = [], os.getloadavg()
    for n in args.sizes:
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--resolution", str(args.resolution),
                               "--workdir", str(workdir)], capture_output=True, text=True,
                              cwd=Path(__file__).parent.parent, env={**os.environ, "PYTHONPATH": "."})
        line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode or not line:
            sys.exit(f"size {n} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        runs.append(json.loads(line[0][len("RESULT "):]))
        print(f"{n} pairs measured", flush=True)

    print(f"\n{'phase':<11}{'pairs':>8}{'pairs/s':>10}{'driver peak MiB':>17}{'largest worker MiB':>20}  worker")
    for run in runs:
        for phase in ("precompute", "reader"):
            r = run[phase]
            print(f"{phase:<11}{run['n_pairs']:>8}{r['pairs_per_s']:>10.1f}{r['driver_peak_mib']:>17.0f}"
                  f"{r['worker_peak_mib']:>20.0f}  {r['worker']}")
    growth = {}
    for phase in ("precompute", "reader"):
        first, last = runs[0][phase], runs[-1][phase]
        growth[phase] = {key: last[key] / first[key] - 1 for key in ("driver_peak_mib", "worker_peak_mib",
                                                                     "pairs_per_s")}
        g = growth[phase]
        print(f"{phase}: {runs[0]['n_pairs']} -> {runs[-1]['n_pairs']} pairs: driver peak {g['driver_peak_mib']:+.1%}, "
              f"largest worker {g['worker_peak_mib']:+.1%}, pairs/s {g['pairs_per_s']:+.1%}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "growth": growth, "resolution": args.resolution,
                                    "load_before": load_before, "load_after": os.getloadavg()}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
