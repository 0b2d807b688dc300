"""Checkpoints (DeepSpeed state through Ray Train) and the final export that plain diffusers loads.

Save: every rank writes its DeepSpeed state (model states on rank 0, its optimizer partition on every rank) into a
local folder and hands it to `ray.train.report`, which merges the ranks' folders into one checkpoint in storage and
keeps the newest K. A checkpoint only becomes visible once every rank's report has landed, so a crash mid-save
leaves the previous one as the latest. Restore: Ray gives each (re)started worker the latest checkpoint.
"""

from __future__ import annotations

import tempfile

import torch

STEP_KEY = "step"


def restore(engine, *, lora: bool) -> int:
    """Load the latest checkpoint Ray has for this run, if any; return the optimizer step to continue from."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        # LoRA checkpoints hold only the adapter weights (frozen base excluded), hence non-strict.
        _, client_state = engine.load_checkpoint(folder, load_module_strict=not lora)
    if client_state is None:
        raise RuntimeError(f"checkpoint {checkpoint.path} has no DeepSpeed state; delete it or use a new run name")
    return int(client_state[STEP_KEY])


def save_and_report(engine, metrics: dict, *, step: int, lora: bool) -> None:
    import ray.train

    with tempfile.TemporaryDirectory(prefix="rpo-ckpt-") as folder:
        engine.save_checkpoint(
            folder, tag=f"step_{step:08d}", client_state={STEP_KEY: step}, exclude_frozen_parameters=lora
        )
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=f"checkpoint_{step:08d}"
        )


def export_model(engine, plan, cfg, *, rank: int) -> None:
    """Write the final model where plain diffusers loads it: a UNet folder (full) or a LoRA .safetensors file.

    Every rank must call this: under ZeRO-3 the full weights are gathered from all ranks. The weights are the
    module's, in the training precision (fp32 on CPU, bf16/fp16 on GPU).
    """
    import deepspeed

    from pipeline.storage import upload_dir

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank != 0:
            return
        with tempfile.TemporaryDirectory(prefix="rpo-export-") as folder:
            if cfg.train.mode == "lora":
                _save_lora(module, folder, kind=plan.kind)
            else:
                module.save_pretrained(folder, safe_serialization=True)
            upload_dir(folder, plan.model_out)


def _save_lora(unet, folder: str, *, kind: str) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    pipeline_cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
