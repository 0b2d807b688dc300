"""The prepared GPU check: the real Ray Train path on 1 GPU, then full-size SDXL steps at micro-batch 1, 2, 4.

On a lent GPU machine, from the repository root (bench/gpu_check.sh installs the carried wheels first):

    bash bench/gpu_check.sh                     # both parts, < 8 min on an H200; JSON to $OUT or bench/results/
    .venv/bin/python bench/gpu_check.py --cpu-smoke   # the tiny part on the CPU with gloo (what a test runs)
    bash bench/gpu_check.sh --skip-trainer --zero-stage 1 --micro-batches 1 4   # part 2 under ZeRO-1
    bash bench/gpu_check.sh --skip-trainer --compile --micro-batches 4            # part 2 with torch.compile
    bash bench/gpu_check.sh --skip-trainer --set train.deepspeed.bf16.check_grad_overflow=false   # any setting

Part 1, the path users run: `run_training` -> `TorchTrainer(use_gpu=True)` with NCCL on one GPU, the tiny SDXL on a
toy feature store, bf16, ZeRO-1 (what `train.zero_stage=auto` gives one worker): a few steps with a checkpoint,
then the same command again to resume to more steps. It passes when both runs end at their step count with finite
losses, the second resumed (it did not start over), and the exported UNet loads with plain diffusers. It records
each run's logged metrics (peak host memory and GPU memory per worker among them).

Part 2, the full-size step: one process, world size 1 over NCCL, the worker's own `setup_models` (bf16, ZeRO-2,
fused AdamW) on a random-weight SDXL UNet (2.6B parameters) at 1024 px (128x128 latents), synthetic rows of the
real embedding shapes, whole RPO steps (data + `preference_loss` + `engine.backward` + `engine.step`) at micro-batch
1, 2 and 4 pairs, each in a fresh process so one's memory does not stay for the next. Gradient checkpointing is on
where bench/cost_model.py predicts the step would not fit in 90% of the GPU's memory without it. Prints step time,
pairs/s, peak GPU memory, peak host memory and MFU (counted FLOPs per pair from bench/cost_model.py over the
card's peak dense bf16 FLOP/s), against the goal of 45%.

Part 3, attention kernels: SDPA forward+backward in bf16 at SDXL's attention shapes, per backend (flash, memory-
efficient, cuDNN, math) and torch's own pick, so the report says whether the UNet's attention runs flash.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
WARMUP_STEPS = 2
TIMED_STEPS = 5
MICRO_BATCHES = (1, 2, 4)
FIT_SHARE = 0.9  # checkpoint gradients when the predicted peak exceeds this share of the GPU's memory


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- part 1: the Ray Train path


def trainer_config(storage: Path, name: str, *, use_gpu: bool, store: str | None, overrides: list[str]):
    from pipeline.config import load_config

    return load_config(None, [
        f"name={name}",
        f"cluster.storage_path={storage}",
        *([f"precompute.store={store}"] if store else []),
        "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0",  # mechanics, not learning: random weights
        "data.toy_pairs=40", "data.toy_resolution=32", "precompute.resolution=32", "data.holdout_fraction=0.2",
        "precompute.actor_num_cpus=0.5",
        "train.num_workers=1", f"train.use_gpu={'true' if use_gpu else 'false'}",
        f"train.worker_num_cpus={1 if use_gpu else 0.5}",  # on a 2-core CPU machine, leave the reader a core
        "train.batch_size_per_worker=2", "train.log_every=1", "train.lr=1e-4", "loss.beta=500",
        *overrides,
    ])


def trainer_check(storage: Path, *, use_gpu: bool, steps: int, store: str | None = None) -> dict[str, Any]:
    """`run_training` to `steps - 1` with a checkpoint every step, then again to `steps` (a resume). Ray must be
    running. Returns both runs' final metrics and the checks' verdicts; raises if a run fails."""
    from diffusers import UNet2DConditionModel

    from pipeline.precompute import run_precompute
    from pipeline.train.run import run_training

    name = f"gpu-check-{'gpu' if use_gpu else 'cpu'}"
    first_cfg = trainer_config(storage, name, use_gpu=use_gpu, store=store,
                               overrides=[f"train.max_steps={steps - 1}", "train.checkpoint_every=1"])
    if store is None:
        run_precompute(first_cfg)
    started = time.perf_counter()
    first = run_training(first_cfg)
    first_s = time.perf_counter() - started
    resumed_cfg = trainer_config(storage, name, use_gpu=use_gpu, store=store,
                                 overrides=[f"train.max_steps={steps}", "train.checkpoint_every=1"])
    started = time.perf_counter()
    resumed = run_training(resumed_cfg)
    resumed_s = time.perf_counter() - started
    unet = UNet2DConditionModel.from_pretrained(resumed.model_uri)
    checks = {
        "first_run_reached_its_steps": first.metrics.get("step") == steps - 1,
        "resumed_run_reached_its_steps": resumed.metrics.get("step") == steps,
        "resumed_not_restarted": "start_holdout_accuracy" not in resumed.metrics,
        "losses_finite": all(math.isfinite(m.get("loss", float("nan"))) for m in (first.metrics, resumed.metrics)),
        "export_loads_with_diffusers": sum(p.numel() for p in unet.parameters()) > 0,
    }
    return {"checks": checks, "passed": all(checks.values()), "first_run_s": first_s, "resumed_run_s": resumed_s,
            "first_metrics": first.metrics, "resumed_metrics": resumed.metrics,
            "checkpoint": resumed.checkpoint_uri, "model": resumed.model_uri}


def run_trainer_part(work: Path, *, use_gpu: bool, steps: int) -> dict[str, Any]:
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(2, min(8, os.cpu_count() or 2)), num_gpus=1 if use_gpu else 0,
             include_dashboard=False, log_to_driver=True)
    try:
        return trainer_check(work / "trainer", use_gpu=use_gpu, steps=steps)
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------ part 2: the full-size step


def predicted_peak_bytes(cost: dict[str, Any], pairs: int, checkpointing: bool) -> float:
    key = f"zero2_gpus1_pairs{pairs}_{'gc' if checkpointing else 'nogc'}"
    return cost["memory_per_gpu_bytes"][key]


def peak_flops(device_name: str, cost_model) -> float | None:
    for part, peak in cost_model.PEAK_BF16_DENSE.items():
        if part.split()[0] in device_name:  # "H100" / "H200"
            return peak
    return None


def full_size_step(pairs: int, checkpointing: bool, zero_stage: int, compile_: bool, overrides: list[str],
                   out_file: str) -> None:
    """One micro-batch setting in this (fresh) process: whole RPO steps on a full-size SDXL UNet; JSON to out_file."""
    import resource

    import torch

    bench = load_module("train_step")
    args = argparse.Namespace(unet="sdxl", resolution=1024, batch=pairs, device="cuda", repeats=TIMED_STEPS,
                              compile=compile_)
    bench.set_environment("cuda")
    from pipeline.models.tiny import build_tiny_sdxl

    data = bench.synthetic_rows(args)
    model_path = bench.full_size_model(args, str(build_tiny_sdxl(bench.WORK / "tiny-schedule")))
    bench.init_process_group(0, 1, bench.free_port(), "nccl")
    bench.quiet_deepspeed()
    try:
        cfg = bench.bench_config(args, f"train.gradient_checkpointing={'true' if checkpointing else 'false'}",
                                 f"train.zero_stage={zero_stage}", *overrides)
        device = torch.device("cuda")
        torch.cuda.reset_peak_memory_stats(device)
        trainer = bench.make_trainer(cfg, model_path, "sdxl", device)
        setup_peak = torch.cuda.max_memory_allocated(device)
        rows = bench.rows_of_rank(data["rows"], 0, pairs)
        times = []
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            _, ms = bench.timed(device, lambda: trainer.whole_step(rows, step, cfg.loss))
            if step >= WARMUP_STEPS:
                times.append(ms / 1e3)
        result = {
            "pairs": pairs, "gradient_checkpointing": checkpointing, "zero_stage": zero_stage, "compile": compile_,
            "overrides": overrides,
            "step_s": statistics.median(times),
            "step_s_all": times, "peak_gpu_bytes": torch.cuda.max_memory_allocated(device),
            "peak_gpu_bytes_after_setup": setup_peak,
            "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "device_name": torch.cuda.get_device_name(device),
            "gpu_total_bytes": torch.cuda.get_device_properties(device).total_memory,
        }
    except torch.cuda.OutOfMemoryError as error:
        result = {"pairs": pairs, "gradient_checkpointing": checkpointing, "error": f"out of memory: {error}"[:500]}
    finally:
        torch.distributed.destroy_process_group()
    Path(out_file).write_text(json.dumps(result))


def run_full_size_part(work: Path, micro_batches: tuple[int, ...], cost: dict[str, Any], *,
                       zero_stage: int = 2, compile_: bool = False, overrides: tuple[str, ...] = ()
                       ) -> list[dict[str, Any]]:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    device_name = torch.cuda.get_device_name(0)
    cost_model = load_module("cost_model")
    peak = peak_flops(device_name, cost_model)
    results = []
    context = multiprocessing.get_context("spawn")
    for pairs in micro_batches:
        checkpointing = predicted_peak_bytes(cost, pairs, False) > FIT_SHARE * total
        out_file = work / f"full_size_b{pairs}.json"
        process = context.Process(target=full_size_step,
                                  args=(pairs, checkpointing, zero_stage, compile_, list(overrides), str(out_file)))
        process.start()
        process.join()
        if process.exitcode != 0 or not out_file.exists():
            results.append({"pairs": pairs, "gradient_checkpointing": checkpointing,
                            "error": f"the step process exited with {process.exitcode}"})
            continue
        r = json.loads(out_file.read_text())
        r["predicted_peak_bytes"] = predicted_peak_bytes(cost, pairs, checkpointing)
        if "step_s" in r:
            flops = cost["flops_per_pair"] * pairs
            r["pairs_per_s"] = pairs / r["step_s"]
            r["mfu"] = flops / r["step_s"] / peak if peak else None
            r["floor_step_s"] = flops / peak if peak else None
        results.append(r)
        print(f"[gpu_check] {format_full_size(r)}", flush=True)
    return results


def format_full_size(r: dict[str, Any]) -> str:
    head = (f"SDXL 1024 px, ZeRO-{r.get('zero_stage', 2)}{', compiled' if r.get('compile') else ''}"
            f"{''.join(', ' + o for o in r.get('overrides', []))}, "
            f"{r['pairs']} pair(s)/GPU, checkpointing "
            f"{'on' if r['gradient_checkpointing'] else 'off'}:")
    if "error" in r:
        return f"{head} FAILED {r['error']}"
    mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "n/a (unknown card)"
    return (f"{head} step {r['step_s'] * 1e3:.0f} ms, {r['pairs_per_s']:.2f} pairs/s, peak GPU "
            f"{r['peak_gpu_bytes'] / 2**30:.1f} GiB (predicted {r['predicted_peak_bytes'] / 2**30:.1f}), host "
            f"{r['peak_host_rss_bytes'] / 2**30:.1f} GiB, MFU {mfu} (goal 45%)")


# ------------------------------------------------------------------------- part 3: attention kernels


# SDXL's attention at 1024 px, one pair (winner + loser = 2 images): self-attention over the 64x64 and 32x32 latent
# grids, cross-attention to the 77 prompt tokens; heads of 64 channels.
ATTENTION_SHAPES = {"self_64x64": (10, 4096, 4096), "self_32x32": (20, 1024, 1024), "cross_64x64": (10, 4096, 77)}


def attention_backends(images: int = 2, repeats: int = 5, device: str = "cuda",
                       shapes: dict[str, tuple[int, int, int]] = ATTENTION_SHAPES) -> dict[str, dict[str, Any]]:
    """ms of SDPA forward+backward in bf16 per backend (and torch's own pick, 'default') at SDXL's shapes: does the
    UNet's attention get flash, and what would forcing another kernel change?"""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    results: dict[str, dict[str, Any]] = {}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for shape_name, (heads, q_len, kv_len) in shapes.items():
        def tensor(length: int) -> "torch.Tensor":
            return torch.randn(images, heads, length, 64, device=device, dtype=torch.bfloat16, requires_grad=True)

        q, k, v = tensor(q_len), tensor(kv_len), tensor(kv_len)
        row: dict[str, Any] = {}
        for label, backend in backends.items():
            def once() -> None:
                if backend is None:
                    F.scaled_dot_product_attention(q, k, v).sum().backward()
                else:
                    with sdpa_kernel([backend]):
                        F.scaled_dot_product_attention(q, k, v).sum().backward()

            try:
                times = []
                for i in range(2 + repeats):
                    sync()
                    started = time.perf_counter()
                    once()
                    sync()
                    if i >= 2:
                        times.append((time.perf_counter() - started) * 1e3)
                row[label] = statistics.median(times)
            except RuntimeError as error:  # a backend that does not take this shape or card
                row[label] = f"unavailable: {str(error).splitlines()[0][:160]}"
        results[shape_name] = row
        del q, k, v
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


# --------------------------------------------------------------------------------------------------- main


def cost_of_sdxl() -> dict[str, Any]:
    """SDXL at 1024 px from bench/results/cost_model.json (committed), else counted now (~20 s on a CPU)."""
    saved = RESULTS / "cost_model.json"
    if saved.exists():
        for model in json.loads(saved.read_text())["models"]:
            if model["unet"] == "sdxl" and model["resolution"] == 1024 and 1 in json.loads(saved.read_text())["gpus"]:
                return model
    return load_module("cost_model").model_costs("sdxl", resolution=1024, gpus=(1,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="part 1 only, on the CPU with gloo, 2 steps")
    parser.add_argument("--skip-trainer", action="store_true", help="part 2 only")
    parser.add_argument("--skip-full-size", action="store_true", help="part 1 only")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=list(MICRO_BATCHES))
    parser.add_argument("--zero-stage", type=int, choices=[1, 2], default=2,
                        help="part 2's ZeRO stage (the goal is stated for 2; 1 skips the per-parameter gradient hooks)")
    parser.add_argument("--compile", action="store_true",
                        help="part 2 with train.compile=inductor (the warm-up steps absorb the compilation)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for part 2's steps (repeatable), e.g. "
                             "train.deepspeed.zero_optimization.overlap_comm=true")
    parser.add_argument("--work", type=Path, default=RESULTS / "work" / "gpu-check")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: $OUT or bench/results/)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    use_gpu = torch.cuda.is_available() and not args.cpu_smoke
    name = "gpu_check_cpu_smoke.json" if args.cpu_smoke else "gpu_check.json"
    out = args.out or Path(os.environ.get("OUT") or RESULTS) / name
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"device_name": torch.cuda.get_device_name(0) if use_gpu else "cpu",
                              "torch": torch.__version__, "cpu_smoke": args.cpu_smoke}

    if not args.skip_trainer:
        try:
            report["trainer"] = run_trainer_part(args.work, use_gpu=use_gpu, steps=2 if args.cpu_smoke else 4)
            print(f"[gpu_check] Ray Train path ({'NCCL, 1 GPU' if use_gpu else 'gloo, CPU'}): "
                  f"{'PASS' if report['trainer']['passed'] else 'FAIL'} {report['trainer']['checks']}", flush=True)
        except Exception as error:  # noqa: BLE001 - part 2 still runs; the JSON says what failed
            report["trainer"] = {"passed": False, "error": "".join(traceback.format_exception(error))[-4000:]}
            print(f"[gpu_check] Ray Train path FAILED:\n{report['trainer']['error']}", flush=True)
    if use_gpu and not args.skip_full_size:
        cost = cost_of_sdxl()
        report["flops_per_pair"] = cost["flops_per_pair"]
        report["full_size_sdxl"] = run_full_size_part(args.work, tuple(args.micro_batches), cost,
                                                      zero_stage=args.zero_stage, compile_=args.compile,
                                                      overrides=tuple(args.overrides))
        try:
            report["attention_ms"] = attention_backends()
            for shape_name, row in report["attention_ms"].items():
                cells = ", ".join(f"{k} {v:.2f} ms" if isinstance(v, float) else f"{k} n/a" for k, v in row.items())
                print(f"[gpu_check] SDPA fwd+bwd bf16, 2 images, {shape_name}: {cells}", flush=True)
        except Exception as error:  # noqa: BLE001 - a probe; the check's verdicts do not depend on it
            report["attention_ms"] = {"error": "".join(traceback.format_exception(error))[-2000:]}
    report["seconds"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"[gpu_check] wrote {out} ({report['seconds']:.0f} s)", flush=True)
    if not report.get("trainer", {"passed": True}).get("passed"):
        sys.exit(1)


if __name__ == "__main__":
    main()
