"""Refit the toy world's shipped models, check them against the shipped ones, and measure the toy base.

    .venv/bin/python bench/toy_assets.py            # refit both, compare with pipeline/assets, measure (~8 min)
    .venv/bin/python bench/toy_assets.py --write    # ... and write the refits into pipeline/assets

The embedded default (`model.pretrained=toy`, `model.clip_pretrained=toy`) starts from fits shipped in
pipeline/assets/ (the toy base's UNet and VAE, the toy CLIP's weights), so every machine starts from the same
weights. This is the command that makes them: it fits both from scratch exactly as a run without the shipped files
would (pipeline.train.toy_base.build_toy_base, pipeline.data.toy_clip.toy_clip_weights, at FIT_THREADS threads)
and prints whether each refit equals the shipped file, weight for weight. Then it measures the toy base:
reconstructions of held-out renders by its VAE (L1 per style, and whether the style scorer still classifies them
as drawn), and samples of the plain diffusers StableDiffusionXLPipeline (style shares at guidance 4). Writes
bench/results/toy/toy_base.json, vae_reconstructions.png (renders above, reconstructions below) and
base_samples.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data.toy import ASSETS, STYLES, classify_style, fixed_threads  # noqa: E402
from pipeline.data.toy_clip import ToyClipSettings, toy_clip_weights  # noqa: E402
from pipeline.train.toy_base import (  # noqa: E402
    ToyBaseSettings,
    build_toy_base,
    encode_latents,
    render_toy_images,
    shipped_toy_base,
)

HELD_OUT_SEED = 4_000_037  # neither the fit's scenes nor a preference set's
RESULTS = ROOT / "bench" / "results" / "toy"


def refit(work: Path) -> dict:
    """Both fits from scratch under `work`; their records and whether each equals the shipped one."""
    base_settings, clip_settings = ToyBaseSettings(), ToyClipSettings()
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    base = Path(build_toy_base(work / f"toy_base_{base_settings.tag()}", base_settings, use_shipped=False))
    base_seconds = time.perf_counter() - started
    started = time.perf_counter()
    clip = toy_clip_weights(work / "toy_clip", clip_settings, use_shipped=False)
    clip_seconds = time.perf_counter() - started
    base_record = json.loads((base / "toy_base.json").read_text())
    clip_record = json.loads(clip.with_suffix(".json").read_text())
    shipped_base = shipped_toy_base(base_settings)
    shipped_clip = ASSETS / clip.name
    shipped_base_weights = json.loads((shipped_base / "toy_base.json").read_text())["weights"] if shipped_base else None
    shipped_clip_weights = (json.loads(shipped_clip.with_suffix(".json").read_text())["weights"]
                            if shipped_clip.is_file() else None)
    # equals_shipped: against the files shipped before this run (None: none were shipped)
    return {
        "base": {"folder": base, "record": base_record, "seconds": round(base_seconds, 1),
                 "equals_shipped": None if shipped_base_weights is None else shipped_base_weights == base_record["weights"]},
        "clip": {"file": clip, "record": clip_record, "seconds": round(clip_seconds, 1),
                 "equals_shipped": None if shipped_clip_weights is None else shipped_clip_weights == clip_record["weights"]},
    }


def write_assets(fits: dict) -> None:
    base = fits["base"]["folder"]
    target = ASSETS / f"toy_base_{ToyBaseSettings().tag()}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for part in ("unet", "vae"):
        shutil.copytree(base / part, target / part)
    shutil.copyfile(base / "toy_base.json", target / "toy_base.json")
    clip = fits["clip"]["file"]
    shutil.copyfile(clip, ASSETS / clip.name)
    shutil.copyfile(clip.with_suffix(".json"), ASSETS / clip.with_suffix(".json").name)


@torch.no_grad()
def measure_vae(base: Path, *, scenes: int = 32) -> tuple[dict, np.ndarray]:
    """L1 of held-out reconstructions per style, and the style scorer's accuracy on them; the image grid."""
    from diffusers import AutoencoderKL

    from pipeline.precompute.stages import vae_input

    vae = AutoencoderKL.from_pretrained(base / "vae").eval()
    pixels, _, styles = render_toy_images(scenes=scenes, resolution=64, seed=HELD_OUT_SEED)
    images = vae_input(pixels)
    latents = encode_latents(vae, images, scaling_factor=1.0)
    decoded = torch.cat([vae.decode(chunk).sample for chunk in latents.split(64)]).clamp(-1, 1)
    l1 = (decoded - images).abs().mean(dim=(1, 2, 3)).numpy()
    out_pixels = ((decoded.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    classes = [classify_style(image) for image in out_pixels]
    report = {
        "held_out_images": len(images), "l1": round(float(l1.mean()), 4),
        "l1_per_style": {s: round(float(l1[[x == s for x in styles]].mean()), 4) for s in STYLES},
        "style_accuracy_of_reconstructions": round(float(np.mean([c == s for c, s in zip(classes, styles)])), 3),
    }
    grid = np.concatenate([np.concatenate(list(pixels[:12]), axis=1), np.concatenate(list(out_pixels[:12]), axis=1)])
    return report, grid


@torch.no_grad()
def measure_samples(base: Path, *, n: int = 48, steps: int = 25, guidance: float = 4.0) -> tuple[dict, np.ndarray]:
    """Style shares of the plain diffusers pipeline's samples of held-out captions."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    _, captions, _ = render_toy_images(scenes=n, resolution=64, seed=HELD_OUT_SEED + 1)
    captions = captions[:: len(STYLES)][:n]
    started = time.perf_counter()
    images = []
    for i, caption in enumerate(captions):
        generator = torch.Generator().manual_seed(1000 + i)
        images.append(np.asarray(pipe(caption, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                                      generator=generator).images[0]))
    classes = [classify_style(image) for image in images]
    report = {"n": n, "num_inference_steps": steps, "guidance_scale": guidance, "generator_seeds": "1000 + index",
              "style_shares": {s: round(classes.count(s) / n, 3) for s in STYLES},
              "seconds": round(time.perf_counter() - started, 1)}
    rows = [np.concatenate(images[r * 12:(r + 1) * 12], axis=1) for r in range(min(4, n // 12))]
    return report, np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=str(ROOT / "bench" / "results" / "work" / "toy_assets"))
    parser.add_argument("--write", action="store_true", help="write the refits into pipeline/assets")
    args = parser.parse_args()
    from PIL import Image

    fits = refit(Path(args.work))
    if args.write:
        write_assets(fits)
    base = fits["base"]["folder"]
    with fixed_threads():
        vae_report, vae_grid = measure_vae(base)
        sample_report, sample_grid = measure_samples(base)
    RESULTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(vae_grid).save(RESULTS / "vae_reconstructions.png")
    Image.fromarray(sample_grid).save(RESULTS / "base_samples.png")
    record = fits["base"]["record"]
    result = {
        "command": "bench/toy_assets.py" + (" --write" if args.write else ""),
        "settings": asdict(ToyBaseSettings()), "fit_threads": record["threads"],
        "toy_base": {"fit_seconds": fits["base"]["seconds"], "weights": record["weights"],
                     "text_encoders": record["text_encoders"], "equals_shipped": fits["base"]["equals_shipped"],
                     "vae_fit": record["vae"], "unet_fit": record["unet"]},
        "toy_clip": {"fit_seconds": fits["clip"]["seconds"], "weights": fits["clip"]["record"]["weights"],
                     "equals_shipped": fits["clip"]["equals_shipped"],
                     "settings": asdict(ToyClipSettings())},
        "vae_held_out": vae_report, "samples": sample_report,
    }
    (RESULTS / "toy_base.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'fit':<10} {'seconds':>8}  {'weights sha256':<18} equals shipped")
    for name in ("toy_base", "toy_clip"):
        part = result[name]
        weights = part["weights"] if isinstance(part["weights"], str) else part["weights"]["unet"]
        print(f"{name:<10} {part['fit_seconds']:>8.0f}  {weights[:16]:<18} {part['equals_shipped']}")
    print(f"VAE held-out L1 {vae_report['l1']} {vae_report['l1_per_style']}, reconstructions classified as drawn "
          f"{vae_report['style_accuracy_of_reconstructions']:.0%}")
    print(f"base samples ({sample_report['n']}, guidance {sample_report['guidance_scale']}): "
          f"{sample_report['style_shares']}")
    print(f"wrote {RESULTS / 'toy_base.json'}")


if __name__ == "__main__":
    main()
