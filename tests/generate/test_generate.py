"""Generation through Ray Data actors: deterministic, paired by starting noise, loading our outputs with diffusers."""

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline.config import load_config
from pipeline.generate.models import resolve_model
from pipeline.generate.prompts import PromptFileError, load_prompt_file
from pipeline.generate.run import run_generation
from pipeline.precompute import resolve_model_path
from pipeline.train.checkpoint import _save_lora


def _config(storage, *overrides):
    return load_config(None, [
        f"cluster.storage_path={storage}", "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0",
        "precompute.resolution=32",
        "generate.num_prompts=2", "generate.seeds=[0, 1]", "generate.num_inference_steps=2",
        "generate.batch_size=3",  # 4 rows per model: one full planned batch and one padded
        *overrides,
    ])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The base, an unchanged copy of its UNet, a changed full UNet, and a LoRA: saved as training saves them."""
    root = tmp_path_factory.mktemp("generate_models")
    cfg = _config(root)
    base = resolve_model_path(cfg)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    unet.save_pretrained(root / "same_unet")
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    changed.save_pretrained(root / "full")
    from peft import LoraConfig

    lora_unet = copy.deepcopy(unet)
    lora_unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in lora_unet.named_parameters():
            if "lora_B" in name:  # gaussian init leaves B at zero: give the adapter an effect
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    (root / "lora").mkdir()
    _save_lora(lora_unet, str(root / "lora"), kind="sdxl")
    return root, {"base": "base", "same": str(root / "same_unet"), "full": str(root / "full"),
                  "lora": str(root / "lora")}


def _images(result):
    rows = result.index.to_pylist()
    return {(r["model"], r["prompt_id"], r["seed"]): (f"{result.out_dir}/{r['file']}") for r in rows}


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def test_generation_is_paired_deterministic_and_loads_our_outputs(ray_session, models):
    root, locations = models
    assert {tag: resolve_model(tag, loc, "unused").kind for tag, loc in locations.items() if tag != "base"} == {
        "same": "unet", "full": "unet", "lora": "lora"}
    cfg = _config(root)
    first = run_generation(cfg, locations, out_dir=str(root / "gen_a"))
    assert first.index.num_rows == 4 * 2 * 2 and not first.reused
    assert set(first.index.column("model").to_pylist()) == set(locations)
    images = {key: _bytes(path) for key, path in _images(first).items()}
    for prompt_id in (0, 1):
        for seed in (0, 1):
            base = images[("base", prompt_id, seed)]
            assert images[("same", prompt_id, seed)] == base  # same weights + same (prompt, seed): same noise, bytes
            assert images[("full", prompt_id, seed)] != base  # a full UNet folder loads and changes the images
            assert images[("lora", prompt_id, seed)] != base  # so does a LoRA file through load_lora_weights
        assert images[("base", prompt_id, 0)] != images[("base", prompt_id, 1)]  # seeds differ
    assert images[("base", 0, 0)] != images[("base", 1, 0)]  # prompts matter

    again = run_generation(cfg, locations, out_dir=str(root / "gen_a"))
    assert again.reused  # same prompts, settings and files: nothing regenerated
    fresh = run_generation(cfg, {"base": "base", "lora": locations["lora"]}, out_dir=str(root / "gen_b"))
    for key, path in _images(fresh).items():
        assert _bytes(path) == images[key]  # same inputs, same bytes, whatever else ran beside them


def test_bad_prompt_file_is_refused_before_any_model_loads(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_text("a red circle\n\na blue square\n")
    with pytest.raises(PromptFileError, match=r"prompts.txt row 1: empty prompt"):
        run_generation(_config(tmp_path, f"generate.prompts={bad}"), {"base": "base"}, out_dir=str(tmp_path / "g"))
    assert not (tmp_path / "toy").exists()  # the tiny model was never built

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "fine"}\n{"prompt": 42}\n')
    with pytest.raises(PromptFileError, match=r"prompts.jsonl row 1: prompt is int 42, not text"):
        load_prompt_file(jsonl)
    assert load_prompt_file(_write(tmp_path / "ok.txt", "one\ntwo\n")) == [
        "one", "two"]


def test_unknown_scheduler_is_refused(tmp_path):
    with pytest.raises(ValueError, match="generate.scheduler 'Nope' is not a diffusers scheduler"):
        run_generation(_config(tmp_path, "generate.scheduler=Nope"), {"base": "base"}, out_dir=str(tmp_path / "g"))


def _write(path, text):
    path.write_text(text)
    return path
