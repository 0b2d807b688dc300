"""The Ray Train worker loop: setup, train, checkpoint, export (one process per GPU, or per CPU slot here).

Reads the feature store through `ray.train.get_dataset_shard`; never runs the VAE or the text encoders. The model
is wrapped by `deepspeed.initialize` (ZeRO-2 by default); the reference is a frozen half-precision copy, or for LoRA
the same UNet with its adapters switched off.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from pipeline.config import AlignConfig
from pipeline.train import noise as noise_draws
from pipeline.train.deepspeed_config import deepspeed_config, resolve_precision
from pipeline.train.schedule import lr_multiplier
from pipeline.train.step import PairBatch, pair_mses, preference_loss

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
HOLDOUT_DRAWS = 4  # noise/timestep draws per held-apart pair: a steadier estimate than one
# Policy and reference MSEs closer than this count as a tie: two copies of one UNet in fp32 can differ by ~1e-7
# (other kernels for other memory layouts), which would otherwise read as a won or lost pair at step 0.
TIE_MSE = 1e-6


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class WorkerPlan:
    """What the driver works out once and every worker needs (plain values: it travels as a dict)."""

    model_path: str
    kind: str  # "sdxl" | "sd15"
    train_rows: int
    model_out: str  # URI of the final diffusers UNet folder / LoRA file
    holdout: Any = None  # ObjectRef of a numpy batch of held-apart rows, or None


# ------------------------------------------------------------------------------------------------- setup


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _optimizer(cfg: AlignConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=t.lr, scale_parameter=False, relative_step=False, weight_decay=t.weight_decay)
    # On a GPU, torch's fused AdamW: one kernel over ZeRO's flat fp32 partition (20 ms for SDXL's 2.6B parameters
    # on an H200, profiled) instead of a chain of elementwise passes.
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                             fused=device.type == "cuda")


def setup_models(cfg: AlignConfig, plan: WorkerPlan, device: torch.device):
    import deepspeed

    from pipeline.models.loader import load_components

    parts = load_components(plan.model_path, kind=plan.kind, parts=("unet", "scheduler"), device="cpu")
    unet, scheduler = parts.unet, parts.scheduler
    precision = resolve_precision(
        cfg.train.precision, cuda=device.type == "cuda",
        bf16_supported=device.type == "cuda" and torch.cuda.is_bf16_supported(),
    )
    dtype = _dtype(precision)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    reference = None
    if cfg.train.mode == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=cfg.train.lora_rank, lora_alpha=cfg.train.lora_alpha, init_lora_weights="gaussian",
                       target_modules=LORA_TARGETS)
        )
    elif cfg.loss.objective != "sft":
        reference = copy.deepcopy(unet).requires_grad_(False).eval()

    trainable = [p for p in unet.parameters() if p.requires_grad]
    ds_config = deepspeed_config(cfg.train, precision=precision, num_params=sum(p.numel() for p in unet.parameters()))
    if reference is not None:
        reference = frozen_reference(reference, ds_config, device=device, dtype=dtype)
    schedule = lambda step: lr_multiplier(  # noqa: E731
        step, warmup_steps=cfg.train.lr_warmup_steps, total_steps=cfg.train.max_steps, schedule=cfg.train.lr_schedule
    )
    optimizer = None
    unet.to(device)  # before the optimizer: a fused optimizer checks that its parameters are on the GPU
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
    return engine, reference, scheduler, dtype


def frozen_reference(reference: torch.nn.Module, ds_config: dict, *, device: torch.device, dtype: torch.dtype):
    """The frozen reference UNet in the compute dtype: under ZeRO-3 partitioned across the ranks like the policy
    (a DeepSpeed engine without optimizer, which gathers each layer's weights for its forward), else a plain copy.

    An SDXL UNet is ~5 GB in bf16; under ZeRO-3 each rank then holds 1/world of it instead of all of it. Every rank
    must run each reference forward (they already do: the loss needs every rank's rewards).
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        return reference.to(device, dtype)
    import deepspeed

    inference_config = {
        key: value for key, value in ds_config.items()
        if key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16", "fp16",
                   "steps_per_print", "wall_clock_breakdown")
    }
    zero = {k: v for k, v in ds_config["zero_optimization"].items() if k != "offload_optimizer"}  # no optimizer
    inference_config["zero_optimization"] = zero
    engine, _, _, _ = deepspeed.initialize(model=reference.to(device), config=inference_config)
    engine.eval()  # DeepSpeedEngine.eval() returns None, unlike nn.Module.eval()
    return engine


def lora_reference_mode(engine) -> Any:
    @contextlib.contextmanager
    def adapters_off():
        engine.module.disable_adapters()
        try:
            yield
        finally:
            engine.module.enable_adapters()

    return adapters_off


# -------------------------------------------------------------------------------------------------- data


def to_pair_batch(rows: dict[str, np.ndarray], *, sdxl: bool, device: torch.device, dtype: torch.dtype) -> PairBatch:
    def t(name: str, cast: torch.dtype = dtype) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(rows[name])).to(device=device, dtype=cast)

    return PairBatch(
        pair_ids=[str(p) for p in rows["pair_id"]],
        latents_w=t("latents_w"),
        latents_l=t("latents_l"),
        prompt_embeds=t("prompt_embeds"),
        pooled_prompt_embeds=t("pooled_prompt_embeds") if sdxl else None,
        add_time_ids_w=t("add_time_ids_w") if sdxl else None,
        add_time_ids_l=t("add_time_ids_l") if sdxl else None,
        clip_text=t("clip_text", torch.float32),
        clip_image_w=t("clip_image_w", torch.float32),
        clip_image_l=t("clip_image_l", torch.float32),
    )


def steps_per_epoch(cfg: AlignConfig, train_rows: int, world_size: int) -> int:
    micro = (train_rows // world_size) // cfg.train.batch_size_per_worker
    steps = micro // cfg.train.grad_accum_steps
    if steps < 1:
        raise ValueError(
            f"the feature store's {train_rows} training pairs are too few for train.batch_size_per_worker="
            f"{cfg.train.batch_size_per_worker} x train.grad_accum_steps={cfg.train.grad_accum_steps} x "
            f"{world_size} workers: lower those or add data"
        )
    return steps


def micro_batches(shard, cfg: AlignConfig, *, start_step: int, per_epoch: int) -> Iterator[tuple[int, int, dict]]:
    """(step, micro_step, rows) from `start_step` on, epoch after epoch, in an order that only depends on the seed.

    A resumed run skips the micro-batches it already trained on, so it sees exactly what an uninterrupted run sees.
    """
    accum = cfg.train.grad_accum_steps
    epoch, done_in_epoch = divmod(start_step, per_epoch)
    while True:
        batches = shard.iter_batches(
            batch_size=cfg.train.batch_size_per_worker,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=max(64, 4 * cfg.train.batch_size_per_worker),
            local_shuffle_seed=cfg.train.seed + epoch,
        )
        for index, rows in enumerate(batches):
            if index >= per_epoch * accum:
                break
            if index < done_in_epoch * accum:
                continue
            step_in_epoch, micro = divmod(index, accum)
            yield epoch * per_epoch + step_in_epoch, micro, rows
        epoch, done_in_epoch = epoch + 1, 0


# ------------------------------------------------------------------------------------------------- train


def _mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    vec = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(vec)
    return {k: v / dist.get_world_size() for k, v in zip(keys, vec.tolist())}


def _all_finite(loss: torch.Tensor) -> bool:
    import torch.distributed as dist

    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0])
    if dist.is_initialized():
        dist.all_reduce(bad)  # every rank must agree to stop, or the others hang in the next collective
    return bad.item() == 0.0


def holdout_metrics(engine, reference, reference_mode, scheduler, cfg: AlignConfig, rows, *, sdxl, dtype) -> dict:
    """Implicit preference accuracy (ties count half) and mean reward margin of the policy on held-apart pairs.

    Fixed draws per pair, so the value at step 0 (policy == reference: every reward 0, accuracy 0.5) and at the end
    are comparable. Every rank runs the whole sample: under ZeRO-3 all ranks must join each forward.
    """
    from pipeline import losses

    if rows is None:  # no held-apart pairs in the store, or evaluate.holdout_pairs=0
        return {}
    device = engine.device
    wins, margins, count = 0.0, 0.0, 0
    engine.eval()
    with torch.no_grad():
        size = cfg.train.batch_size_per_worker
        for start in range(0, len(rows["pair_id"]), size):
            chunk = {k: v[start:start + size] for k, v in rows.items()}
            batch = to_pair_batch(chunk, sdxl=sdxl, device=device, dtype=dtype)
            for k in range(HOLDOUT_DRAWS):
                d = noise_draws.draw(
                    batch.pair_ids, seed=cfg.train.seed, step=-1, micro_step=k,
                    latent_shape=tuple(batch.latents_w.shape[1:]),
                    num_train_timesteps=scheduler.config.num_train_timesteps, prompt_dropout=0.0,
                )
                n, ts = d.noise.to(device), d.timesteps.to(device)
                mse_w, mse_l = pair_mses(engine, scheduler, batch, n, ts, winners_only=False)
                with reference_mode() if reference_mode else contextlib.nullcontext():
                    ref_w, ref_l = pair_mses(reference or engine, scheduler, batch, n, ts, winners_only=False)
                r_w = losses.implicit_rewards(mse_w, ref_w, beta=cfg.loss.beta)
                r_l = losses.implicit_rewards(mse_l, ref_l, beta=cfg.loss.beta)
                gap = r_w - r_l
                tie = gap.abs() <= cfg.loss.beta / 2 * TIE_MSE
                wins += ((gap > 0) & ~tie).sum().item() + 0.5 * tie.sum().item()
                margins += gap.sum().item()
                count += len(batch.pair_ids)
    engine.train()
    if count == 0:
        return {}
    return {"holdout_accuracy": wins / count, "holdout_margin": margins / count}


def _apply_prompt_dropout(batch: PairBatch, drop: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor | None]):
    if not drop.any():
        return
    mask = drop.to(batch.prompt_embeds.device)
    batch.prompt_embeds[mask] = empty[0].to(batch.prompt_embeds.dtype)
    if batch.pooled_prompt_embeds is not None and empty[1] is not None:
        batch.pooled_prompt_embeds[mask] = empty[1].to(batch.pooled_prompt_embeds.dtype)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from pipeline.train.checkpoint import export_model, restore, save_and_report

    cfg = AlignConfig.from_dict(config["cfg"])
    plan = WorkerPlan(**config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    sdxl = plan.kind == "sdxl"

    engine, reference, scheduler, dtype = setup_models(cfg, plan, device)
    reference_mode = lora_reference_mode(engine) if cfg.train.mode == "lora" else None
    step = restore(engine, lora=cfg.train.mode == "lora")

    empty = None
    if cfg.train.prompt_dropout > 0:
        from pipeline.precompute import load_empty_prompt

        prompt, pooled = load_empty_prompt(cfg.store_uri)
        empty = (torch.as_tensor(prompt).to(device), torch.as_tensor(pooled).to(device) if sdxl else None)

    holdout = ray.get(plan.holdout) if plan.holdout is not None else None

    def evaluate() -> dict:
        return holdout_metrics(engine, reference, reference_mode, scheduler, cfg, holdout, sdxl=sdxl, dtype=dtype)

    start_holdout = evaluate() if step == 0 else {}
    if rank == 0 and start_holdout:
        print(f"[train] step 0 holdout: {_fmt(start_holdout)}", flush=True)

    per_epoch = steps_per_epoch(cfg, plan.train_rows, world)
    accum = cfg.train.grad_accum_steps
    sums: dict[str, float] = {}  # metric sums over the optimizer steps since the last log line
    window_steps, tick = 0, time.perf_counter()
    if step < cfg.train.max_steps:
        for step_now, micro, rows in micro_batches(
            ray.train.get_dataset_shard("train"), cfg, start_step=step, per_epoch=per_epoch
        ):
            batch = to_pair_batch(rows, sdxl=sdxl, device=device, dtype=dtype)
            d = noise_draws.draw(
                batch.pair_ids, seed=cfg.train.seed, step=step_now, micro_step=micro,
                latent_shape=tuple(batch.latents_w.shape[1:]),
                num_train_timesteps=scheduler.config.num_train_timesteps, prompt_dropout=cfg.train.prompt_dropout,
            )
            if empty is not None:
                _apply_prompt_dropout(batch, d.drop_prompt, empty)
            loss, metrics = preference_loss(
                engine, reference_mode, reference, scheduler, batch, d.noise.to(device), d.timesteps.to(device), cfg.loss
            )
            if not _all_finite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step_now} on pairs {batch.pair_ids} (rank {rank}); the step was not "
                    f"applied and the last checkpoint is intact. Lower train.lr or loss.beta, raise train.grad_clip "
                    f"or use train.precision=bf16/fp32, then run the same command again to resume."
                )
            engine.backward(loss)
            engine.step()
            metrics["dropped_prompts"] = d.drop_prompt.float().mean()  # share of pairs trained on the empty prompt
            for key, value in {"loss": loss.detach(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) / accum
            if micro < accum - 1:
                continue

            step, window_steps = step_now + 1, window_steps + 1
            checkpoint_now = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
            if step % cfg.train.log_every == 0 or checkpoint_now:
                now = time.perf_counter()
                elapsed = now - tick  # since the last log line, so it includes that line's report
                grad_norm = engine.get_global_grad_norm()
                logged = _mean_across_ranks({k: v / window_steps for k, v in sums.items()})
                logged.update(
                    step=step,
                    lr=engine.get_lr()[0],
                    grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                    samples_per_s=world * cfg.train.batch_size_per_worker * accum * window_steps / elapsed,
                )
                if step == cfg.train.max_steps:
                    logged.update(evaluate())
                    logged.update({f"start_{k}": v for k, v in start_holdout.items()})
                if rank == 0:
                    print(f"[train] step {step}/{cfg.train.max_steps} {_fmt(logged)}", flush=True)
                if checkpoint_now:
                    save_and_report(engine, logged, step=step, lora=cfg.train.mode == "lora")
                else:
                    ray.train.report(logged)
                sums, window_steps, tick = {}, 0, now
            if step >= cfg.train.max_steps:
                break

    export_model(engine, plan, cfg, rank=rank)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step")
