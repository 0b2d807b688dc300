"""Each reward scorer on its tiny random-weight twin, loaded from disk through build_scorer (the same loading code as
the real weights), with the published formulas checked by hand against the models' own encoders."""

import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.data.toy import STYLES, Scene, random_scene, render_scene
from pipeline.evaluate.scorers import Scorer, WeightsNotFound, build_scorer, save_tiny_twin
from pipeline.models.clip import ClipEmbedder

REWARD_SCORERS = ("clip", "pickscore", "hpsv2", "aesthetic")
TEXT_SCORERS = ("clip", "pickscore", "hpsv2")  # aesthetic and style ignore prompts
SCENE = Scene(shape="circle", colour="red", position="centre", background="light blue")


def _images() -> list[Image.Image]:
    # The same scene as a toy sketch, a flat render and dots at another size, plus a non-square image (letterboxed by
    # HPS, cropped by the others).
    return [render_scene(SCENE, "sketch"), render_scene(SCENE, "flat"), render_scene(SCENE, "dots", resolution=48),
            render_scene(SCENE, "flat", resolution=64).resize((80, 40))]


def _prompts(n: int = 4) -> list[str]:
    return [SCENE.caption] * n


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("twins")
    return {name: save_tiny_twin(name, root / name) for name in (*REWARD_SCORERS, "style")}


@pytest.fixture(scope="module")
def scorers(twins) -> dict[str, Scorer]:
    return {name: build_scorer(name, **kwargs) for name, kwargs in twins.items()}


# ------------------------------------------------------------------------------------------ the common contract


@pytest.mark.parametrize("name", REWARD_SCORERS)
def test_twin_scores_are_finite_float64_deterministic_and_tell_images_apart(name, twins, scorers):
    scorer = scorers[name]
    assert isinstance(scorer, Scorer) and scorer.name == name
    scores = scorer.score(_images(), _prompts())
    assert scores.dtype == np.float64 and scores.shape == (4,) and np.isfinite(scores).all()
    rebuilt = build_scorer(name, **twins[name])  # a second build from the same files
    np.testing.assert_array_equal(rebuilt.score(_images(), _prompts()), scores)
    assert abs(scores[0] - scores[1]) > 1e-5  # a toy sketch and a flat render of the same scene
    assert len(np.unique(scores.round(7))) == 4
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(_images(), _prompts(3))


@pytest.mark.parametrize("name", TEXT_SCORERS)
def test_text_scorers_tell_prompts_apart(name, scorers):
    images = [_images()[0]] * 3
    scores = scorers[name].score(images, [SCENE.caption, "a photo of a harbour at night", ""])
    assert len(np.unique(scores.round(6))) == 3


def test_aesthetic_ignores_prompts(scorers):
    scorer = scorers["aesthetic"]
    np.testing.assert_array_equal(scorer.score(_images(), _prompts()), scorer.score(_images(), ["x", "y", "", "z"]))


def test_twins_are_small_and_their_files_are_what_is_loaded(twins, scorers):
    for name in REWARD_SCORERS:
        paths = [v for k, v in twins[name].items() if k in ("weights", "backbone") and v]
        size = sum(f.stat().st_size for p in paths for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")))
        assert 0 < size < 5e6, (name, size)
    # The clip twin's file differs from the tiny model's seeded weights, so its scores do too.
    default = build_scorer("clip", weights="random", arch="tiny")
    assert not np.allclose(default.score(_images(), _prompts()), scorers["clip"].score(_images(), _prompts()))


# ------------------------------------------------------------------------------------------ formulas by hand


def test_clip_score_is_100_times_the_clamped_cosine_of_the_models_own_encoders(scorers):
    embedder = scorers["clip"].embedder
    images, prompts = _images(), ["a red circle", "a sketch", "dots", "a photo of a harbour at night"]
    with torch.no_grad():
        image = embedder.model.encode_image(torch.stack([embedder.preprocess(i) for i in images]))
        text = embedder.model.encode_text(open_clip.get_tokenizer("rpo-pipeline-tiny")(prompts))
    cosine = F.cosine_similarity(image.double(), text.double(), dim=-1).numpy()
    np.testing.assert_allclose(scorers["clip"].score(images, prompts), 100 * np.maximum(cosine, 0), atol=1e-4)


def test_pickscore_is_logit_scale_times_cosine_as_the_models_own_forward_gives_it(scorers):
    # Also covers transformers 5, whose get_image_features/get_text_features return output objects, not tensors.
    scorer = scorers["pickscore"]
    images, prompts = _images(), ["a red circle", "a sketch", "", "a photo of a harbour at night"]
    inputs = scorer.processor(text=prompts, images=images, padding=True, truncation=True, max_length=77,
                              return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**inputs).logits_per_image  # [images, texts] = logit_scale.exp() * cos
    np.testing.assert_allclose(scorer.score(images, prompts), torch.diagonal(logits).double().numpy(), rtol=1e-5)
    assert scorer.model.logit_scale.exp() > 1.5  # the scale really multiplies: not a plain cosine


def test_hpsv2_is_the_cosine_of_open_clips_forward_on_letterboxed_images(scorers):
    scorer = scorers["hpsv2"]
    images, prompts = _images(), ["a red circle", "a sketch", "", "a photo of a harbour at night"]
    pixels = torch.stack([scorer.pixels(i) for i in images])
    tokens = open_clip.get_tokenizer("rpo-pipeline-tiny")(prompts)
    with torch.no_grad():
        image_features, text_features, _ = scorer.embedder.model(pixels, tokens)  # open_clip normalises both
    expected = torch.diagonal(image_features @ text_features.T).double().numpy()
    np.testing.assert_allclose(scorer.score(images, prompts), expected, atol=1e-5)
    # HPS's validation transform: an 80x40 image becomes 32x16 on a black 32x32 square (rows 0-7 and 24-31).
    wide = scorer.pixels(images[3])
    assert wide.shape == (3, 32, 32)
    black = (0 - torch.tensor(scorer.mean)) / torch.tensor(scorer.std)
    torch.testing.assert_close(wide[:, :8, :], black[:, None, None].expand(3, 8, 32))
    assert not torch.allclose(wide[:, 8:24, :], black[:, None, None].expand(3, 16, 32))


def test_aesthetic_is_the_published_linear_stack_on_normalised_image_embeddings(twins, scorers):
    scorer = scorers["aesthetic"]
    weights = torch.load(twins["aesthetic"]["weights"], weights_only=True)
    assert sorted(weights) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    embedder = scorer.embedder
    with torch.no_grad():
        x = embedder.model.encode_image(torch.stack([embedder.preprocess(i) for i in _images()])).double()
    x = x / x.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # no activations between the layers, as published; dropout is off in eval
        x = x @ weights[f"layers.{i}.weight"].double().T + weights[f"layers.{i}.bias"].double()
    np.testing.assert_allclose(scorer.score(_images(), _prompts()), x.squeeze(-1).numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------- the style scorer


def test_style_scorer_classifies_toy_renders_and_scores_the_target_style(scorers):
    rng = np.random.default_rng(7)
    scenes = [random_scene(rng) for _ in range(6)]
    images = [render_scene(s, style, resolution=64, seed=i) for i, s in enumerate(scenes) for style in STYLES]
    truth = [style for _ in scenes for style in STYLES]
    scorer = scorers["style"]
    assert scorer.classes(images) == truth
    scores = scorer.score(images, [""] * len(images))
    assert scores.dtype == np.float64 and ((0 <= scores) & (scores <= 1)).all()
    is_sketch = np.array(truth) == "sketch"
    assert scores[is_sketch].min() > scores[~is_sketch].max()
    dots = build_scorer("style", target_style="dots").score(images, [""] * len(images))
    assert dots[np.array(truth) == "dots"].min() > dots[np.array(truth) != "dots"].max()
    with pytest.raises(ValueError, match="unknown target style 'oil'"):
        build_scorer("style", target_style="oil")


# ------------------------------------------------------------------------------------------ missing / mismatched


@pytest.mark.parametrize("name", REWARD_SCORERS)
def test_a_missing_weights_path_names_the_scorer_the_path_the_source_and_the_key(name, twins, tmp_path):
    missing = str(tmp_path / "models" / "nothing-here.pt")
    with pytest.raises(WeightsNotFound) as caught:
        build_scorer(name, **{**twins[name], "weights": missing})
    message = str(caught.value)
    assert f"{name} scorer" in message and missing in message and f"evaluate.{name}.weights" in message
    source = {"clip": "open_clip", "pickscore": "yuvalkirstain/PickScore_v1", "hpsv2": "xswu/HPSv2",
              "aesthetic": "improved-aesthetic-predictor"}[name]
    assert source in message


@pytest.mark.parametrize("name", ("pickscore", "hpsv2", "aesthetic"))
def test_reward_models_need_their_weights_named(name):
    with pytest.raises(WeightsNotFound, match=f"{name} scorer: weights not given.*evaluate.{name}.weights"):
        build_scorer(name)


def test_hub_ids_and_open_clip_tags_not_in_the_offline_cache_are_weights_not_found():
    with pytest.raises(WeightsNotFound, match="hpsv2 scorer.*xswu/HPSv2/HPS_v2.1_compressed.pt.*hub said"):
        build_scorer("hpsv2", weights="xswu/HPSv2/HPS_v2.1_compressed.pt", arch="tiny")
    with pytest.raises(WeightsNotFound, match="clip scorer: weights not found at 'openai'.*evaluate.clip.weights"):
        build_scorer("clip", weights="openai", arch="ViT-B-32")  # open_clip fails before building the model


def test_a_missing_aesthetic_backbone_file_names_the_backbone_key(twins, tmp_path):
    with pytest.raises(WeightsNotFound, match="evaluate.aesthetic.backbone"):
        build_scorer("aesthetic", **{**twins["aesthetic"], "backbone": str(tmp_path / "clip.pt")})


def test_state_dicts_with_a_wrong_key_set_are_refused_with_the_keys(twins, tmp_path):
    hps = torch.load(twins["hpsv2"]["weights"], weights_only=True)
    hps["state_dict"]["visual.extra_head.weight"] = hps["state_dict"].pop("visual.proj")
    torch.save(hps, tmp_path / "hps.pt")
    expected = (r"hpsv2 scorer: .*hps\.pt.*1 missing \(e\.g\. visual\.proj\).*"
                r"1 unexpected \(e\.g\. visual\.extra_head\.weight\).*evaluate\.hpsv2\.weights")
    with pytest.raises(ValueError, match=expected):
        build_scorer("hpsv2", weights=str(tmp_path / "hps.pt"), arch="tiny")

    head = torch.load(twins["aesthetic"]["weights"], weights_only=True)
    head["layers.1.weight"] = head.pop("layers.2.weight")  # shifted indices: another layer layout
    torch.save(head, tmp_path / "head.pth")
    with pytest.raises(ValueError, match=r"aesthetic scorer: .*head\.pth.*layers\.2\.weight.*layers\.1\.weight"):
        build_scorer("aesthetic", **{**twins["aesthetic"], "weights": str(tmp_path / "head.pth")})

    clip = torch.load(twins["clip"]["weights"], weights_only=True)
    clip["ln_final.weight"] = clip["ln_final.weight"][:8]
    torch.save(clip, tmp_path / "clip.pt")
    with pytest.raises(ValueError, match=r"clip scorer: .*clip\.pt.*wrong shapes: ln_final\.weight \(8,\)"):
        build_scorer("clip", weights=str(tmp_path / "clip.pt"), arch="tiny")


def test_a_pickscore_folder_with_missing_tensors_is_refused_not_filled_with_random_ones(twins, tmp_path):
    folder = tmp_path / "PickScore_v1"
    shutil.copytree(twins["pickscore"]["weights"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["visual_projection.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"pickscore scorer: .*missing keys \['visual_projection.weight'\]"):
        build_scorer("pickscore", weights=str(folder), backbone=twins["pickscore"]["backbone"])


def test_an_unknown_scorer_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown scorer 'dreamsim'.*pickscore.*imagereward"):
        build_scorer("dreamsim")
    with pytest.raises(ValueError, match="unknown scorer 'dreamsim'"):
        save_tiny_twin("dreamsim", "unused")


# ------------------------------------------------------------------------------------------ the real path


class _Built(Exception):
    """Raised by the spy below in place of building (and downloading) a real CLIP."""


@pytest.fixture
def open_clip_calls(monkeypatch) -> list[dict]:
    """What open_clip is asked to build, recorded instead of building it: real tags without a download."""
    calls = []

    def spy(model_name, pretrained=None, **kwargs):
        calls.append({"model_name": model_name, "pretrained": pretrained, **kwargs})
        raise _Built

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    return calls


@pytest.mark.parametrize("name, options, quick_gelu", [
    ("aesthetic", {}, True),  # the published backbone: OpenAI's ViT-L/14, tag "openai"
    ("aesthetic", {"arch": "ViT-L-14"}, True),  # the plain name with the published tag
    ("clip", {"arch": "ViT-L-14", "weights": "openai"}, True),
    ("clip", {"arch": "ViT-B-32", "weights": "openai"}, True),
    ("clip", {"arch": "ViT-H-14", "weights": "laion2b_s32b_b79k"}, False),
    ("hpsv2", {}, False),  # LAION's ViT-H-14, GELU as HPS was trained
])
def test_open_clip_models_get_the_activation_their_weights_were_trained_with(name, options, quick_gelu, twins,
                                                                             open_clip_calls):
    weights = {"clip": None, "aesthetic": twins["aesthetic"]["weights"], "hpsv2": twins["hpsv2"]["weights"]}[name]
    with pytest.raises(_Built):
        build_scorer(name, **{"weights": weights, **options})
    assert open_clip_calls[-1].get("force_quick_gelu", False) is quick_gelu


def test_an_aesthetic_arch_without_a_backbone_is_refused_not_built_random(twins):
    with pytest.raises(WeightsNotFound) as caught:
        build_scorer("aesthetic", weights=twins["aesthetic"]["weights"], arch="tiny")
    message = str(caught.value)
    assert "evaluate.aesthetic.arch='tiny'" in message and "evaluate.aesthetic.backbone" in message
    assert "pretrained tag" in message and "weights file" in message and "'openai'" in message


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
@pytest.mark.parametrize("name", ("aesthetic", "clip"))
def test_openais_torchscript_clip_file_is_refused_naming_the_scorer_the_file_and_what_to_give(name, twins, tmp_path):
    archive = tmp_path / "ViT-L-14.pt"  # OpenAI's release is a TorchScript archive, as this scripted module's file
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)
    key = {"aesthetic": "backbone", "clip": "weights"}[name]
    with pytest.raises(ValueError) as caught:
        build_scorer(name, **{**twins[name], key: str(archive)})
    message = str(caught.value)
    assert f"{name} scorer" in message and f"evaluate.{name}.{key}" in message and str(archive) in message
    assert "TorchScript" in message and "open_clip-format state dict" in message and "'openai'" in message


def test_random_clip_weights_are_an_explicit_value_never_a_fallback(twins):
    with pytest.raises(WeightsNotFound) as caught:
        build_scorer("clip", arch="tiny")
    message = str(caught.value)
    assert "clip scorer" in message and "evaluate.clip.weights" in message
    assert "pretrained tag" in message and "weights file" in message and "'random'" in message
    scorer = build_scorer("clip", weights="random", arch="tiny")
    assert scorer.embedder.identity == ClipEmbedder("tiny", "random").identity  # seeded: the same in every process
    assert scorer.embedder.identity["pretrained"] == "random"
    # A reward model's backbone is never random, even when asked.
    with pytest.raises(ValueError, match="aesthetic scorer: evaluate.aesthetic.backbone='random'"):
        build_scorer("aesthetic", **{**twins["aesthetic"], "backbone": "random"})


def test_pickscore_uses_the_backbones_processor_not_files_beside_the_weights(twins, scorers, tmp_path):
    from transformers import CLIPImageProcessorPil

    folder = tmp_path / "PickScore_v1"
    shutil.copytree(twins["pickscore"]["weights"], folder)
    # A complete processor beside the weights that differs from the backbone's: 16 px crops, other statistics.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(twins["pickscore"]["backbone"]) / name, folder / name)
    (folder / "preprocessor_config.json").write_text(
        '{"crop_size": 16, "size": 16, "do_center_crop": true, "do_normalize": true, "do_resize": true, '
        '"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, '
        '"feature_extractor_type": "CLIPFeatureExtractor"}')
    scorer = build_scorer("pickscore", weights=str(folder), backbone=twins["pickscore"]["backbone"])
    image_processor = scorer.processor.image_processor
    assert isinstance(image_processor, CLIPImageProcessorPil)  # PIL resizing, as the published code ran
    assert image_processor.crop_size == {"height": 32, "width": 32} and image_processor.resample == 3  # bicubic
    expected = scorers["pickscore"].score(_images(), _prompts())  # the twin, whose folder has no processor beside it
    np.testing.assert_array_equal(scorer.score(_images(), _prompts()), expected)


def test_pickscores_processor_defaults_to_the_published_laion_one(twins, monkeypatch):
    import pipeline.evaluate.scorer_pickscore as pickscore

    asked = []

    def record(spec, **kwargs):  # what is fetched, recorded instead of fetched (the hub may be there or not)
        asked.append((spec, kwargs.get("key", "weights")))
        if asked[-1][1] == "backbone":
            raise _Built
        return Path(spec)

    monkeypatch.setattr(pickscore, "resolve_folder", record)
    with pytest.raises(_Built):
        build_scorer("pickscore", weights=twins["pickscore"]["weights"])
    assert asked == [(twins["pickscore"]["weights"], "weights"), ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "backbone")]
