"""Where DeepSpeed's `engine.backward` and `engine.step` spend their time on a full-size UNet (a GPU tool).

    python3 bench/profile_engine_step.py --unet sdxl --resolution 1024 --batch 1

Builds the same trainer as bench/train_step.py (`setup_models`, ZeRO-2 unless `--zero-stage 1`, bf16, one
process), runs a few whole RPO steps to warm up, then profiles one step's backward and optimizer step with
torch.profiler and prints the top operators by device time and by host time. Writes nothing but the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch


def load_bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", Path(__file__).parent / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", choices=["sd15", "sdxl"], default="sdxl")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--zero-stage", type=int, choices=[1, 2], default=2,
                        help="2: the committed profile's setting; 1: what train.zero_stage=auto gives one worker")
    args = parser.parse_args()
    bench = load_bench()
    bench.set_environment(args.device)
    from pipeline.models.tiny import build_tiny_sdxl
    from pipeline.train.step import preference_loss

    data = bench.synthetic_rows(args)
    model_path = bench.full_size_model(args, str(build_tiny_sdxl(bench.WORK / "tiny-schedule")))
    bench.init_process_group(0, 1, bench.free_port(), "nccl")
    bench.quiet_deepspeed()
    cfg = bench.bench_config(args, f"train.zero_stage={args.zero_stage}")
    trainer = bench.make_trainer(cfg, model_path, data["kind"], torch.device(args.device))
    rows = bench.rows_of_rank(data["rows"], 0, args.batch)
    for step in range(3):
        trainer.whole_step(rows, step, cfg.loss)
    batch, noise, timesteps = trainer.batch(rows, 3)
    loss, _ = preference_loss(trainer.engine, trainer.reference, trainer.scheduler, batch, noise, timesteps, cfg.loss)
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for name, work in (("engine.backward", lambda: trainer.engine.backward(loss)), ("engine.step", trainer.engine.step)):
        with torch.profiler.profile(activities=activities) as prof:
            work()
            torch.cuda.synchronize()
        events = prof.key_averages()
        print(f"\n=== {name}: top operators by device time")
        print(events.table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        print(f"\n=== {name}: top operators by host time")
        print(events.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
