"""One preference step's maths: the denoising MSE of winner and loser under policy and reference, then the loss.

Everything here works on tensors already on the device; no Ray, no DeepSpeed. The policy is whatever callable
module DeepSpeed hands back (its forward is the UNet's), the reference either a frozen copy or, for LoRA, the same
module with its adapters switched off.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from pipeline import losses
from pipeline.config import LossConfig


@dataclass
class PairBatch:
    """A micro-batch of B preference pairs, on the device, in the compute dtype."""

    pair_ids: list[str]
    latents_w: torch.Tensor  # [B, C, h, w]
    latents_l: torch.Tensor
    prompt_embeds: torch.Tensor  # [B, 77, D]
    pooled_prompt_embeds: torch.Tensor | None  # [B, P] (SDXL) or None (SD1.5)
    add_time_ids_w: torch.Tensor | None  # [B, 6] (SDXL) or None
    add_time_ids_l: torch.Tensor | None
    clip_text: torch.Tensor  # [B, E]
    clip_image_w: torch.Tensor
    clip_image_l: torch.Tensor


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over C, H, W of the squared error, in float32 whatever the compute dtype: shape [B]."""
    return (prediction.float() - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {kind!r} is not supported; use a model trained with epsilon or v_prediction")


def unet_mse(
    unet: Callable,
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    time_ids: torch.Tensor | None,
) -> torch.Tensor:
    noisy = scheduler.add_noise(latents, noise.to(latents.dtype), timesteps)
    added = None if pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
    prediction = unet(noisy, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
    return per_sample_mse(prediction, denoising_target(scheduler, latents, noise, timesteps))


def pair_mses(
    unet: Callable, scheduler, batch: PairBatch, noise: torch.Tensor, timesteps: torch.Tensor, *, winners_only: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Winner and loser MSE from ONE forward over the stacked [winners; losers] batch (shared noise and t)."""
    if winners_only:
        mse_w = unet_mse(
            unet, scheduler, batch.latents_w, noise, timesteps, batch.prompt_embeds,
            batch.pooled_prompt_embeds, batch.add_time_ids_w,
        )
        return mse_w, None
    two = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
    mse = unet_mse(
        unet,
        scheduler,
        torch.cat([batch.latents_w, batch.latents_l]),
        torch.cat([noise, noise]),
        torch.cat([timesteps, timesteps]),
        two(batch.prompt_embeds, batch.prompt_embeds),
        two(batch.pooled_prompt_embeds, batch.pooled_prompt_embeds),
        two(batch.add_time_ids_w, batch.add_time_ids_l),
    )
    return mse.chunk(2)


def preference_loss(
    policy: Callable,
    reference_mode: Callable[[], ContextManager] | None,
    reference: Callable | None,
    scheduler,
    batch: PairBatch,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    loss_cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss and its metrics for one micro-batch.

    `reference` is a frozen module (full fine-tune), or None with `reference_mode` a context manager that turns the
    policy into the reference (LoRA: adapters disabled), so no second copy of the UNet is held.
    """
    if loss_cfg.objective == "sft":
        mse_w, _ = pair_mses(policy, scheduler, batch, noise, timesteps, winners_only=True)
        return losses.sft_loss(mse_w), {"policy_mse_w": mse_w.detach().mean()}

    mse_w, mse_l = pair_mses(policy, scheduler, batch, noise, timesteps, winners_only=False)
    with torch.no_grad(), (reference_mode() if reference_mode else contextlib.nullcontext()):
        ref_w, ref_l = pair_mses(reference or policy, scheduler, batch, noise, timesteps, winners_only=False)

    if loss_cfg.objective == "dpo":
        loss = losses.dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=loss_cfg.beta)
        r_w = losses.implicit_rewards(mse_w.detach(), ref_w, beta=loss_cfg.beta)
        r_l = losses.implicit_rewards(mse_l.detach(), ref_l, beta=loss_cfg.beta)
        metrics = losses.preference_metrics(r_w, r_l)
    else:
        loss, metrics = losses.rpo_loss_global(
            mse_w, mse_l, ref_w, ref_l, batch.clip_text, batch.clip_image_w, batch.clip_image_l,
            beta=loss_cfg.beta, alpha=loss_cfg.alpha, tau=loss_cfg.tau,
        )
    metrics = dict(metrics)
    metrics.update(
        policy_mse_w=mse_w.detach().mean(),
        policy_mse_l=mse_l.detach().mean(),
        ref_mse_w=ref_w.mean(),
        ref_mse_l=ref_l.mean(),
    )
    return loss, metrics
