"""The DeepSpeed config a run's TrainConfig implies: a pure function, so it is tested without DeepSpeed."""

from __future__ import annotations

from typing import Any

from pipeline.config import ConfigError, TrainConfig

# DeepSpeed keys that typed settings decide, and the setting to use instead: `train.deepspeed` may not set them.
DECIDED_BY_SETTINGS = {
    "train_batch_size": "train.batch_size_per_worker, train.grad_accum_steps and train.num_workers",
    "train_micro_batch_size_per_gpu": "train.batch_size_per_worker",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload_optimizer",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "bfloat16": "train.precision",
    "optimizer": "train.optimizer (the worker builds it)",
    "scheduler": "train.lr_schedule (the worker builds it)",
}


def resolve_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> str:
    """'auto' means bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU (CPU half precision is slow)."""
    if requested != "auto":
        return requested
    if not cuda:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


# DeepSpeed's default buckets (5e8 elements) are allocated whole, even for a small model (~1.9 GiB per worker in
# fp32 for the tiny test UNet under ZeRO-3). 5e7 elements (~100 MB in bf16) is plenty for an SDXL UNet's layers.
MAX_BUCKET_ELEMENTS = 50_000_000


def resolve_zero_stage(train: TrainConfig) -> int:
    """'auto' means ZeRO-1 for LoRA and for full fine-tunes on one worker, ZeRO-2 for full fine-tunes on several.

    Stage 1 here runs without per-parameter backward hooks (see `deepspeed_config`), and those hooks cost host time
    every step. LoRA's gradients and optimizer state are a few MB: partitioning them saves nothing (the CPU LoRA step
    1.23x -> 1.35x faster than a plain loop with stage 1 and the reference's flag switch). On one worker stage 2 has
    nothing to partition either: a full tiny-SDXL step is 1.12x faster in stage 1 with bit-identical weights, and a
    stage-2 checkpoint resumes in stage 1 (bench/NOTES.md). On several workers stage 2 keeps 1/N of the gradients.
    """
    if train.zero_stage != "auto":
        return int(train.zero_stage)
    return 1 if train.mode == "lora" or train.num_workers == 1 else 2


def check_deepspeed_extra(extra: dict[str, Any]) -> None:
    """Refuse `train.deepspeed` keys that a typed setting decides (or keys under them), naming the setting to use."""
    from pipeline.precompute.store import flatten_settings

    for key in sorted(set(extra) | set(flatten_settings(extra))):
        for decided, setting in DECIDED_BY_SETTINGS.items():
            if key == decided or key.startswith(decided + "."):
                raise ConfigError(f"config key 'train.deepspeed.{decided}': set by {setting}; use that instead")


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, section by section; `extra`'s values win."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(train: TrainConfig, *, precision: str, num_params: int) -> dict[str, Any]:
    bucket = int(min(MAX_BUCKET_ELEMENTS, max(num_params, 1)))
    stage = resolve_zero_stage(train)
    zero: dict[str, Any] = {
        "stage": stage,
        # Stage 2/3 copy each gradient into a contiguous partition buffer as backward produces it (less
        # fragmentation). Stage 1 reduces once at the end; with this off it registers no per-parameter hooks.
        "contiguous_gradients": stage >= 2,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
    }
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if stage == 3:
        # The final export gathers full weights; every rank must take part.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        zero["stage3_prefetch_bucket_size"] = bucket
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.batch_size_per_worker,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # We pass a torch optimizer object: DeepSpeed would otherwise JIT-compile its fused Adam.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own progress line replaces DeepSpeed's
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return merged(config, train.deepspeed)
