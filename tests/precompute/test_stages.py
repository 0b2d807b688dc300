"""The precompute stages on their own: resize/crop worked by hand, decoding with bad bytes, the encoder actors'
classes called directly on the tiny models (no Ray)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.tiny import build_tiny_sd15
from pipeline.precompute.stages import (
    EncoderSpec,
    ImageEncoder,
    TextEncoder,
    decode_batch,
    in_fixed_chunks,
    prepare_image,
    vae_input,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _quarters(width: int, height: int, *, vertical: bool) -> Image.Image:
    """Four bands of colour, side by side (or stacked when ``vertical``)."""
    image = Image.new("RGB", (width, height))
    for k, colour in enumerate((RED, GREEN, BLUE, WHITE)):
        start, end = k * (height if vertical else width) // 4, (k + 1) * (height if vertical else width) // 4
        box = (0, start, width, end) if vertical else (start, 0, end, height)
        image.paste(colour, box)
    return image


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_wide_image_resized_by_its_short_side_and_centre_cropped():
    # 80x40 -> 64x32: bands at x 0-16-32-48-64; the crop [16, 48) keeps green then blue.
    prepared = prepare_image(_quarters(80, 40, vertical=False), 32)
    assert prepared.pixels.shape == (32, 32, 3) and prepared.pixels.dtype == np.uint8
    assert prepared.original_size == (40, 80) and prepared.crop_top_left == (0, 16)
    assert tuple(prepared.pixels[16, 4]) == GREEN and tuple(prepared.pixels[16, 27]) == BLUE


def test_tall_image_cropped_from_the_middle():
    # 40x100 -> 32x80: bands at y 0-20-40-60-80; crop top = (80 - 32) / 2 = 24 keeps rows 24..55: green, blue.
    prepared = prepare_image(_quarters(40, 100, vertical=True), 32)
    assert prepared.original_size == (100, 40) and prepared.crop_top_left == (24, 0)
    assert tuple(prepared.pixels[5, 16]) == GREEN and tuple(prepared.pixels[25, 16]) == BLUE


def test_vae_input_range_and_layout():
    pixels = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    pixels[0, 0, 1] = (255, 0, 128)
    x = vae_input(pixels)
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    assert x[0, :, 0, 1].tolist() == pytest.approx([1.0, -1.0, 128 / 127.5 - 1], abs=1e-6)
    assert x[0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]


def test_decode_batch_marks_bad_images_and_never_raises():
    good = _png(_quarters(40, 40, vertical=False))
    batch = {"image_hash": np.array(["g", "t", "x"], dtype=object),
             "image": np.array([good, good[:60], b"no image"], dtype=object)}
    out = decode_batch(batch, resolution=32, max_image_pixels=10_000)
    assert out["reason"].tolist() == ["", "truncated_image", "undecodable_image"]
    assert out["detail"][1] and out["detail"][2]
    assert np.array_equal(out["pixels"][0], prepare_image(Image.open(io.BytesIO(good)), 32).pixels)
    assert not out["pixels"][1:].any() and out["original_height"].tolist() == [40, 0, 0]
    bomb = decode_batch(batch, resolution=32, max_image_pixels=100)  # 40x40 declares more than 100 pixels
    assert bomb["reason"][0] == "decompression_bomb"


def _spec(model_path, resolution=32, kind="sdxl", batch_size=4) -> EncoderSpec:
    return EncoderSpec(model_path=str(model_path), kind=kind, revision=None, variant=None, clip_model="tiny",
                       clip_pretrained="random", resolution=resolution, use_gpu=False, batch_size=batch_size)


def test_image_encoder_encodes_good_rows_and_passes_bad_ones_through(world):
    good = _png(_quarters(48, 64, vertical=True))
    decoded = decode_batch({"image_hash": np.array(["a", "b"], dtype=object),
                            "image": np.array([good, b"broken"], dtype=object)}, resolution=32, max_image_pixels=10**6)
    rows = ImageEncoder(_spec(world.model_path))(decoded).to_pylist()
    assert rows[1]["latents"] is None and rows[1]["clip_image"] is None and rows[1]["reason"] == "undecodable_image"
    assert rows[0]["reason"] == "" and rows[0]["latent_shape"] == [4, 4, 4] and len(rows[0]["latents"]) == 64
    assert rows[0]["add_time_ids"] == [64, 48, 5, 0, 32, 32]  # 48x64 -> 32x42 (truncated), top = (42 - 32) / 2
    assert np.linalg.norm(rows[0]["clip_image"]) == pytest.approx(1.0, abs=1e-5)


def test_text_encoder_sd15_has_no_pooled_embedding(tmp_path):
    encoder = TextEncoder(_spec(build_tiny_sd15(tmp_path / "sd15"), kind="sd15"))
    captions = np.array(["a cat", ""], dtype=object)
    rows = encoder({"caption_hash": np.array(["h1", "h2"], dtype=object), "caption": captions})
    first = rows.to_pylist()[0]
    assert first["pooled_prompt_embeds"] == [] and first["prompt_embeds_shape"][0] == 77
    assert len(first["prompt_embeds"]) == 77 * first["prompt_embeds_shape"][1]
    assert np.linalg.norm(first["clip_text"]) == pytest.approx(1.0, abs=1e-5)
    assert rows.column("caption").to_pylist() == ["a cat", ""]


def test_in_fixed_chunks_pads_every_call_to_the_size_and_trims():
    calls = []

    def encode(chunk):
        calls.append(list(chunk))
        return np.array(chunk) * 10, None

    out = in_fixed_chunks(encode, [1, 2, 3, 4, 5], 2)
    assert calls == [[1, 2], [3, 4], [5, 5]]
    assert [o[0].tolist() for o in out] == [[10, 20], [30, 40], [50]] and all(o[1] is None for o in out)
    assert in_fixed_chunks(encode, [], 2) == []


def test_encoders_give_a_row_the_same_values_whatever_else_is_in_its_batch(world):
    """Fixed-size model calls: a caption or image alone, or among others (more than one chunk), encodes the same,
    bit for bit."""
    text = TextEncoder(_spec(world.model_path, batch_size=2))
    captions = ["a red circle", "a blue square", "a green diamond"]
    alone = text({"caption_hash": np.array(["h"], dtype=object), "caption": np.array(captions[:1], dtype=object)})
    mixed = text({"caption_hash": np.array(["h1", "h2", "h3"], dtype=object), "caption": np.array(captions, dtype=object)})
    for column in ("prompt_embeds", "pooled_prompt_embeds", "clip_text"):
        assert alone.column(column)[0].as_py() == mixed.column(column)[0].as_py()
    pngs = [_png(_quarters(40, 40, vertical=v)) for v in (True, False, True)]
    decode = lambda images: decode_batch({"image_hash": np.array(["a", "b", "c"][: len(images)], dtype=object),  # noqa: E731
                                          "image": np.array(images, dtype=object)}, resolution=32, max_image_pixels=10**6)
    image = ImageEncoder(_spec(world.model_path, batch_size=2))
    one = image(decode(pngs[1:2])).to_pylist()[0]
    among = image(decode(pngs)).to_pylist()[1]
    assert one["latents"] == among["latents"] and one["clip_image"] == among["clip_image"]
