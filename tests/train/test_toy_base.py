import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.toy import FIT_THREADS
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


def test_the_fit_is_the_same_whatever_threads_the_process_runs(tmp_path):
    """The fit runs at FIT_THREADS whatever torch was set to: at 1 and 2 threads it gave other weights before."""
    from pipeline.train.toy_base import weights_digest

    settings = ToyBaseSettings(scenes=4, vae_steps=6, vae_batch=4, unet_steps=6, unet_batch=4)
    before = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            folder = build_toy_base(tmp_path / f"threads{threads}", settings, use_shipped=False)
            assert torch.get_num_threads() == threads  # restored after the fit
            digests.append((weights_digest(tmp_path / f"threads{threads}" / "vae"),
                            weights_digest(tmp_path / f"threads{threads}" / "unet")))
    finally:
        torch.set_num_threads(before)
    assert digests[0] == digests[1]
    record = json.loads((Path(folder) / "toy_base.json").read_text())
    assert record["threads"] == FIT_THREADS and record["weights"]["unet"] == digests[1][1]


def test_the_default_toy_base_is_the_shipped_fit_checked_weight_for_weight(tmp_path, capsys):
    from pipeline.train.toy_base import shipped_toy_base, weights_digest

    shipped = shipped_toy_base(ToyBaseSettings())
    assert shipped is not None, "pipeline/assets has no toy base for the default settings: run bench/toy_assets.py --write"
    folder = Path(build_toy_base(tmp_path / "base"))
    assert "the fit shipped in pipeline/assets/" in capsys.readouterr().out
    record = json.loads((shipped / "toy_base.json").read_text())
    assert weights_digest(folder / "unet") == record["weights"]["unet"]
    assert weights_digest(folder / "vae") == record["weights"]["vae"]
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    # A damaged shipped file is refused, never used
    damaged = tmp_path / "damaged"
    shutil.copytree(shipped, damaged)
    from safetensors.torch import load_file, save_file

    weights = damaged / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 1
    save_file(state, weights)
    from pipeline.models.tiny import build_tiny_sdxl
    from pipeline.train.toy_base import install_shipped

    fresh = build_tiny_sdxl(tmp_path / "fresh")
    with pytest.raises(ValueError, match="restore the folder from git"):
        install_shipped(damaged, fresh)
