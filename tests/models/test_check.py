"""pipeline.models.check: a base model is checked from configs and safetensors headers, without loading weights."""

import json
import shutil
import struct
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from pipeline.models import architectures, check
from pipeline.models.architectures import ARCHITECTURES, PUBLISHED_PARAMETERS, build_on_meta, count_parameters
from pipeline.models.check import check_pipeline

SDXL_ROWS = ["pipeline", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
MODEL_CLASSES = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
                 "text_encoder_2": CLIPTextModelWithProjection}
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def rows(checks):
    return {c.component: c for c in checks}


def failing(checks):
    return sorted(c.component for c in checks if not c.ok)


@pytest.fixture
def sdxl_copy(tiny_sdxl, tmp_path):
    """A private copy of the session's tiny SDXL folder, free to break."""
    return shutil.copytree(tiny_sdxl, tmp_path / "sdxl")


# ------------------------------------------------------------------------------------------ local folders


def test_tiny_sdxl_folder_passes_with_the_loaded_models_parameter_counts(tiny_sdxl):
    checks = check_pipeline(str(tiny_sdxl))
    assert [c.component for c in checks] == SDXL_ROWS
    assert failing(checks) == [], [c.problem for c in checks]
    by_name = rows(checks)
    for name, model_class in MODEL_CLASSES.items():
        loaded = model_class.from_pretrained(tiny_sdxl / name)
        assert by_name[name].parameters == count_parameters(loaded), name
    assert by_name["pipeline"].cls == "StableDiffusionXLPipeline" and "kind sdxl" in by_name["pipeline"].found
    assert "unet/diffusion_pytorch_model.safetensors" in by_name["unet"].found


def test_tiny_sd15_folder_passes_with_one_text_encoder(tiny_sd15):
    checks = check_pipeline(str(tiny_sd15))
    assert [c.component for c in checks] == ["pipeline", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    assert failing(checks) == []


def test_unet_weights_of_another_architecture_fail_naming_the_file_and_keys(sdxl_copy, tiny_sdxl, tiny_sd15):
    shutil.copy(tiny_sd15 / UNET_FILE, sdxl_copy / UNET_FILE)
    checks = check_pipeline(str(sdxl_copy))
    assert failing(checks) == ["unet"]
    unet = rows(checks)["unet"]
    assert str(sdxl_copy / UNET_FILE) in unet.problem
    # SD1.5 has no SDXL micro-conditioning embedding, and its cross-attention reads 32-wide text, not 96.
    assert "missing" in unet.problem and "add_embedding.linear_1.weight" in unet.problem
    assert "with other shapes" in unet.problem and "to_k.weight: file [" in unet.problem
    assert "another architecture" in unet.fix
    assert unet.parameters == count_parameters(UNet2DConditionModel.from_pretrained(tiny_sdxl / "unet"))


def test_a_missing_weight_file_fails_naming_what_was_looked_for(sdxl_copy):
    (sdxl_copy / "vae/diffusion_pytorch_model.safetensors").unlink()
    checks = check_pipeline(str(sdxl_copy))
    assert failing(checks) == ["vae"]
    vae = rows(checks)["vae"]
    assert str(sdxl_copy / "vae") in vae.problem and "diffusion_pytorch_model.safetensors" in vae.problem
    assert "download" in vae.fix


def test_a_missing_tokenizer_and_scheduler_fail(sdxl_copy):
    shutil.rmtree(sdxl_copy / "tokenizer_2")
    (sdxl_copy / "scheduler/scheduler_config.json").unlink()
    checks = check_pipeline(str(sdxl_copy))
    assert failing(checks) == ["scheduler", "tokenizer_2"]
    assert "scheduler_config.json" in rows(checks)["scheduler"].problem


def test_a_variant_that_is_asked_for_but_absent_fails_naming_model_variant(tiny_sdxl):
    checks = check_pipeline(str(tiny_sdxl), variant="fp16")
    assert failing(checks) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    unet = rows(checks)["unet"]
    assert "model.variant='fp16'" in unet.problem and "diffusion_pytorch_model.fp16.safetensors" in unet.problem
    assert "set model.variant to null" in unet.fix


def test_a_variant_saved_by_save_pretrained_passes_with_that_variant(sdxl_copy):
    for name, model_class in MODEL_CLASSES.items():
        folder = sdxl_copy / name
        model = model_class.from_pretrained(folder, torch_dtype=torch.float16)
        for weights in folder.glob("*.safetensors"):
            weights.unlink()  # only the variant's files remain
        model.save_pretrained(folder, variant="fp16")
    checks = check_pipeline(str(sdxl_copy), variant="fp16")
    assert failing(checks) == [], [c.problem for c in checks]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in rows(checks)["unet"].found
    assert "model.fp16.safetensors" in rows(checks)["text_encoder"].found and "(F16)" in rows(checks)["vae"].found
    # Without the variant the loader finds nothing: the check says which variant is there.
    plain = rows(check_pipeline(str(sdxl_copy)))["unet"]
    assert not plain.ok and plain.fix == "set model.variant to fp16"


def test_sharded_weights_are_checked_shard_by_shard(sdxl_copy):
    folder = sdxl_copy / "unet"
    unet = UNet2DConditionModel.from_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(folder, max_shard_size="1MB")
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert rows(check_pipeline(str(sdxl_copy)))["unet"].ok
    shards[-1].unlink()
    unet_row = rows(check_pipeline(str(sdxl_copy)))["unet"]
    assert not unet_row.ok and shards[-1].name in unet_row.problem and "index.json" in unet_row.problem


def test_a_truncated_safetensors_file_fails(sdxl_copy):
    weights = sdxl_copy / UNET_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download: the header is whole, the data is not
    unet = rows(check_pipeline(str(sdxl_copy)))["unet"]
    assert not unet.ok and "truncated" in unet.problem and "download the file again" in unet.fix


def test_pickle_weights_are_checked_by_shapes_without_loading(sdxl_copy, tiny_sd15):
    vae = AutoencoderKL.from_pretrained(sdxl_copy / "vae")
    (sdxl_copy / "vae/diffusion_pytorch_model.safetensors").unlink()
    vae.save_pretrained(sdxl_copy / "vae", safe_serialization=False)
    row = rows(check_pipeline(str(sdxl_copy)))["vae"]
    assert row.ok and "diffusion_pytorch_model.bin" in row.found and "tensors" in row.found
    state = {k: torch.zeros(2) for k in load_file(tiny_sd15 / "vae/diffusion_pytorch_model.safetensors")}
    torch.save(state, sdxl_copy / "vae/diffusion_pytorch_model.bin")  # the right names, wrong shapes
    row = rows(check_pipeline(str(sdxl_copy)))["vae"]
    assert not row.ok and "with other shapes" in row.problem


def test_keys_the_libraries_rename_or_drop_still_match(sdxl_copy):
    # An old diffusers VAE names its attention query/key/value/proj_attn; old CLIP files keep position_ids.
    vae_file = sdxl_copy / "vae/diffusion_pytorch_model.safetensors"
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, tensor in load_file(vae_file).items():
        for new, old in old_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[key] = tensor
    assert "encoder.mid_block.attentions.0.query.weight" in renamed
    save_file(renamed, vae_file)
    text_file = sdxl_copy / "text_encoder/model.safetensors"
    save_file({**load_file(text_file), "text_model.embeddings.position_ids": torch.arange(77)[None]}, text_file)
    assert failing(check_pipeline(str(sdxl_copy))) == []
    save_file({**load_file(text_file), "text_model.extra.weight": torch.zeros(1)}, text_file)
    text = rows(check_pipeline(str(sdxl_copy)))["text_encoder"]
    assert not text.ok and "1 unexpected (text_model.extra.weight [1])" in text.problem


def test_text_encoders_from_another_model_fail_the_unets_conditioning(sdxl_copy):
    # text_encoder_2 replaced by a 32-wide CLIPTextModelWithProjection: it builds and its weights match its own
    # config, but the UNet attends to 32 + 64 = 96-wide text and pools a 40-wide projection.
    config = json.loads((sdxl_copy / "text_encoder/config.json").read_text())
    narrow = CLIPTextModelWithProjection(CLIPTextModelWithProjection.config_class.from_dict(config))
    shutil.rmtree(sdxl_copy / "text_encoder_2")
    narrow.save_pretrained(sdxl_copy / "text_encoder_2")
    checks = check_pipeline(str(sdxl_copy))
    assert failing(checks) == ["unet"]
    problem = rows(checks)["unet"].problem
    assert "96-wide text states" in problem and "text_encoder_2 32" in problem
    assert "projection_class_embeddings_input_dim" in problem


def test_a_folder_without_model_index_or_of_another_kind_fails(sdxl_copy):
    assert failing(check_pipeline(str(sdxl_copy), kind="sd15")) == ["pipeline"]
    assert "set model.kind to auto or sdxl" == check_pipeline(str(sdxl_copy), kind="sd15")[0].fix
    (sdxl_copy / "model_index.json").unlink()
    only = check_pipeline(str(sdxl_copy))
    assert len(only) == 1 and not only[0].ok and "model_index.json" in only[0].problem


# --------------------------------------------------------------------------------------------- hub ids


def test_published_architectures_build_on_meta_with_exactly_the_published_counts():
    started = time.perf_counter()
    for kind, parts in ARCHITECTURES.items():
        assert set(parts) == set(PUBLISHED_PARAMETERS[kind])
        for component in parts:
            model = build_on_meta(kind, component)
            assert next(model.parameters()).device.type == "meta"
            assert count_parameters(model) == PUBLISHED_PARAMETERS[kind][component], (kind, component)
    assert time.perf_counter() - started < 30  # seconds (about 2 s on 2 free cores): nothing is allocated


def test_known_hub_ids_offline_are_built_from_the_shipped_architecture():
    checks = check_pipeline("stabilityai/stable-diffusion-xl-base-1.0", offline=True, variant="fp16")
    assert [c.component for c in checks] == SDXL_ROWS and failing(checks) == []
    assert rows(checks)["unet"].parameters == 2_567_463_684
    assert rows(checks)["text_encoder_2"].parameters == 694_659_840
    sd15 = check_pipeline("runwayml/stable-diffusion-v1-5", offline=True)
    assert failing(sd15) == [] and rows(sd15)["unet"].parameters == 859_520_964
    odd = check_pipeline("stabilityai/stable-diffusion-xl-base-1.0", offline=True, variant="int3")
    assert failing(odd) == ["pipeline"] and "model.variant 'int3'" in odd[0].problem


def test_a_shipped_config_that_misses_its_published_count_is_a_project_bug(monkeypatch):
    monkeypatch.setitem(architectures.PUBLISHED_PARAMETERS["sd15"], "vae", 83_653_862)
    checks = check_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", offline=True)
    assert failing(checks) == ["vae"]
    vae = rows(checks)["vae"]
    assert "83,653,863" in vae.problem and "bug" in vae.problem and "architectures.py" in vae.fix


def test_an_unknown_hub_id_offline_fails_with_the_fix():
    checks = check_pipeline("someone/their-finetune", offline=True)
    assert len(checks) == 1 and not checks[0].ok
    assert "cannot be checked offline" in checks[0].problem
    assert "without --offline" in checks[0].fix and "model.pretrained" in checks[0].fix
    not_an_id = check_pipeline("no/such/folder", offline=True)
    assert not not_an_id[0].ok and "not a hub id" in not_an_id[0].problem


class FakeHub:
    """The hub's answers for a repo mirrored from a local folder: its listing, small files and safetensors headers.
    Asking for anything else (a weight file) fails the test."""

    def __init__(self, folder):
        self.folder = folder
        self.files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        self.headers_read = []

    def list_repo_files(self, repo, *, revision=None):
        assert revision == "abc123"
        return self.files

    def hf_hub_download(self, repo, filename, *, revision=None):
        assert filename.endswith(".json"), f"downloaded {filename}"
        return str(self.folder / filename)

    def parse_safetensors_file_metadata(self, repo, filename, *, revision=None):
        self.headers_read.append(filename)
        with (self.folder / filename).open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        header.pop("__metadata__", None)
        tensors = {key: SimpleNamespace(shape=info["shape"], dtype=info["dtype"]) for key, info in header.items()}
        return SimpleNamespace(tensors=tensors)


@pytest.fixture
def fake_hub(monkeypatch, sdxl_copy):
    hub = FakeHub(sdxl_copy)
    # Bound methods of `hub` set on the class stay bound to `hub`: the HfApi instance is not passed.
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", hub.list_repo_files)
    monkeypatch.setattr(huggingface_hub.HfApi, "parse_safetensors_file_metadata", hub.parse_safetensors_file_metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub


def test_online_a_hub_repo_is_checked_from_its_listing_and_headers(fake_hub):
    checks = check_pipeline("someone/tiny-sdxl", revision="abc123")
    assert failing(checks) == [], [c.problem for c in checks]
    assert sorted(fake_hub.headers_read) == sorted(
        ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
         "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"])
    assert "someone/tiny-sdxl@abc123:model_index.json" in checks[0].found
    fp16 = rows(check_pipeline("someone/tiny-sdxl", revision="abc123", variant="fp16"))["unet"]
    assert not fp16.ok and "someone/tiny-sdxl@abc123:unet" in fp16.problem and "model.variant='fp16'" in fp16.problem


def test_online_a_known_hub_id_must_build_to_its_published_counts(fake_hub):
    # The tiny folder posing as SDXL base: every component builds, but not to the published parameter counts.
    checks = check_pipeline("stabilityai/stable-diffusion-xl-base-1.0", revision="abc123")
    assert failing(checks) == ["text_encoder", "text_encoder_2", "unet", "vae"]
    assert "2,567,463,684" in rows(checks)["unet"].problem and "model.revision" in rows(checks)["unet"].fix


def test_the_hub_unreachable_online_fails_with_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", offline)
    checks = check_pipeline("stabilityai/stable-diffusion-xl-base-1.0")
    assert len(checks) == 1 and "cannot list the hub repo" in checks[0].problem and "--offline" in checks[0].fix


def test_weight_file_names_follow_the_libraries():
    from diffusers.utils import hub_utils
    from transformers import modeling_utils

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        for variant in (None, "fp16"):
            assert check._add_variant(name, variant) == hub_utils._add_variant(name, variant)
            assert check._add_variant(name, variant) == modeling_utils._add_variant(name, variant)
    assert check.weight_candidates("unet", "fp16") == [
        ("diffusion_pytorch_model.safetensors.index.fp16.json", "safetensors-index"),
        ("diffusion_pytorch_model.fp16.safetensors.index.json", "safetensors-index"),
        ("diffusion_pytorch_model.fp16.safetensors", "safetensors"),
        ("diffusion_pytorch_model.fp16.bin", "bin")]
    assert [name for name, _ in check.weight_candidates("text_encoder", None)] == [
        "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
