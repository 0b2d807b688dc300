"""The toy world: a deterministic synthetic preference set whose "human taste" is one visual style.

Every pair shows the same simple scene ("a red circle in the top left on a light blue background") twice:
the winner drawn in the target style (default "sketch"), the loser in another style. A model aligned on it
should learn to draw sketches, and ``style_scores`` (a cheap hand-made scorer, no network) measures whether
it did. Everything is made in code from a seed, so a run needs no download and repeats byte for byte.

    path = make_toy_world("runs/toy/toy_world", n_pairs=64, resolution=64)   # .../preferences.parquet
    load_preferences(path).pairs                                            # flows like any Pick-a-Pic table
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

STYLES = ("flat", "sketch", "dots")

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "orange": (240, 125, 25),
    "purple": (135, 55, 185),
}
BACKGROUNDS = {
    "light blue": (150, 200, 240),
    "pale green": (175, 225, 160),
    "sand": (230, 200, 140),
    "pink": (240, 170, 190),
    "navy": (30, 40, 100),
    "dark green": (25, 80, 45),
}
POSITIONS = {  # name -> centre as a fraction of the canvas (x, y)
    "top left": (0.3, 0.3), "top": (0.5, 0.3), "top right": (0.7, 0.3),
    "left": (0.3, 0.5), "centre": (0.5, 0.5), "right": (0.7, 0.5),
    "bottom left": (0.3, 0.7), "bottom": (0.5, 0.7), "bottom right": (0.7, 0.7),
}

TIE_FRACTION = 0.05
PAPER = (243, 240, 232)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} in the {self.position} on a {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )


# -------------------------------------------------------------------------------------------- rendering


def render_scene(scene: Scene, style: str, *, resolution: int = 64, seed: int = 0) -> Image.Image:
    """Draw ``scene`` in ``style`` at ``resolution`` x ``resolution``; ``seed`` varies placement and strokes."""
    if style not in STYLES:
        raise ValueError(f"unknown toy style {style!r}; accepted: {', '.join(STYLES)}")
    rng = np.random.default_rng(seed)
    outline = _shape_outline(scene, resolution, rng)
    if style == "flat":
        return _render_flat(scene, outline, resolution)
    if style == "sketch":
        return _render_sketch(outline, resolution, rng)
    return _render_dots(scene, outline, resolution, rng)


def _shape_outline(scene: Scene, size: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Polygon of the shape (a circle as 48 points), with a little seeded jitter in place and size."""
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-0.04, 0.04)) * size
    cy = (fy + rng.uniform(-0.04, 0.04)) * size
    radius = rng.uniform(0.2, 0.26) * size
    if scene.shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    elif scene.shape == "square":
        angles = np.pi / 4 + np.arange(4) * np.pi / 2
    elif scene.shape == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    else:  # diamond
        angles = np.arange(4) * np.pi / 2
    return [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]


def _shape_mask(outline: list[tuple[float, float]], size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    return mask


def _render_flat(scene: Scene, outline: list[tuple[float, float]], size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    ImageDraw.Draw(image).polygon(outline, fill=COLOURS[scene.colour])
    return image


def _render_sketch(outline: list[tuple[float, float]], size: int, rng: np.random.Generator) -> Image.Image:
    """Pencil on paper: grey diagonal hatching inside the shape, a doubled wobbly outline, no fill."""
    paper = np.asarray(Image.new("RGB", (size, size), PAPER), dtype=np.int16)
    grain = rng.integers(-4, 5, size=(size, size, 1))  # paper grain, the same on all three channels: stays grey
    image = Image.fromarray(np.clip(paper + grain, 0, 255).astype(np.uint8))
    stroke = max(1, size // 64)
    hatch = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(hatch)
    spacing = max(3, size // 12)
    offset = rng.uniform(0, spacing)
    for k in np.arange(-size, size, spacing):
        draw.line([(k + offset, size), (k + offset + size, 0)], fill=255, width=stroke)
    hatch_inside = Image.fromarray(np.minimum(np.asarray(hatch), np.asarray(_shape_mask(outline, size))))
    image.paste((120, 120, 118), mask=hatch_inside)
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        wobble = [(x + rng.uniform(-1, 1) * stroke, y + rng.uniform(-1, 1) * stroke) for x, y in outline]
        draw.line([*wobble, wobble[0]], fill=(55, 55, 55), width=stroke)
    return image


def _render_dots(scene: Scene, outline: list[tuple[float, float]], size: int, rng: np.random.Generator) -> Image.Image:
    """Pointillism: the flat scene re-painted as separate round dabs on a pale canvas."""
    reference = np.asarray(_render_flat(scene, outline, size))
    image = Image.new("RGB", (size, size), (250, 248, 244))
    draw = ImageDraw.Draw(image)
    radius = max(1.0, size / 40)
    count = int(0.5 * size * size / (np.pi * radius**2))  # covers about half the canvas: gaps stay visible
    for x, y in rng.uniform(0, size, size=(count, 2)):
        colour = reference[int(y), int(x)].astype(int) + rng.integers(-25, 26, size=3)
        colour = tuple(int(c) for c in np.clip(colour, 0, 255))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    return image


# ---------------------------------------------------------------------------------------- the preference set


def make_toy_world(
    out_dir: str | Path,
    *,
    n_pairs: int = 64,
    resolution: int = 64,
    target_style: str = "sketch",
    seed: int = 0,
) -> Path:
    """Write ``out_dir/preferences.parquet`` (Pick-a-Pic columns) and return its path.

    Each pair: one scene, the winner in ``target_style`` and the loser in another style, placed in column 0 or 1
    at random (seeded) with ``label_0`` to match. About 5% of pairs (at least one) are ties: both images in the
    same non-target style, label 0.5. Extra columns ``style_0``/``style_1`` record the truth. Same arguments,
    same bytes.
    """
    if target_style not in STYLES:
        raise ValueError(f"target_style {target_style!r} is not a toy style; accepted: {', '.join(STYLES)}")
    if n_pairs < 2:
        raise ValueError(f"n_pairs={n_pairs}: the toy world needs at least 2 pairs")
    rng = np.random.default_rng(seed)
    others = [s for s in STYLES if s != target_style]
    n_ties = max(1, round(TIE_FRACTION * n_pairs))
    tie_rows = set(rng.choice(n_pairs, size=n_ties, replace=False).tolist())
    columns: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "style_0": [], "style_1": []}
    for row in range(n_pairs):
        scene = random_scene(rng)
        seed_0, seed_1 = (int(s) for s in rng.integers(2**32, size=2))
        if row in tie_rows:
            style_0 = style_1 = others[rng.integers(len(others))]
            label = 0.5
        else:
            loser_style = others[rng.integers(len(others))]
            winner_first = bool(rng.random() < 0.5)
            style_0, style_1 = (target_style, loser_style) if winner_first else (loser_style, target_style)
            label = 1.0 if winner_first else 0.0
        columns["caption"].append(scene.caption)
        columns["jpg_0"].append(_png_bytes(render_scene(scene, style_0, resolution=resolution, seed=seed_0)))
        columns["jpg_1"].append(_png_bytes(render_scene(scene, style_1, resolution=resolution, seed=seed_1)))
        columns["label_0"].append(label)
        columns["style_0"].append(style_0)
        columns["style_1"].append(style_1)
    schema = pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
        ("style_0", pa.string()), ("style_1", pa.string()),
    ])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "preferences.parquet"
    partial = out / f".preferences.parquet.{os.getpid()}.tmp"
    pq.write_table(pa.table(columns, schema=schema), partial)
    partial.replace(path)  # atomic: a reader never sees half a file
    return path


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: JPEG ringing would smear the strokes and dots that define a style
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- style scorer

# Three hand-made features, measured on a 32x32 copy so the scorer sees the same thing at any resolution:
#   saturation  mean HSV saturation                      flat is colourful, sketch is grey
#   paper       share of light, nearly grey pixels        sketch is mostly paper, dots show it between dabs
#   texture     mean absolute neighbour difference        flat is smooth, dots are busy, sketch in between
# Each style has a prototype (the measured means of toy renders at 32-128 px); an image's scores are a softmax
# over its scaled distances to them, so they are graded, not just a hard label.
FEATURE_NAMES = ("saturation", "paper", "texture")
_FEATURE_SIZE = 32
_PROTOTYPES = np.array([  # rows follow STYLES
    [0.48, 0.00, 0.010],  # flat
    [0.04, 0.92, 0.030],  # sketch
    [0.25, 0.35, 0.110],  # dots
])
_FEATURE_SCALE = np.array([0.15, 0.20, 0.04])  # about the spread of each feature within a style


ImageLike = Image.Image | np.ndarray


def style_features(images: Sequence[ImageLike]) -> np.ndarray:
    """[N, 3] float64 features (FEATURE_NAMES) of PIL images or HxWx3 uint8 arrays."""
    rows = []
    for image in images:
        small = _as_pil(image).resize((_FEATURE_SIZE, _FEATURE_SIZE), Image.BILINEAR)
        rgb = np.asarray(small, dtype=np.float64) / 255.0
        hsv = np.asarray(small.convert("HSV"), dtype=np.float64) / 255.0
        saturation, value = hsv[..., 1], hsv[..., 2]
        paper = np.mean((saturation < 0.12) & (value > 0.8))
        texture = (np.abs(np.diff(rgb, axis=0)).mean() + np.abs(np.diff(rgb, axis=1)).mean()) / 2
        rows.append([saturation.mean(), paper, texture])
    return np.array(rows, dtype=np.float64).reshape(-1, len(FEATURE_NAMES))


def style_scores(images: Sequence[ImageLike]) -> np.ndarray:
    """[N, len(STYLES)] scores in [0, 1], each row summing to 1 (column order: STYLES)."""
    features = style_features(images)
    distance = (((features[:, None, :] - _PROTOTYPES[None]) / _FEATURE_SCALE) ** 2).sum(-1)
    logits = -0.5 * distance
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    weights = np.exp(logits)
    return weights / weights.sum(axis=1, keepdims=True)


def classify_style(image: ImageLike) -> str:
    return STYLES[int(np.argmax(style_scores([image])[0]))]


def target_style_score(images: Sequence[ImageLike], target: str) -> np.ndarray:
    """[N] score of ``target`` in [0, 1]: how much each image looks like the style the toy world rewards."""
    if target not in STYLES:
        raise ValueError(f"unknown toy style {target!r}; accepted: {', '.join(STYLES)}")
    return style_scores(images)[:, STYLES.index(target)]


def _as_pil(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or an HxWx3 uint8 array, got shape {array.shape} dtype {array.dtype}")
    return Image.fromarray(array)


# The toy world's fits (toy base, toy CLIP, the tiny UNet's fit) run at this many CPU threads on every machine:
# CPU kernels split their sums by thread, so another thread count rounds differently and, over a few thousand
# steps, ends at other weights (measured: a toy base fit at 1 and at 2 threads differs after 30 steps; two fits at
# 2 threads are bit-identical). Two is what this project's machines have; more threads would be faster on bigger
# machines, and fit other weights.
FIT_THREADS = 2


@contextmanager
def fixed_threads(threads: int = FIT_THREADS) -> Iterator[None]:
    """Run the block with torch at ``threads`` intra-op threads, restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# The toy world's fitted models shipped with the project (bench/toy_assets.py refits and writes them): every machine
# starts from the same weights, whatever its CPU rounds like, and the first run skips minutes of fitting.
ASSETS = Path(__file__).parents[1] / "assets"


def state_digest(state: dict) -> str:
    """sha256 of a state dict's names, dtypes, shapes and values: equal tensors, equal digest, whichever file
    format or library version wrote them."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def progress(steps: int, description: str):
    """A tqdm bar over ``range(steps)`` with steps, rate and time left, for the fits that take minutes."""
    from tqdm.auto import tqdm

    return tqdm(range(steps), desc=description, unit="step", mininterval=5.0, dynamic_ncols=True)


def resolve_data_source(cfg) -> str:
    """The preference table a config (``AlignConfig``) means: "toy" is generated (same config, same bytes) under
    the run folder; anything else is returned as is."""
    if cfg.data.source != "toy":
        return cfg.data.source
    from pipeline.storage import local_run_dir

    d = cfg.data
    path = make_toy_world(
        local_run_dir(cfg.run_dir, cfg.name) / "toy_world", n_pairs=d.toy_pairs, resolution=d.toy_resolution,
        target_style=d.toy_target_style, seed=d.toy_seed,
    )
    return str(path)
