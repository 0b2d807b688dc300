"""Tiny SDXL- and SD1.5-shaped pipelines with seeded random weights, built offline.

Tests and laptop runs need a real diffusers pipeline folder without a hub download. These factories build every
component from a config (the real models' block types, conditioning and schedules; a UNet of about 1M parameters,
text encoders that keep CLIP's 49,408-token vocabulary and 77 positions) and save it with the pipeline's own
`save_pretrained`, so everything downstream loads it exactly like `stabilityai/stable-diffusion-xl-base-1.0` or an
SD1.5 checkpoint.

Tokenizers come from open_clip's bundled BPE file (the vocabulary of OpenAI's CLIP that SDXL and SD1.5 use):
`vocab.json` and `merges.txt` are generated from it, so token ids match open_clip's tokenizer.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 77
VOCAB_SIZE = 49408
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"

# Sizes of the tiny SDXL text side. They differ on purpose, so a swapped encoder order or a pooled vector taken
# from the wrong encoder fails on shapes instead of passing silently.
SDXL_HIDDEN_1, SDXL_HIDDEN_2, SDXL_POOLED = 32, 64, 40
ADDITION_TIME_EMBED_DIM = 8  # SDXL: 256; six micro-conditioning ints are embedded at this width each
SD15_HIDDEN = 32

# The noise schedule of SDXL and SD1.5 (training's DDPMScheduler reads it back from the scheduler folder).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
)


def build_tiny_sdxl(out_dir: str | os.PathLike, *, seed: int = 0, toy_fit_steps: int = 0, toy_fit_resolution: int = 64) -> Path:
    """Write a tiny SDXL-shaped `StableDiffusionXLPipeline` folder to `out_dir` (returned as is if complete).

    With `toy_fit_steps` > 0 the UNet is then fitted to the toy world at `toy_fit_resolution` (see toy_fit.py)
    before the folder appears, so a half-fitted model is never used."""
    return _build_once(Path(out_dir), lambda tmp: _save_tiny_sdxl(tmp, seed), kind="sdxl", seed=seed,
                       toy_fit_steps=toy_fit_steps, toy_fit_resolution=toy_fit_resolution)


def build_tiny_sd15(out_dir: str | os.PathLike, *, seed: int = 0, toy_fit_steps: int = 0, toy_fit_resolution: int = 64) -> Path:
    """Write a tiny SD1.5-shaped `StableDiffusionPipeline` folder to `out_dir` (returned as is if complete); the
    toy fit as for `build_tiny_sdxl`."""
    return _build_once(Path(out_dir), lambda tmp: _save_tiny_sd15(tmp, seed), kind="sd15", seed=seed,
                       toy_fit_steps=toy_fit_steps, toy_fit_resolution=toy_fit_resolution)


def _build_once(out_dir: Path, save, *, kind: str, seed: int, toy_fit_steps: int, toy_fit_resolution: int) -> Path:
    """Build into a sibling temp folder and rename it into place, so a crash never leaves a half-written pipeline
    and concurrent builders (several Ray workers) end up with one complete folder."""
    if (out_dir / "model_index.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.building-{uuid.uuid4().hex}"
    try:
        save(tmp)
        if toy_fit_steps > 0:
            from pipeline.models.toy_fit import fit_unet_to_toy_world

            fit_unet_to_toy_world(tmp, kind=kind, steps=toy_fit_steps, resolution=toy_fit_resolution, seed=seed)
        try:
            os.replace(tmp, out_dir)  # atomic; also replaces an empty out_dir
        except OSError:
            if not (out_dir / "model_index.json").is_file():  # else another process finished first: use theirs
                raise RuntimeError(
                    f"Could not build the tiny pipeline at {out_dir}: the folder exists but has no "
                    f"model_index.json. Delete it (or choose another folder) and run again."
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_tiny_sdxl(folder: Path, seed: int) -> None:
    text_encoder = _seeded(seed, 1, lambda: CLIPTextModel(_text_config(SDXL_HIDDEN_1, hidden_act="quick_gelu")))
    text_encoder_2 = _seeded(
        seed,
        2,
        lambda: CLIPTextModelWithProjection(
            _text_config(SDXL_HIDDEN_2, hidden_act="gelu", projection_dim=SDXL_POOLED)
        ),
    )
    unet = _seeded(
        seed,
        3,
        lambda: _unet(
            cross_attention_dim=SDXL_HIDDEN_1 + SDXL_HIDDEN_2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + SDXL_POOLED,
        ),
    )
    vae = _seeded(seed, 4, lambda: _vae(scaling_factor=0.13025))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        # As in SDXL: the second tokenizer pads with "!" (id 0, open_clip's padding), which also turns a "!" in a
        # prompt into padding (diffusers issue #4153); the first pads with the end token.
        tokenizer=_tokenizer(folder / "tokenizer", pad_token=EOS_TOKEN),
        tokenizer_2=_tokenizer(folder / "tokenizer_2", pad_token="!"),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**NOISE_SCHEDULE, interpolation_type="linear", use_karras_sigmas=False),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _save_tiny_sd15(folder: Path, seed: int) -> None:
    text_encoder = _seeded(seed, 1, lambda: CLIPTextModel(_text_config(SD15_HIDDEN, hidden_act="quick_gelu")))
    unet = _seeded(seed, 3, lambda: _unet(cross_attention_dim=SD15_HIDDEN, use_linear_projection=False))
    vae = _seeded(seed, 4, lambda: _vae(scaling_factor=0.18215))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(folder / "tokenizer", pad_token=EOS_TOKEN),
        unet=unet,
        scheduler=PNDMScheduler(**NOISE_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def _seeded(seed: int, component: int, make):
    """Create a module under its own seed, leaving the caller's RNG untouched; one seed per component keeps each
    component's weights independent of the others' sizes."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + component)
        return make()


def _text_config(hidden_size: int, *, hidden_act: str, projection_dim: int | None = None) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_TOKENS,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,  # SDXL reads the penultimate layer, so there must be two
        num_attention_heads=4,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _unet(*, cross_attention_dim: int, use_linear_projection: bool, **conditioning) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=use_linear_projection,
        norm_num_groups=32,
        **conditioning,
    )


def _vae(*, scaling_factor: float) -> AutoencoderKL:
    # Four blocks downsample three times: 8x, like the real VAEs, so latent sizes match resolution / 8.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def _tokenizer(folder: Path, *, pad_token: str) -> CLIPTokenizer:
    """CLIP's tokenizer from open_clip's BPE file, via the vocab.json + merges.txt pair every transformers
    version reads (they stay in the saved folder next to the tokenizer.json that save_pretrained adds)."""
    write_clip_vocab(folder)
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS, pad_token=pad_token)


def write_clip_vocab(folder: Path) -> None:
    """Write `vocab.json` and `merges.txt` for OpenAI CLIP's BPE (49,408 tokens) from open_clip's bundled file.

    Ids follow open_clip's SimpleTokenizer: the 256 byte symbols, the same with the end-of-word mark `</w>`, one
    token per merge in rank order, then the start and end tokens (49406, 49407).
    """
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # Line 0 is a header; CLIP keeps just enough merges for a vocabulary of 49,408.
    num_merges = VOCAB_SIZE - 2 * 256 - 2
    merges = lines[1 : 1 + num_merges]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
