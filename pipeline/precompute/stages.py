"""The Ray Data stages of precompute: decode + resize/crop (CPU tasks) and the encoder actors.

Images and captions are separate datasets (each unique image and caption is encoded once), so there are two
actor classes, one per dataset, and each holds every encoder that reads its input:

- ``ImageEncoder``: VAE + CLIP image tower, over decoded, resized and cropped images;
- ``TextEncoder``: the pipeline's text encoder(s) + CLIP text tower, over captions.

One actor per input kind rather than one stage per model: fewer model copies and actor processes (each costs a
process start, ~7 s of imports here, and the models' memory), and the pixels are decoded once and travel once to
the actor that uses them. Separate VAE and CLIP stages could overlap the two models, at the price of a second
actor pool and of shipping every crop twice.

VAE latents are the posterior MEAN times the VAE's scaling factor, not a sample. Diffusion-DPO's and diffusers'
SDXL trainers call ``latent_dist.sample()`` on the fly, but a store is written once: a frozen sample is just one
fixed draw, no augmentation, and the SD VAEs' posterior standard deviation is tiny next to the mean. The mean
makes the store deterministic: the same rows give the same values on every run, so incremental runs add rows
consistent with the old ones and the store can be checked against a direct computation.

Every model call gets exactly ``EncoderSpec.batch_size`` inputs: a short chunk (a mixed batch's share of captions or
images, the rows left after bad images, the last batch) is padded by repeating its last input and the padding's
outputs are dropped. One input shape per model keeps the actor's memory flat: oneDNN and the allocator keep
buffers per shape, and with the varying chunk sizes of mixed batches an encoder actor grew by about 12% from 2k to
32k pairs (measured, bench/data_scale.py). It also makes a row's values independent of how Ray Data batched it
(another batch size may pick another CPU kernel and move a value by one float16 step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.data.images import BadImage, decode_image
from pipeline.models.clip import ClipEmbedder
from pipeline.models.loader import load_components
from pipeline.models.text import encode_prompts, sdxl_add_time_ids
from pipeline.precompute.store import images_rows, texts_rows


@dataclass(frozen=True)
class PreparedImage:
    pixels: np.ndarray  # uint8 [R, R, 3] RGB, the training crop
    original_size: tuple[int, int]  # (height, width) as decoded
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image, as SDXL's trainer records it


def prepare_image(image: Image.Image, resolution: int) -> PreparedImage:
    """Resize the shorter side to ``resolution`` (bilinear), then centre-crop a square, as SDXL training does."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)  # truncated, as torchvision's Resize does
    new_size = (resolution, new_long) if width <= height else (new_long, resolution)
    resized = image.convert("RGB").resize(new_size, Image.Resampling.BILINEAR)
    top = int(round((resized.height - resolution) / 2.0))
    left = int(round((resized.width - resolution) / 2.0))
    crop = resized.crop((left, top, left + resolution, top + resolution))
    return PreparedImage(np.asarray(crop, dtype=np.uint8), (height, width), (top, left))


def vae_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def decode_batch(batch: dict[str, np.ndarray], *, resolution: int, max_image_pixels: int) -> dict[str, np.ndarray]:
    """CPU task: encoded bytes -> training crops. A bad image never raises: it gets a ``reason`` and zero pixels."""
    n = len(batch["image_hash"])
    out = {
        "image_hash": batch["image_hash"],
        "pixels": np.zeros((n, resolution, resolution, 3), dtype=np.uint8),
        "original_height": np.zeros(n, dtype=np.int32),
        "original_width": np.zeros(n, dtype=np.int32),
        "crop_top": np.zeros(n, dtype=np.int32),
        "crop_left": np.zeros(n, dtype=np.int32),
        "reason": np.full(n, "", dtype=object),
        "detail": np.full(n, "", dtype=object),
    }
    for i, data in enumerate(batch["image"]):
        try:
            prepared = prepare_image(decode_image(data, max_image_pixels=max_image_pixels), resolution)
        except BadImage as err:
            out["reason"][i], out["detail"][i] = err.reason, err.detail
            continue
        out["pixels"][i] = prepared.pixels
        out["original_height"][i], out["original_width"][i] = prepared.original_size
        out["crop_top"][i], out["crop_left"][i] = prepared.crop_top_left
    return out


def encoder_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu else "cpu")


@dataclass(frozen=True)
class EncoderSpec:
    """What every encoder actor needs to load its models (plain values: Ray ships it to each actor)."""

    model_path: str
    kind: str  # "sdxl" | "sd15", resolved by the driver
    revision: str | None
    variant: str | None
    clip_model: str
    clip_pretrained: str
    resolution: int
    use_gpu: bool
    batch_size: int  # inputs per model call, always (see the module docstring)


def in_fixed_chunks(encode, inputs: Sequence, size: int) -> list:
    """``encode`` applied to ``inputs`` in chunks of exactly ``size`` (the last padded by repeating its last input);
    the list of per-chunk results, each trimmed to its real inputs (``encode`` returns an array, a tensor, or a
    tuple of them, or of None, with the inputs along the first axis)."""
    results = []
    for start in range(0, len(inputs), size):
        chunk = list(inputs[start:start + size])
        real = len(chunk)
        out = encode(chunk + [chunk[-1]] * (size - real))
        trim = lambda x: None if x is None else x[:real]  # noqa: E731
        results.append(tuple(trim(x) for x in out) if isinstance(out, tuple) else trim(out))
    return results


def load_encoders(spec: EncoderSpec, parts: tuple[str, ...]):
    """(device, the pipeline `parts` in float32, the CLIP embedder) for one encoder actor.

    float32 throughout: SDXL's VAE overflows in float16, and the store keeps the embeddings in float16 anyway.
    """
    device = encoder_device(spec.use_gpu)
    components = load_components(
        spec.model_path, kind=spec.kind, parts=parts, dtype=torch.float32, device=device,
        revision=spec.revision, variant=spec.variant,
    )
    return device, components, ClipEmbedder(spec.clip_model, spec.clip_pretrained, device=str(device))


class ImageEncoder:
    """Actor: decoded crops -> rows of the images table (bad rows pass through with their reason, no features)."""

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.device, parts, self.clip = load_encoders(spec, ("vae",))
        self.vae = parts.vae.requires_grad_(False)

    @torch.no_grad()
    def latents(self, pixels: np.ndarray) -> np.ndarray:
        posterior = self.vae.encode(vae_input(pixels).to(self.device)).latent_dist
        return (posterior.mean * self.vae.config.scaling_factor).float().cpu().numpy().astype(np.float16)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        good = np.flatnonzero(batch["reason"] == "")
        n, res = len(batch["image_hash"]), self.spec.resolution
        latents: list[np.ndarray | None] = [None] * n
        clip: list[np.ndarray | None] = [None] * n
        time_ids: list[list[int] | None] = [None] * n
        if len(good):
            pixels, size = batch["pixels"][good], self.spec.batch_size
            good_latents = np.concatenate(in_fixed_chunks(lambda chunk: self.latents(np.stack(chunk)), pixels, size))
            good_clip = np.concatenate(in_fixed_chunks(
                lambda chunk: self.clip.embed_images([Image.fromarray(p) for p in chunk]).numpy(), pixels, size))
            for j, i in enumerate(good):
                latents[i], clip[i] = good_latents[j], good_clip[j]
                time_ids[i] = sdxl_add_time_ids(
                    (int(batch["original_height"][i]), int(batch["original_width"][i])),
                    (int(batch["crop_top"][i]), int(batch["crop_left"][i])),
                    (res, res),
                )
        return images_rows(
            list(batch["image_hash"]),
            latents,
            clip,
            list(zip(batch["original_height"].tolist(), batch["original_width"].tolist())),
            list(zip(batch["crop_top"].tolist(), batch["crop_left"].tolist())),
            time_ids,
            list(batch["reason"]),
            list(batch["detail"]),
        )


class TextEncoder:
    """Actor: captions -> rows of the texts table (prompt embeddings as the diffusers pipelines make them)."""

    def __init__(self, spec: EncoderSpec):
        self.spec = spec
        self.device, parts, self.clip = load_encoders(spec, ("text",))
        self.text_encoders = [encoder.requires_grad_(False) for encoder in parts.text_encoders]
        self.tokenizers = parts.tokenizers

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        captions = [str(c) for c in batch["caption"]]
        size = self.spec.batch_size
        encoded = in_fixed_chunks(lambda chunk: encode_prompts(
            self.text_encoders, self.tokenizers, chunk, kind=self.spec.kind, device=self.device), captions, size)
        prompt = torch.cat([p for p, _ in encoded])
        pooled = None if encoded[0][1] is None else torch.cat([q for _, q in encoded])
        clip_text = np.concatenate(in_fixed_chunks(lambda chunk: self.clip.embed_texts(chunk).numpy(), captions, size))
        pooled_np = (
            pooled.float().cpu().numpy().astype(np.float16) if pooled is not None
            else np.zeros((len(captions), 0), dtype=np.float16)  # SD1.5 has no pooled embedding
        )
        return texts_rows(
            list(batch["caption_hash"]),
            captions,
            prompt.float().cpu().numpy().astype(np.float16),
            pooled_np,
            clip_text,
        )
