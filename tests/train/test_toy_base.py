import torch
import torch.nn.functional as F

from pipeline.precompute.stages import vae_input
from pipeline.train.toy_base import (
    ToyBaseSettings,
    build_toy_base,
    encode_latents,
    render_toy_images,
    texture_map,
    toy_vae,
)


def test_texture_map_sees_busy_patches_and_not_flat_ones():
    flat = torch.zeros(1, 3, 16, 16)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1.0  # +-1 alternating
    busy = checker.expand(1, 3, 16, 16)
    assert torch.equal(texture_map(flat), torch.zeros(1, 1, 3, 3))
    assert texture_map(busy).min() > 3.9  # |dx| + |dy| = 2 + 2 everywhere


def test_renders_come_in_every_style_with_one_caption_per_scene():
    pixels, captions, styles = render_toy_images(scenes=3, resolution=32)
    assert pixels.shape == (9, 32, 32, 3) and pixels.dtype.name == "uint8"
    assert styles[:3] == ["flat", "sketch", "dots"] and captions[0] == captions[1] == captions[2]


def test_the_tag_names_the_settings_that_change_the_weights():
    assert ToyBaseSettings().tag() != ToyBaseSettings(unet_steps=10).tag()
    assert ToyBaseSettings().tag() != ToyBaseSettings(seed=1).tag()


def test_a_fresh_toy_vae_keeps_colours_as_8x8_averages():
    pixels, _, _ = render_toy_images(scenes=2, resolution=64)
    images = vae_input(pixels)
    torch.manual_seed(0)
    vae = toy_vae(ToyBaseSettings())
    latents = encode_latents(vae, images, scaling_factor=1.0)
    assert torch.allclose(latents[:, :3], F.avg_pool2d(images, 8), atol=0.01)  # colour lane: within 1%
    with torch.no_grad():
        decoded = vae.decode(latents).sample
    assert torch.allclose(decoded, F.interpolate(F.avg_pool2d(images, 8), scale_factor=8), atol=0.03)


def test_build_toy_base_writes_a_diffusers_pipeline_once(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    settings = ToyBaseSettings(scenes=2, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2)
    folder = build_toy_base(tmp_path / "base", settings)
    marker = tmp_path / "base" / "toy_base.json"
    written = marker.stat().st_mtime_ns
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle in the top left on a pink background", height=64, width=64, num_inference_steps=2,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert build_toy_base(tmp_path / "base", settings) == folder and marker.stat().st_mtime_ns == written
