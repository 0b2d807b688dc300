import torch

from pipeline.train.toy_base import ToyBaseSettings, render_toy_images, texture_map


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
