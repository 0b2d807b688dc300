"""One preference step's maths: the denoising MSE of winner and loser under policy and reference, then the loss.

Everything here works on tensors already on the device; no Ray, no DeepSpeed. The policy is whatever callable
module DeepSpeed hands back (its forward is the UNet's), the reference a `pipeline.train.reference.Reference`
(a frozen copy, a ZeRO-3 engine, or for LoRA the same module with its adapters switched off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    s_text: torch.Tensor | None = None  # [B, N] rows of a batch plan's global similarity matrices, or None
    s_image: torch.Tensor | None = None


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


@dataclass
class PairMSEs:
    """Denoising MSEs [B] of a micro-batch's winners and losers under the policy and the reference."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor | None  # None: winners only (sft)
    ref_w: torch.Tensor | None  # None without a reference (sft)
    ref_l: torch.Tensor | None


def policy_and_reference_mses(
    policy: Callable, reference: Callable | None, scheduler, batch: PairBatch, noise: torch.Tensor,
    timesteps: torch.Tensor, *, winners_only: bool = False,
) -> PairMSEs:
    """One stacked policy forward (with gradients where the caller has them on), then, unless `winners_only`,
    the reference's forward on the same inputs without gradients (`reference` None: the policy stands in, so
    every reward is 0, as sft's holdout shows)."""
    if winners_only:
        mse_w, _ = pair_mses(policy, scheduler, batch, noise, timesteps, winners_only=True)
        return PairMSEs(mse_w, None, None, None)
    mse_w, mse_l = pair_mses(policy, scheduler, batch, noise, timesteps, winners_only=False)
    with torch.no_grad():
        ref_w, ref_l = pair_mses(reference or policy, scheduler, batch, noise, timesteps, winners_only=False)
    return PairMSEs(mse_w, mse_l, ref_w, ref_l)


def pair_rewards(m: PairMSEs, *, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards of winners and losers (detached): what both DPO's and RPO's losses compare."""
    return (losses.implicit_rewards(m.policy_w.detach(), m.ref_w, beta=beta),
            losses.implicit_rewards(m.policy_l.detach(), m.ref_l, beta=beta))


def objective_loss(loss_cfg: LossConfig, m: PairMSEs, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective (rpo, dpo, sft) over a micro-batch's MSEs: the loss and its metrics (device tensors)."""
    if loss_cfg.objective == "sft":
        return losses.sft_loss(m.policy_w), {"policy_mse_w": m.policy_w.detach().mean()}
    if loss_cfg.objective == "dpo":
        loss = losses.dpo_loss(m.policy_w, m.policy_l, m.ref_w, m.ref_l, beta=loss_cfg.beta)
        metrics = losses.preference_metrics(*pair_rewards(m, beta=loss_cfg.beta))
    else:
        loss, metrics = losses.rpo_loss_global(
            m.policy_w, m.policy_l, m.ref_w, m.ref_l, batch.clip_text, batch.clip_image_w, batch.clip_image_l,
            beta=loss_cfg.beta, alpha=loss_cfg.alpha, tau=loss_cfg.tau, s_text=batch.s_text, s_image=batch.s_image,
        )
    metrics = dict(metrics)
    metrics.update(
        policy_mse_w=m.policy_w.detach().mean(),
        policy_mse_l=m.policy_l.detach().mean(),
        ref_mse_w=m.ref_w.mean(),
        ref_mse_l=m.ref_l.mean(),
    )
    return loss, metrics


def preference_loss(
    policy: Callable,
    reference: Callable | None,
    scheduler,
    batch: PairBatch,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    loss_cfg: LossConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective's loss and its metrics for one micro-batch.

    `reference` is a `pipeline.train.reference.Reference` (a frozen copy, a ZeRO-3 engine, or the policy with its
    LoRA adapters off) or any module called without gradients; None for sft.
    """
    m = policy_and_reference_mses(policy, reference, scheduler, batch, noise, timesteps,
                                  winners_only=loss_cfg.objective == "sft")
    return objective_loss(loss_cfg, m, batch)


def apply_prompt_dropout(batch: PairBatch, drop: torch.Tensor, empty: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Swap in the empty prompt's embeddings for the pairs where `drop` [B] (bool, on the batch's device) is set.

    `torch.where`, not boolean indexing: indexing with a mask on a GPU asks the host how many rows are set (a sync).
    """
    batch.prompt_embeds = torch.where(drop[:, None, None], empty[0].to(batch.prompt_embeds.dtype), batch.prompt_embeds)
    if batch.pooled_prompt_embeds is not None and empty[1] is not None:
        batch.pooled_prompt_embeds = torch.where(
            drop[:, None], empty[1].to(batch.pooled_prompt_embeds.dtype), batch.pooled_prompt_embeds)
