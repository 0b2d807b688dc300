"""ImageReward on its tiny twin: the published file layout, independent references for both encoders, the
published normalisation, and the errors for missing or misfitting weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluate import scorers
from pipeline.evaluate.imagereward import (
    PUBLISHED_MEAN,
    PUBLISHED_STD,
    TINY_ARCH,
    ImageRewardArch,
    ImageRewardScorer,
    WeightsNotFound,
    load_arch,
    save_tiny_twin,
)


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> dict:
    return save_tiny_twin(tmp_path_factory.mktemp("imagereward_twin"))


@pytest.fixture(scope="module")
def scorer(twin) -> ImageRewardScorer:
    return ImageRewardScorer.load(**twin)


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # Not square and not 32 px: the published resize + centre crop must run.
    return [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(n)]


def published_keys(depth: int, layers: int) -> set[str]:
    """The key names of the published ImageReward.pt, written out from THUDM's module tree (vit.py, med.py,
    ImageReward.py), independently of our module's state_dict()."""
    wb = ("weight", "bias")
    keys = {f"blip.visual_encoder.{k}" for k in ("cls_token", "pos_embed", "patch_embed.proj.weight",
                                                  "patch_embed.proj.bias", "norm.weight", "norm.bias")}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blip.visual_encoder.blocks.{i}.{part}.{x}" for x in wb}
    keys |= {"blip.text_encoder.embeddings.word_embeddings.weight",
             "blip.text_encoder.embeddings.position_embeddings.weight",
             "blip.text_encoder.embeddings.LayerNorm.weight", "blip.text_encoder.embeddings.LayerNorm.bias",
             "blip.text_encoder.embeddings.position_ids"}
    for i in range(layers):
        prefix = f"blip.text_encoder.encoder.layer.{i}"
        for att in ("attention", "crossattention"):
            for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys |= {f"{prefix}.{att}.{part}.{x}" for x in wb}
        for part in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys |= {f"{prefix}.{part}.{x}" for x in wb}
    keys |= {f"blip.{p}.{x}" for p in ("vision_proj", "text_proj") for x in wb}
    keys |= {f"mlp.layers.{i}.{x}" for i in (0, 2, 4, 6, 7) for x in wb}
    return keys


def test_twin_is_small_and_uses_the_published_key_names(twin):
    assert Path(twin["weights"]).stat().st_size < 5e6
    state = torch.load(twin["weights"], weights_only=True)
    v, t = TINY_ARCH.vision, TINY_ARCH.text
    assert set(state) == published_keys(v.depth, t.num_hidden_layers)
    # Cross-attention reads the ViT's width; the head's widths are the published ones.
    assert state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"].shape == (t.hidden_size, v.width)
    assert [tuple(state[f"mlp.layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, t.hidden_size), (128, 1024), (64, 128), (16, 64), (1, 16)]


def test_encoders_match_independent_implementations(scorer):
    """Our ViT and BLIP-BERT against timm's ViT and transformers' BLIP text model, loaded with the same tensors."""
    import timm
    from transformers import BlipTextConfig, BlipTextModel

    v, t = scorer.model.arch.vision, scorer.model.arch.text
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=v.image_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth, num_heads=v.heads,
        num_classes=0, global_pool="", qkv_bias=True).eval()
    vit.load_state_dict(scorer.model.blip.visual_encoder.state_dict(), strict=True)
    bert = BlipTextModel(BlipTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=v.width,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads, max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps, is_decoder=True, bos_token_id=None), add_pooling_layer=False).eval()
    bert.load_state_dict(scorer.model.blip.text_encoder.state_dict(), strict=True)

    pixels = scorer.pixels(_images(3))
    ids, mask = scorer.tokens(["a red cat", "a blue dog in the style of a sketch, with a longer prompt", "x"])
    assert mask.sum(1).unique().numel() == 3  # padding differs per prompt, so the mask matters
    with torch.no_grad():
        image_tokens = scorer.model.blip.visual_encoder(pixels)
        torch.testing.assert_close(image_tokens, vit.forward_features(pixels), rtol=0, atol=1e-5)
        ours = scorer.model.blip.text_encoder(ids, mask, image_tokens)
        theirs = bert(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
                      is_decoder=False).last_hidden_state  # BLIP's bidirectional "multimodal" mode
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


def test_scores_are_finite_float64_and_deterministic(twin, scorer):
    images, prompts = _images(4), ["a red circle", "a sketch of a cat", "photo", "a green square"]
    scores = scorer.score(images, prompts)
    assert scores.dtype == np.float64 and scores.shape == (4,) and np.isfinite(scores).all()
    again = ImageRewardScorer.load(**twin).score(images, prompts)
    np.testing.assert_array_equal(scores, again)
    # Batched scoring equals the published one-image-at-a-time scoring.
    one_by_one = np.concatenate([scorer.score([i], [p]) for i, p in zip(images, prompts)])
    np.testing.assert_allclose(scores, one_by_one, rtol=0, atol=1e-5)
    assert scorer.score([], []).shape == (0,)


def test_different_images_and_prompts_get_different_scores(scorer):
    images = _images(3)
    by_image = scorer.score(images, ["a red cat"] * 3)
    by_prompt = scorer.score([images[0]] * 3, ["a red cat", "a blue dog", "a sketch of a green square"])
    assert len(set(np.round(by_image, 6))) == 3
    assert len(set(np.round(by_prompt, 6))) == 3


def test_score_is_the_head_output_under_the_published_normalisation(scorer):
    assert (PUBLISHED_MEAN, PUBLISHED_STD) == (0.16717362830052426, 1.0333394966054072)
    images, prompts = _images(2, seed=1), ["a red cat", "a dog"]
    blip = scorer.model.blip
    with torch.no_grad():
        ids, mask = scorer.tokens(prompts)
        assert (ids[:, 0] == scorer.tokenizer.cls_token_id).all()  # position 0 is [CLS], as published
        text = blip.text_encoder(ids, mask, blip.visual_encoder(scorer.pixels(images)))
        raw = scorer.model.mlp(text[:, 0, :]).squeeze(-1).double().numpy()
    np.testing.assert_allclose(scorer.score(images, prompts), (raw - PUBLISHED_MEAN) / PUBLISHED_STD,
                               rtol=0, atol=1e-6)


def test_missing_weights_name_scorer_path_source_and_config_key(tmp_path, twin):
    missing = tmp_path / "nowhere" / "ImageReward.pt"
    with pytest.raises(WeightsNotFound) as err:
        ImageRewardScorer.load(weights=str(missing), backbone=twin["backbone"], arch=twin["arch"])
    assert isinstance(err.value, scorers.WeightsNotFound)  # the class every scorer raises
    message = str(err.value)
    for needle in ("imagereward", str(missing), "evaluate.imagereward.weights", "THUDM/ImageReward",
                   "ImageReward.pt", "med_config.json", "bert-base-uncased"):
        assert needle in message
    with pytest.raises(WeightsNotFound, match="not given.*evaluate.imagereward.weights"):
        ImageRewardScorer.load(weights=None, backbone=twin["backbone"], arch=twin["arch"])
    with pytest.raises(WeightsNotFound, match="folder has no ImageReward.pt"):
        ImageRewardScorer.load(weights=str(tmp_path), backbone=twin["backbone"], arch=twin["arch"])
    with pytest.raises(WeightsNotFound, match="evaluate.imagereward.backbone"):
        ImageRewardScorer.load(weights=twin["weights"], backbone=str(tmp_path / "no_tokenizer"), arch=twin["arch"])


def test_a_state_dict_that_does_not_fit_names_the_keys(tmp_path, twin):
    state = torch.load(twin["weights"], weights_only=True)
    renamed = dict(state)
    renamed["blip.text_encoder.encoder.layer.1.crossattention.self.kkey.weight"] = renamed.pop(
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ValueError) as err:
        ImageRewardScorer.load(weights=str(tmp_path / "renamed.pt"), backbone=twin["backbone"], arch=twin["arch"])
    assert "missing keys (1)" in str(err.value) and "unexpected keys (1)" in str(err.value)
    assert "crossattention.self.key.weight" in str(err.value) and "self.kkey.weight" in str(err.value)

    state["mlp.layers.0.weight"] = state["mlp.layers.0.weight"][:, :-1]
    torch.save(state, tmp_path / "misshapen.pt")
    with pytest.raises(ValueError, match=r"wrong shapes \(1\).*mlp\.layers\.0\.weight"):
        ImageRewardScorer.load(weights=str(tmp_path / "misshapen.pt"), backbone=twin["backbone"], arch=twin["arch"])


def test_published_med_config_gives_the_published_text_encoder(tmp_path):
    """The hub's med_config.json (THUDM/ImageReward), as published, read beside the weights."""
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
           "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524,
           "encoder_width": 768, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    arch = load_arch(None, med_config=tmp_path / "med_config.json")
    assert arch == ImageRewardArch() and arch.vision.width == 1024 and arch.vision.depth == 24  # ViT-L/16
    (tmp_path / "med_config.json").write_text(json.dumps({**med, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        load_arch(None, med_config=tmp_path / "med_config.json")


@pytest.mark.parametrize("content, why", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:4a1b\nsize 1787445451\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html>Access denied</html>", "HTML or JSON text"),
    (None, "truncated or corrupt"),  # the first 300 bytes of the real file format: a download cut short
])
def test_an_unreadable_weights_file_names_the_scorer_the_file_and_where_the_real_one_comes_from(
        content, why, tmp_path, twin):
    bad = tmp_path / "ImageReward.pt"
    bad.write_bytes(content if content is not None else Path(twin["weights"]).read_bytes()[:300])
    with pytest.raises(ValueError) as err:
        ImageRewardScorer.load(weights=str(tmp_path), backbone=twin["backbone"], arch=twin["arch"])
    message = str(err.value)
    for needle in ("imagereward scorer", str(bad), why, "ImageReward.pt", "THUDM/ImageReward",
                   "evaluate.imagereward.weights", "download it again"):
        assert needle in message, needle
