import json

import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from pipeline.models.tiny import build_tiny_sd15, build_tiny_sdxl

CAPTIONS = ["a photo of a cat", "A Sketch of  a DOG, running.", "naïve café, 3 apples & it's", "", "word " * 100]


def test_tiny_sdxl_is_a_plain_diffusers_sdxl_pipeline(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + (
        pipe.text_encoder_2.config.projection_dim
    )
    assert sum(p.numel() for p in pipe.unet.parameters()) < 2_000_000
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean.shape == (1, 4, 8, 8)  # 8x down
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    image = pipe(
        "a red square", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (64, 64)


def test_tiny_sd15_is_a_plain_diffusers_sd15_pipeline(tiny_sd15):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    assert pipe.safety_checker is None
    assert pipe.unet.config.addition_embed_type is None
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    image = pipe("a red square", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_tokenizers_give_open_clip_ids(tiny_sdxl):
    reference = open_clip.tokenize(CAPTIONS)  # pads with 0, like SDXL's second tokenizer
    for folder in ("tokenizer", "tokenizer_2"):
        tokenizer = CLIPTokenizer.from_pretrained(tiny_sdxl / folder)
        assert tokenizer.model_max_length == 77
        ids = tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        padding = reference == 0
        assert torch.equal(ids[~padding], reference[~padding])
        assert (ids[padding] == tokenizer.pad_token_id).all()
    # Like SDXL's own tokenizer_2 (pad token "!", diffusers issue #4153), a "!" in a prompt becomes padding.
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny_sdxl / "tokenizer_2")
    assert tokenizer_2.pad_token_id == 0
    assert tokenizer_2("wow!!").input_ids == [49406, 2781, 0, 0, 49407]  # open_clip: [49406, 2781, 748, 49407]
    assert (tiny_sdxl / "tokenizer" / "vocab.json").is_file() and (tiny_sdxl / "tokenizer" / "merges.txt").is_file()


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_sd15, tmp_path):
    same = build_tiny_sd15(tmp_path / "same", seed=0)
    other = build_tiny_sd15(tmp_path / "other", seed=1)
    weight_files = sorted(path.relative_to(tiny_sd15) for path in tiny_sd15.rglob("*.safetensors"))
    assert len(weight_files) == 3  # unet, vae, text_encoder
    for weight_file in weight_files:
        reference, repeated = load_file(tiny_sd15 / weight_file), load_file(same / weight_file)
        assert reference.keys() == repeated.keys()
        assert all(torch.equal(reference[name], repeated[name]) for name in reference), weight_file
    unet_file = "unet/diffusion_pytorch_model.safetensors"
    reference, different = load_file(tiny_sd15 / unet_file), load_file(other / unet_file)
    assert not torch.equal(reference["conv_in.weight"], different["conv_in.weight"])


def test_build_returns_a_complete_folder_as_is(tiny_sdxl):
    weights = tiny_sdxl / "unet" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_sdxl(tiny_sdxl, seed=1) == tiny_sdxl
    assert weights.stat().st_mtime_ns == before
    # Built in a temp folder next to it and renamed: nothing else is left in the parent.
    assert [path.name for path in tiny_sdxl.parent.iterdir()] == [tiny_sdxl.name]


def test_build_refuses_a_foreign_folder(tmp_path):
    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not_a_model.*no model_index.json"):
        build_tiny_sd15(folder)
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["not_a_model"]


def test_model_index_names_the_pipeline(tiny_sdxl, tiny_sd15):
    assert json.loads((tiny_sdxl / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((tiny_sd15 / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
