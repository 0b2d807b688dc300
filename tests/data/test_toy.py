import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import load_preferences
from pipeline.data.toy import (
    STYLES,
    classify_style,
    make_toy_world,
    random_scene,
    render_scene,
    style_scores,
    target_style_score,
)

# Seeds no other toy test or default uses, so the scorer is judged on images it was never tuned on.
HELD_APART_SEED = 20_261_126


def held_apart_images(n: int, resolution: int, seed: int = HELD_APART_SEED) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(seed)
    styles = [STYLES[i % len(STYLES)] for i in range(n)]
    images = [
        render_scene(random_scene(rng), style, resolution=resolution, seed=seed + i) for i, style in enumerate(styles)
    ]
    return images, styles


def accuracy(images, styles) -> float:
    predicted = [STYLES[k] for k in style_scores(images).argmax(axis=1)]
    return float(np.mean([p == s for p, s in zip(predicted, styles)]))


def test_same_arguments_give_the_same_bytes(tmp_path):
    first = make_toy_world(tmp_path / "a", n_pairs=24, resolution=32, seed=3)
    second = make_toy_world(tmp_path / "b", n_pairs=24, resolution=32, seed=3)
    assert first == tmp_path / "a" / "preferences.parquet"
    assert first.read_bytes() == second.read_bytes()
    other = make_toy_world(tmp_path / "c", n_pairs=24, resolution=32, seed=4)
    assert other.read_bytes() != first.read_bytes()
    assert not list((tmp_path / "a").glob(".*tmp"))  # no temporary file left behind


def test_toy_world_has_pick_a_pic_columns(tmp_path):
    table = pq.read_table(make_toy_world(tmp_path, n_pairs=8, resolution=32))
    assert str(table.schema.field("caption").type) == "string"
    assert str(table.schema.field("jpg_0").type) == "binary" and str(table.schema.field("jpg_1").type) == "binary"
    assert str(table.schema.field("label_0").type) == "double"
    image = Image.open(io.BytesIO(table["jpg_0"][0].as_py()))
    assert image.size == (32, 32)


def test_toy_world_flows_through_load_preferences(tmp_path):
    n_pairs = 64
    path = make_toy_world(tmp_path, n_pairs=n_pairs, resolution=64, target_style="sketch", seed=0)
    raw = pq.read_table(path).to_pylist()
    labels = [row["label_0"] for row in raw]
    assert labels.count(0.5) == round(0.05 * n_pairs)  # a few ties, so tie handling is exercised
    assert labels.count(1.0) > 10 and labels.count(0.0) > 10  # the winner sits in either column
    for row in raw:  # the recorded truth matches the label
        if row["label_0"] == 0.5:
            assert row["style_0"] == row["style_1"] != "sketch"
        else:
            winner = row["style_0"] if row["label_0"] == 1.0 else row["style_1"]
            loser = row["style_1"] if row["label_0"] == 1.0 else row["style_0"]
            assert winner == "sketch" and loser != "sketch"

    load = load_preferences(path)
    summary = load.summary
    assert summary["rows"] == n_pairs and summary["quarantined"] == 0 and summary["duplicates"] == 0
    assert summary["ties"] == labels.count(0.5) and summary["kept"] == n_pairs - summary["ties"]
    winners = [Image.open(io.BytesIO(b)) for b in load.pairs["image_w"].to_pylist()]
    losers = [Image.open(io.BytesIO(b)) for b in load.pairs["image_l"].to_pylist()]
    assert all(classify_style(image) == "sketch" for image in winners)
    assert not any(classify_style(image) == "sketch" for image in losers)
    assert target_style_score(winners, "sketch").min() > target_style_score(losers, "sketch").max()


def test_other_target_styles(tmp_path):
    load = load_preferences(make_toy_world(tmp_path, n_pairs=12, resolution=32, target_style="dots", seed=1))
    winners = [Image.open(io.BytesIO(b)) for b in load.pairs["image_w"].to_pylist()]
    assert [classify_style(image) for image in winners] == ["dots"] * load.pairs.num_rows
    with pytest.raises(ValueError, match="watercolour"):
        make_toy_world(tmp_path, target_style="watercolour")


def test_scorer_accuracy_on_held_apart_images():
    images, styles = held_apart_images(200, resolution=64)
    assert accuracy(images, styles) >= 0.9


@pytest.mark.parametrize("resolution", [32, 128])
def test_scorer_works_at_other_resolutions(resolution):
    images, styles = held_apart_images(60, resolution=resolution, seed=HELD_APART_SEED + resolution)
    assert accuracy(images, styles) >= 0.9


def test_scorer_works_on_resized_and_jpeg_images():
    images, styles = held_apart_images(60, resolution=64, seed=HELD_APART_SEED + 1)
    upscaled = [image.resize((128, 128), Image.BILINEAR) for image in images]
    assert accuracy(upscaled, styles) >= 0.9
    jpegs = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        jpegs.append(Image.open(buffer))
    assert accuracy(jpegs, styles) >= 0.9


def test_scores_are_row_normalised_and_accept_arrays():
    images, _ = held_apart_images(6, resolution=32, seed=HELD_APART_SEED + 2)
    scores = style_scores(images)
    assert scores.shape == (6, len(STYLES))
    assert np.all(scores >= 0) and np.all(scores <= 1) and np.allclose(scores.sum(axis=1), 1.0)
    assert np.allclose(style_scores([np.asarray(image) for image in images]), scores)
    assert np.allclose(target_style_score(images, "flat"), scores[:, STYLES.index("flat")])
    with pytest.raises(ValueError, match="HxWx3"):
        style_scores([np.zeros((4, 4), dtype=np.uint8)])


def test_the_three_styles_look_like_their_names():
    scene = random_scene(np.random.default_rng(HELD_APART_SEED + 3))
    flat, sketch, dots = (np.asarray(render_scene(scene, s, resolution=64, seed=1), dtype=float) for s in STYLES)
    saturation = {name: np.asarray(Image.fromarray(a.astype(np.uint8)).convert("HSV"))[..., 1].mean()
                  for name, a in (("flat", flat), ("sketch", sketch), ("dots", dots))}
    assert saturation["sketch"] < 20 < saturation["dots"]  # pencil is grey
    assert len(np.unique(flat.reshape(-1, 3), axis=0)) <= 4  # solid fills (plus edge anti-aliasing at most)
    assert len(np.unique(dots.reshape(-1, 3), axis=0)) > 50  # many dabs of varied colour
    with pytest.raises(ValueError, match="oil"):
        render_scene(scene, "oil")
