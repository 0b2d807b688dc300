import shutil

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.models import loader
from pipeline.models.loader import ModelNotFoundError, detect_kind, load_components, model_identity


def test_sdxl_folder_loads_every_part(tiny_sdxl):
    components = load_components(str(tiny_sdxl))
    assert components.kind == "sdxl" and components.source == str(tiny_sdxl)
    assert isinstance(components.unet, UNet2DConditionModel)
    assert isinstance(components.vae, AutoencoderKL)
    assert [type(encoder) for encoder in components.text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    assert [type(tokenizer) for tokenizer in components.tokenizers] == [CLIPTokenizer, CLIPTokenizer]
    # The folder names an Euler sampler; training gets DDPM with the same betas.
    assert isinstance(components.scheduler, DDPMScheduler)
    assert components.scheduler.config.beta_schedule == "scaled_linear"
    assert components.scheduler.config.num_train_timesteps == 1000
    assert components.unet.dtype == torch.float32


def test_sd15_folder_loads_one_text_encoder(tiny_sd15):
    components = load_components(str(tiny_sd15), parts=("text",))
    assert components.kind == "sd15"
    assert [type(encoder) for encoder in components.text_encoders] == [CLIPTextModel]
    assert len(components.tokenizers) == 1


def test_only_the_parts_asked_for_are_loaded(tiny_sdxl):
    components = load_components(str(tiny_sdxl), parts=("unet", "scheduler"), dtype=torch.bfloat16)
    assert components.vae is None and components.text_encoders == [] and components.tokenizers == []
    assert components.unet.dtype == torch.bfloat16
    assert components.scheduler is not None
    text_only = load_components(str(tiny_sdxl), parts=("text",), dtype=torch.float16)
    assert text_only.unet is None and text_only.scheduler is None
    assert {encoder.dtype for encoder in text_only.text_encoders} == {torch.float16}


def test_detect_kind(tiny_sdxl, tiny_sd15):
    assert detect_kind(str(tiny_sdxl)) == "sdxl"
    assert detect_kind(str(tiny_sd15)) == "sd15"


def test_a_home_relative_folder_is_found(tiny_sd15, monkeypatch):
    monkeypatch.setenv("HOME", str(tiny_sd15.parent))
    components = load_components(f"~/{tiny_sd15.name}", parts=("unet",))
    assert components.kind == "sd15" and components.unet is not None


def test_a_kind_that_contradicts_the_folder_is_an_error(tiny_sd15):
    with pytest.raises(ValueError, match="model.kind is 'sdxl' but .*StableDiffusionPipeline"):
        load_components(str(tiny_sd15), kind="sdxl", parts=("scheduler",))


def test_unknown_part_is_an_error(tiny_sd15):
    with pytest.raises(ValueError, match="Unknown model parts \\['text_encoder'\\]"):
        load_components(str(tiny_sd15), parts=("text_encoder",))


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelNotFoundError, match=f"no folder {missing}"):
        load_components(str(missing))


def test_folder_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match=f"{tmp_path} has no model_index.json"):
        detect_kind(str(tmp_path))


def test_unreachable_hub_id_is_a_clear_error():
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # set by tests/conftest.py: no network is tried
    expected = "'rpo-tests/no-such-model' is neither a local folder .* nor a hub repo that could be fetched"
    with pytest.raises(ModelNotFoundError, match=expected):
        load_components("rpo-tests/no-such-model")


def test_identity_follows_content_not_location(tiny_sd15, tmp_path):
    identity = model_identity(str(tiny_sd15))
    assert identity["kind"] == "sd15" and identity["source"] == str(tiny_sd15)
    copy = shutil.copytree(tiny_sd15, tmp_path / "copy")
    assert model_identity(str(copy))["sha256"] == identity["sha256"]
    _perturb_unet_weight(copy)
    assert model_identity(str(copy))["sha256"] != identity["sha256"]


def test_identity_by_samples_follows_the_weights(tiny_sd15, tmp_path, monkeypatch):
    full = model_identity(str(tiny_sd15))["sha256"]
    monkeypatch.setattr(loader, "FULL_HASH_MAX_BYTES", 1024)  # hash every weight file the way multi-GB ones are
    sampled = model_identity(str(tiny_sd15))["sha256"]
    assert sampled != full
    copy = shutil.copytree(tiny_sd15, tmp_path / "copy")
    assert model_identity(str(copy))["sha256"] == sampled
    _perturb_unet_weight(copy)
    assert model_identity(str(copy))["sha256"] != sampled


def _perturb_unet_weight(folder):
    weights_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(weights_file)
    weights["conv_in.weight"] = weights["conv_in.weight"] + 1e-3
    save_file(weights, weights_file, metadata={"format": "pt"})
