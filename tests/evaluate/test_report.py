"""The per-run HTML report: every number shown and saved, prompts escaped, self-contained, rendered by Chromium."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from pipeline.data.toy import PAPER, Scene, render_scene
from pipeline.evaluate.report import TABLE_HEADER_RGB, THUMBNAIL_PX, read_metrics, screenshot, write_report

MODELS = ("base", "aligned")
STYLE_OF = {"base": "flat", "aligned": "sketch"}
SEEDS = (0, 1)
PROMPTS = [
    (Scene("circle", "red", "top left", "light blue"), 64),
    (Scene("square", "green", "centre", "sand"), 32),
    (Scene("triangle", "blue", "bottom", "pink"), 320),  # over THUMBNAIL_PX: embedded as a JPEG thumbnail
    (Scene("diamond", "yellow", "right", "navy"), 64),  # beyond grid_prompts: not shown
]
EVIL = ' <script>alert("x")</script> & more'  # prompts are user data
GRID_PROMPTS = 3

COMPARISON = {
    "baseline": "base", "models": list(MODELS), "confidence_level": 0.9, "n_pairs": 8,
    "scorers": {
        "clip": {"mean": {"base": 21.3, "aligned": 22.04},
                 "mean_ci": {"base": [20.125, 22.5], "aligned": [20.9, 23.1]},
                 "win_rate": {"aligned": {"value": 0.625, "ci": [0.4375, 0.8125], "n": 8}}},
        "style": {"mean": {"base": 0.3125, "aligned": 0.71},
                  "mean_ci": {"base": [0.2, 0.41], "aligned": [0.6, 0.83]},
                  "win_rate": {"aligned": {"value": 0.875, "ci": [0.6875, 1.0], "n": 8}}},
    },
    "style": {"target": "sketch", "share": {"base": {"value": 0.125, "ci": [0.0224, 0.4709], "n": 8},
                                            "aligned": {"value": 0.75, "ci": [0.4093, 0.9285], "n": 8}}},
}

METRICS = [  # a resume logged step 20 again (loss 1.25 wins over 1.5); the first holdout line carries step 0's
    {"step": 10, "loss": 1.75, "implicit_accuracy": 0.5, "reward_margin": 0.1, "lr": 3e-4},
    {"step": 20, "loss": 1.5, "implicit_accuracy": 0.55, "reward_margin": 0.2, "lr": 3e-4,
     "holdout_accuracy": 0.5625, "holdout_margin": 0.3, "start_holdout_accuracy": 0.5, "start_holdout_margin": 0.0},
    {"step": 20, "loss": 1.25, "implicit_accuracy": 0.6, "reward_margin": 0.25, "lr": 3e-4,
     "holdout_accuracy": 0.625, "holdout_margin": 0.35, "start_holdout_accuracy": 0.5, "start_holdout_margin": 0.0},
    {"step": 30, "loss": 1.0, "implicit_accuracy": 0.7, "reward_margin": 0.5, "lr": 1.5e-4},
]


def prompt_text(prompt_id: int) -> str:
    return PROMPTS[prompt_id][0].caption + (EVIL if prompt_id == 0 else "")


def make_inputs(root):
    """Toy renders as PNG files under root/images, their scores table, metrics.jsonl with a repeated step."""
    rng = np.random.default_rng(0)
    rows = []
    for model in MODELS:
        for prompt_id, (scene, size) in enumerate(PROMPTS):
            for seed in SEEDS:
                file = f"{model}/{prompt_id}_s{seed}.png"
                (root / "images" / model).mkdir(parents=True, exist_ok=True)
                render_scene(scene, STYLE_OF[model], resolution=size, seed=seed).save(root / "images" / file)
                rows.append({
                    "model": model, "prompt_id": prompt_id, "prompt": prompt_text(prompt_id), "seed": seed,
                    "file": file, "resolution": size, "num_inference_steps": 4, "guidance_scale": 5.0,
                    "scheduler": "", "model_source": "tiny",
                    "score_style": float(rng.uniform(0, 1)), "score_clip": float(rng.uniform(15, 30)),
                    "style_class": STYLE_OF[model],
                })
    metrics = root / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(m) + "\n" for m in METRICS))
    return pa.Table.from_pylist(rows), metrics


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(page: str) -> list[tuple[str, dict]]:
    parser = Tags()
    parser.feed(page)
    return parser.tags


def decode_data_uri(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def comparison_numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from comparison_numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from comparison_numbers(v)
    elif isinstance(value, float):
        yield value


def test_report_shows_saves_and_renders_everything(tmp_path):
    scores, metrics = make_inputs(tmp_path)
    info = {"run": "toy <run>", "objective": "rpo", "steps": 30, "generation": {"num_inference_steps": 4},
            "config": {"loss": {"beta": 5000.0}, "name": "toy"}}
    html_path = write_report(tmp_path / "report", comparison=COMPARISON, scores=scores,
                             image_root=tmp_path / "images", metrics_jsonl=metrics, info=info,
                             grid_prompts=GRID_PROMPTS)
    assert html_path == tmp_path / "report" / "index.html"
    page = html_path.read_text()

    # report.json: the comparison and info exactly, and the plotted curves with the last value per step.
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["comparison"] == COMPARISON
    assert saved["info"] == info
    assert saved["curves"]["loss"] == {"step": [10, 20, 30], "value": [1.75, 1.25, 1.0]}
    assert saved["curves"]["accuracy"]["value"] == [0.5, 0.6, 0.7]
    assert saved["curves"]["holdout_accuracy"] == {"step": [0, 20], "value": [0.5, 0.625]}
    assert saved["plots"] == ["curves.png"]
    assert len(saved["grid"]) == GRID_PROMPTS * len(SEEDS)

    # Every number of the table, every interval labelled with the confidence level.
    for number in comparison_numbers(COMPARISON):
        if number != COMPARISON["confidence_level"]:
            assert f"{number:.3f}" in page, number
    assert "90% CI" in page and "95% CI" not in page
    assert "sketch" in page

    # Prompts (and run facts) are escaped; shown prompts only.
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; more" in page
    assert "<script" not in page.lower() and "toy &lt;run&gt;" in page
    assert prompt_text(GRID_PROMPTS) not in page
    assert "<details>" in page and "beta" in page

    # One image per model per grid row, each captioned with its scores; the plot; nothing external.
    tags = tags_of(page)
    images = [a for t, a in tags if t == "img"]
    grid_images = [a for a in images if "plot" not in (a.get("class") or "")]
    plots = [a for a in images if "plot" in (a.get("class") or "")]
    assert len(grid_images) == GRID_PROMPTS * len(SEEDS) * len(MODELS)
    assert len(plots) == 1 and decode_data_uri(plots[0]["src"]) == (tmp_path / "report" / "curves.png").read_bytes()
    for row in scores.filter(pc.less(scores["prompt_id"], GRID_PROMPTS)).to_pylist():
        assert f"clip {row['score_clip']:.3f}<br>style {row['score_style']:.3f}" in page
    assert all(a["src"].startswith("data:image/") for a in images)
    assert not [a for _, a in tags if "href" in a or ("src" in a and not a["src"].startswith("data:"))]
    assert "http:" not in page and "https:" not in page and "url(" not in page
    assert not [t for t, _ in tags if t in ("script", "link", "iframe", "object", "embed")]

    # Small toy PNGs are embedded as they are and shown pixelated; the 320 px ones as 256 px JPEG thumbnails.
    small = [a for a in grid_images if a["src"].startswith("data:image/png")]
    large = [a for a in grid_images if a["src"].startswith("data:image/jpeg")]
    assert len(large) == len(SEEDS) * len(MODELS) and len(small) == len(grid_images) - len(large)
    assert all(a.get("class") == "pixelated" for a in small)
    assert Image.open(io.BytesIO(decode_data_uri(large[0]["src"]))).size == (THUMBNAIL_PX, THUMBNAIL_PX)
    first = (tmp_path / "images" / "base" / "0_s0.png").read_bytes()
    assert decode_data_uri(grid_images[0]["src"]) == first  # row 1 = prompt 0, seed 0; column 1 = base

    # Headless Chromium renders it: the table's header colour, the toy images' paper colour, many colours.
    if shutil.which("chromium") is None:
        pytest.fail("chromium is not installed; the report test needs Debian's headless Chromium: "
                    "apt-get update && apt-get install -y chromium (setup.sh does this when run as root)")
    shot = np.asarray(Image.open(screenshot(html_path, tmp_path / "screenshot.png")).convert("RGB"))
    assert shot.shape == (2000, 1280, 3)
    flat = shot.reshape(-1, 3)
    assert (flat.min(axis=1) < 235).mean() > 0.05, "screenshot is (nearly) blank"
    assert len(np.unique(flat, axis=0)) > 1000
    header = np.all(shot == TABLE_HEADER_RGB, axis=2)
    assert header.sum() > 5000, "the metrics table's header is not on the screenshot"
    assert header[:1000].any() and np.argwhere(header)[:, 1].max() > 640  # near the top, spanning the page
    assert np.all(shot == PAPER, axis=2).sum() > 2000, "the sketch-style toy images are not on the screenshot"


def test_report_without_metrics_and_with_a_sweep(tmp_path):
    scores, _ = make_inputs(tmp_path)
    plot = tmp_path / "sweep_metric.png"
    Image.new("RGB", (40, 20), (10, 120, 200)).save(plot)
    sweep = {"metric": "holdout_accuracy", "mode": "max", "best": "t1", "plot": str(plot), "trials": [
        {"trial_id": "t0", "config": {"loss.beta": 1000.0}, "metric": 0.5625, "last_step": 10, "status": "stopped",
         "stopped_early": True, "error": None},
        {"trial_id": "t1", "config": {"loss.beta": 5000.0}, "metric": 0.6875, "last_step": 30,
         "status": "finished", "stopped_early": False, "error": None}]}
    html_path = write_report(tmp_path / "report", comparison={**COMPARISON, "style": None}, scores=scores,
                             image_root=tmp_path / "images", metrics_jsonl=None, info={"run": "r"},
                             grid_prompts=1, sweep=sweep)
    page = html_path.read_text()
    assert "No training metrics were given" in page and not (tmp_path / "report" / "curves.png").exists()
    assert "Style alignment" not in page
    assert "t1 (best)" in page and "0.688" in page and "0.562" in page and "stopped" in page
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["curves"] is None and saved["sweep"] == sweep and saved["plots"] == ["sweep_metric.png"]
    assert (tmp_path / "report" / "sweep_metric.png").read_bytes() == plot.read_bytes()

    missing = tmp_path / "nowhere" / "metrics.jsonl"
    page = write_report(tmp_path / "report2", comparison=COMPARISON, scores=scores, image_root=tmp_path / "images",
                        metrics_jsonl=missing, info={}, grid_prompts=0).read_text()
    assert f"{missing} does not exist" in page and "grid_prompts is 0" in page


def test_bad_inputs_name_what_to_fix(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2"):
        read_metrics(bad)
    scores, _ = make_inputs(tmp_path)
    with pytest.raises(ValueError, match=r"'dpo'.*no rows"):
        write_report(tmp_path / "r", comparison={**COMPARISON, "models": ["base", "dpo"]}, scores=scores,
                     image_root=tmp_path / "images", metrics_jsonl=None, info={})
    with pytest.raises(FileNotFoundError, match=r"0_s0\.png"):
        write_report(tmp_path / "r", comparison=COMPARISON, scores=scores, image_root=tmp_path / "elsewhere",
                     metrics_jsonl=None, info={})
