"""Does the tiny CLIP fitted on the toy world (pipeline/data/toy_clip.py) mean scene likeness on scenes it never saw?

    .venv/bin/python bench/toy_clip.py                              # ToyClipSettings defaults, about 2.5 min
    .venv/bin/python bench/toy_clip.py --settings '{"steps": 300}'  # other fit settings

Fits the tiny CLIP from its seeded random start, then measures, for the random start and the fitted model, on held-apart
scenes (their own seed) rendered in every style: text->image top-1 retrieval per style (chance 1/scenes), how much
closer two captions are when their scenes share each attribute, the Spearman correlation of caption similarity with
the number of shared attributes, and how close a sketch is to a flat render of the same scene, of the same shape and
position, and of other scenes (what RPO's image weights see: sketch winners against other styles' losers).
Prints a table and writes bench/results/toy/toy_clip.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from pipeline.data.toy import FIT_THREADS, STYLES, fixed_threads, random_scene, render_scene, state_digest
from pipeline.data.toy_clip import ToyClipSettings, fit_toy_clip
from pipeline.models.clip import ClipEmbedder

HELD_APART_SEED = 777  # neither the fit's scenes (toy_clip.FIT_SCENE_SEED) nor a preference set's
ATTRIBUTES = ("shape", "colour", "position", "background")


def structure(clip: ClipEmbedder, *, scenes: int = 120, seed: int = HELD_APART_SEED) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    drawn = [random_scene(rng) for _ in range(scenes)]
    images = {style: [render_scene(s, style, resolution=64, seed=int(rng.integers(2**31))) for s in drawn]
              for style in STYLES}
    text = clip.embed_texts([s.caption for s in drawn])
    image = {style: clip.embed_images(images[style]) for style in STYLES}
    out = {f"t2i_top1_{style}": float(((text @ image[style].T).argmax(1) == torch.arange(scenes)).float().mean())
           for style in STYLES}
    values = np.array([[getattr(s, a) for a in ATTRIBUTES] for s in drawn])
    shared = values[:, None, :] == values[None, :, :]  # [n, n, attributes]
    upper = np.triu_indices(scenes, 1)
    text_sim = (text @ text.T).numpy()[upper]
    out["text_sim_spearman_shared_attributes"] = float(stats.spearmanr(text_sim, shared.sum(-1)[upper]).statistic)
    for k, name in enumerate(ATTRIBUTES):
        same = shared[..., k][upper]
        out[f"text_sim_gain_same_{name}"] = float(text_sim[same].mean() - text_sim[~same].mean())
    sketch_flat = (image["sketch"] @ image["flat"].T).numpy()
    other = ~np.eye(scenes, dtype=bool)
    shape_and_position = shared[..., 0] & shared[..., 2] & other
    out["sketch_flat_same_scene"] = float(np.diag(sketch_flat).mean())
    out["sketch_flat_same_shape_and_position"] = float(sketch_flat[shape_and_position].mean())
    out["sketch_flat_other_scenes"] = float(sketch_flat[other & ~shape_and_position].mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="{}", help="ToyClipSettings fields as JSON; default: its defaults")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "toy" / "toy_clip.json")
    args = parser.parse_args()
    settings = ToyClipSettings(**json.loads(args.settings))
    clip = ClipEmbedder("tiny", "random")  # the seeded random start every process builds
    random_start = structure(clip)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), fixed_threads():
        torch.manual_seed(settings.seed)  # as toy_clip_weights does: the default settings give the shipped weights
        fit = fit_toy_clip(clip.model, clip.preprocess, clip.tokenizer, settings)
    fitted = structure(clip)
    print(f"{'measure':40s} {'random start':>12s} {'fitted':>8s}")
    for key in fitted:
        print(f"{key:40s} {random_start[key]:12.3f} {fitted[key]:8.3f}")
    print(f"fit: loss {fit['first_loss']:.2f} -> {fit['last_loss']:.2f} in {time.perf_counter() - started:.0f} s")
    record = {"settings": asdict(settings), "threads": FIT_THREADS, "weights": state_digest(clip.model.state_dict()),
              "fit": fit, "random_start": random_start, "fitted": fitted}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
