"""Noise, timesteps and prompt-dropout draws derived from (seed, step, pair_id).

Every random draw of a training step is a pure function of the run's seed, the optimizer step, the micro-step and
the pair's id. A resumed run, a restarted worker or a different worker count therefore draws exactly what an
uninterrupted run draws for the same pair at the same step: no RNG state has to be checkpointed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def pair_seed(seed: int, step: int, micro_step: int, pair_id: str) -> int:
    """A 63-bit seed for one pair at one (step, micro_step)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{micro_step}:{pair_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Draws:
    noise: torch.Tensor  # [B, C, h, w] float32, shared by the pair's winner and loser
    timesteps: torch.Tensor  # [B] int64, shared by the pair's winner and loser
    drop_prompt: torch.Tensor  # [B] bool: replace this pair's prompt with the empty prompt


def draw(
    pair_ids: list[str],
    *,
    seed: int,
    step: int,
    micro_step: int,
    latent_shape: tuple[int, ...],
    num_train_timesteps: int,
    prompt_dropout: float,
) -> Draws:
    noise, timesteps, drop = [], [], []
    for pair_id in pair_ids:
        gen = torch.Generator().manual_seed(pair_seed(seed, step, micro_step, pair_id))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=gen))
        noise.append(torch.randn(latent_shape, generator=gen))
        drop.append(torch.rand(1, generator=gen) < prompt_dropout)
    return Draws(torch.stack(noise), torch.cat(timesteps), torch.cat(drop))


def draw_for_batch(
    pair_ids: list[str],
    latents: torch.Tensor,
    *,
    seed: int,
    step: int,
    micro_step: int,
    num_train_timesteps: int,
    prompt_dropout: float,
) -> Draws:
    """`draw` for a micro-batch whose latents [B, C, h, w] are on the device: the draws land there too (the noise in
    float32), copied from pinned memory without waiting for the device on a GPU. The worker and the benches use it."""
    d = draw(pair_ids, seed=seed, step=step, micro_step=micro_step, latent_shape=tuple(latents.shape[1:]),
             num_train_timesteps=num_train_timesteps, prompt_dropout=prompt_dropout)
    device = latents.device
    return Draws(to_device(d.noise, device), to_device(d.timesteps, device), to_device(d.drop_prompt, device))


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor on `device`: on a GPU through pinned memory and a non-blocking copy, since a plain copy from
    pageable memory makes PyTorch wait for all the device's queued work first; the dtype cast runs on the device."""
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    else:
        t = t.to(device)
    return t if dtype is None else t.to(dtype)
