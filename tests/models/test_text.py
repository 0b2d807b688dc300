import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from pipeline.models.loader import load_components
from pipeline.models.text import encode_prompts, sdxl_add_time_ids

CAPTIONS = ["a watercolor of a fox", "", "a very long caption " * 30]  # empty and truncated (> 77 tokens) included


def test_sdxl_embeddings_equal_the_pipelines_own(tiny_sdxl):
    text = load_components(str(tiny_sdxl), parts=("text",))
    prompt_embeds, pooled = encode_prompts(text.text_encoders, text.tokenizers, CAPTIONS, kind="sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    expected, _, expected_pooled, _ = pipe.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False)
    hidden_1, hidden_2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert prompt_embeds.shape == (3, 77, hidden_1 + hidden_2)
    assert pooled.shape == (3, pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(prompt_embeds, expected)
    assert torch.equal(pooled, expected_pooled)
    assert not prompt_embeds.requires_grad and not pooled.requires_grad


def test_sd15_embeddings_equal_the_pipelines_own(tiny_sd15):
    text = load_components(str(tiny_sd15), parts=("text",))
    prompt_embeds, pooled = encode_prompts(text.text_encoders, text.tokenizers, CAPTIONS, kind="sd15")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    expected, _ = pipe.encode_prompt(CAPTIONS, "cpu", 1, do_classifier_free_guidance=False)
    assert pooled is None
    assert prompt_embeds.shape == (3, 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(prompt_embeds, expected)


def test_one_caption_gives_the_same_row_as_in_a_batch(tiny_sdxl):
    text = load_components(str(tiny_sdxl), parts=("text",))
    batch, batch_pooled = encode_prompts(text.text_encoders, text.tokenizers, CAPTIONS, kind="sdxl")
    single, single_pooled = encode_prompts(text.text_encoders, text.tokenizers, CAPTIONS[:1], kind="sdxl")
    torch.testing.assert_close(single[0], batch[0])
    torch.testing.assert_close(single_pooled[0], batch_pooled[0])


def test_wrong_number_of_encoders_is_an_error(tiny_sd15):
    text = load_components(str(tiny_sd15), parts=("text",))
    with pytest.raises(ValueError, match="A sdxl model has 2 text encoder"):
        encode_prompts(text.text_encoders, text.tokenizers, CAPTIONS, kind="sdxl")


def test_add_time_ids_follow_diffusers_order(tiny_sdxl):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    original, crop, target = (768, 1024), (16, 32), (512, 640)
    pooled_dim = pipe.text_encoder_2.config.projection_dim
    expected = pipe._get_add_time_ids(original, crop, target, torch.float32, text_encoder_projection_dim=pooled_dim)
    assert sdxl_add_time_ids(original, crop, target) == [768, 1024, 16, 32, 512, 640]
    assert sdxl_add_time_ids(original, crop, target) == expected[0].int().tolist()
