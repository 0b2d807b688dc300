"""The worker's models: policy UNet (DeepSpeed engine), reference, noise schedule; loaded as they will be used.

The UNet is read in the training dtype and placed on the worker's device at once (bf16 on GPUs: 5 GB for SDXL,
where an fp32 load plus an fp32 copy for the reference held ~20 GB of host memory per worker). Under ZeRO-3 it is
built inside `deepspeed.zero.Init`, so each rank allocates only its 1/N partition, and rank 0 alone reads the
weights and hands each layer's over while the layer is gathered. DeepSpeed's bf16 master weights are made from the
bf16 module either way, so loading in bf16 loses nothing against loading in fp32.

Every load reads the plan's ``revision`` and ``variant`` (the base's model.revision / model.variant, as precompute
used them and the store records them): the loaders take them as required arguments, so no path can fall back to
the hub's default files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import AlignConfig
from pipeline.train.deepspeed_config import deepspeed_config, resolve_precision, resolve_zero_stage
from pipeline.train.reference import Reference, frozen_copy, lora_reference, zero3_reference
from pipeline.train.schedule import lr_multiplier

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class TrainModels:
    engine: Any  # the DeepSpeed engine around the policy UNet
    reference: Reference | None  # None for sft
    scheduler: Any  # DDPMScheduler: the training noise schedule
    dtype: torch.dtype  # compute dtype of the UNet's inputs


def training_dtype(cfg: AlignConfig, device: torch.device) -> tuple[str, torch.dtype]:
    precision = resolve_precision(
        cfg.train.precision, cuda=device.type == "cuda",
        bf16_supported=device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    return precision, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _optimizer(cfg: AlignConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.lr, scale_parameter=False, relative_step=False, weight_decay=t.weight_decay)
    # On a GPU, torch's fused AdamW: one kernel over ZeRO's flat fp32 partition (20 ms for SDXL's 2.6B parameters
    # on an H200, profiled) instead of a chain of elementwise passes.
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                             fused=device.type == "cuda")


def _numel(p: torch.nn.Parameter) -> int:
    return getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter reports 0 elements


def load_unet(model_path: str, kind: str, *, revision: str | None, variant: str | None, dtype: torch.dtype,
              device: torch.device) -> torch.nn.Module:
    """The UNet of ``model_path`` at ``revision``, from its ``variant``'s weight files (None: the default files)."""
    from pipeline.models.loader import load_components

    return load_components(model_path, kind=kind, parts=("unet",), dtype=dtype, device=device, revision=revision,
                           variant=variant).unet


def load_noise_schedule(model_path: str, kind: str, *, revision: str | None):
    """The training noise schedule (DDPM) from the pipeline's scheduler config at ``revision``."""
    from pipeline.models.loader import load_components

    return load_components(model_path, kind=kind, parts=("scheduler",), revision=revision).scheduler


def unet_config(model_path: str, *, revision: str | None) -> dict:
    """The UNet's config.json at ``revision`` (one file for every variant)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.load_config(model_path, subfolder="unet", revision=revision)


def load_unet_zero3(model_path: str, kind: str, ds_config: dict, *, revision: str | None, dtype: torch.dtype,
                    device: torch.device, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The UNet built under `deepspeed.zero.Init` (each rank holds 1/N), with rank 0's `state` copied in layer by
    layer while that layer is gathered. Every rank must call this; only rank 0 passes `state` (read by `load_unet`
    with the plan's variant)."""
    import deepspeed
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel

    config = unet_config(model_path, revision=revision)
    # No dtype argument: DeepSpeed 0.19 reads it as bf16 on accelerators without fp16 (the CPU's), whatever it is;
    # from the config it takes bf16 / fp16 / fp32 as the training precision says.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device=None, pin_memory=False):
        unet = UNet2DConditionModel.from_config(config)
    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, module in unet.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
            if rank == 0:
                for short, p in params:
                    p.data.copy_(state[f"{name}.{short}" if name else short].to(device=p.device, dtype=p.dtype))
    return unet.eval()


def setup_models(cfg: AlignConfig, plan, device: torch.device) -> TrainModels:
    import deepspeed
    import torch.distributed as dist

    precision, dtype = training_dtype(cfg, device)
    weights = {"revision": plan.revision, "variant": plan.variant}
    scheduler = load_noise_schedule(plan.model_path, plan.kind, revision=plan.revision)
    full = cfg.train.mode == "full"
    wants_reference = full and cfg.loss.objective != "sft"
    zero3_init = full and resolve_zero_stage(cfg.train) == 3

    if zero3_init:
        # The config's bucket sizes need the parameter count before the model exists: read it from rank 0's copy.
        rank = dist.get_rank() if dist.is_initialized() else 0
        state = load_unet(plan.model_path, plan.kind, **weights, dtype=dtype,
                          device=torch.device("cpu")).state_dict() if rank == 0 else None
        count = torch.tensor([sum(v.numel() for v in state.values()) if state else 0], dtype=torch.int64,
                             device=device)
        if dist.is_initialized():
            dist.broadcast(count, src=0)
        ds_config = deepspeed_config(cfg.train, precision=precision, num_params=int(count.item()))
        unet = load_unet_zero3(plan.model_path, plan.kind, ds_config, revision=plan.revision, dtype=dtype,
                               device=device, state=state)
        reference_unet = (load_unet_zero3(plan.model_path, plan.kind, ds_config, revision=plan.revision,
                                          dtype=dtype, device=device, state=state) if wants_reference else None)
        del state
    else:
        unet = load_unet(plan.model_path, plan.kind, **weights, dtype=dtype, device=device)
        ds_config = deepspeed_config(cfg.train, precision=precision, num_params=sum(_numel(p) for p in unet.parameters()))
        reference_unet = None

    reference = None
    if wants_reference:
        reference = zero3_reference(reference_unet, ds_config) if zero3_init else frozen_copy(unet)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.train.mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        torch.manual_seed(cfg.train.seed)  # peft draws the adapters' initial A: the same run twice, the same adapters
        unet.add_adapter(
            LoraConfig(r=cfg.train.lora_rank, lora_alpha=cfg.train.lora_alpha, init_lora_weights="gaussian",
                       target_modules=LORA_TARGETS)
        )
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    schedule = lambda step: lr_multiplier(  # noqa: E731
        step, warmup_steps=cfg.train.lr_warmup_steps, total_steps=cfg.train.max_steps, schedule=cfg.train.lr_schedule
    )
    optimizer = None
    if cfg.train.offload_optimizer:
        # ZeRO-Offload needs DeepSpeed's own CPU Adam, built from the config.
        ds_config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": cfg.train.lr, "betas": [cfg.train.adam_beta1, cfg.train.adam_beta2],
                       "weight_decay": cfg.train.weight_decay},
        }
    else:
        optimizer = _optimizer(cfg, trainable, device)
    engine, _, _, _ = deepspeed.initialize(
        model=unet,
        model_parameters=trainable,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds_config,
    )
    if cfg.train.mode == "lora" and cfg.loss.objective != "sft":
        reference = lora_reference(engine)
    if cfg.train.compile:
        compile_models(engine, reference, backend=cfg.train.compile)
    return TrainModels(engine, reference, scheduler, dtype)


def compile_models(engine, reference: Reference | None, *, backend: str) -> None:
    """torch.compile the policy through DeepSpeed (its hooks stay outside the graph) and the reference where it is
    a model of its own. The LoRA reference is the policy's module with its adapters' flag off: dynamo guards on
    the flag and keeps a second graph for it."""
    engine.compile(backend=backend)
    if reference is not None and reference.runner is not engine:
        reference.runner.compile(backend=backend)  # a frozen UNet (nn.Module.compile) or a ZeRO-3 engine
