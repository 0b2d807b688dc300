"""model.revision / model.variant: every load of the base model reads the configured files (issue 20).

A tiny SDXL pipeline is saved with two variants whose UNets differ (``*.fp16.safetensors`` beside the default
files, the fp16 one perturbed), so a loader that falls back to the default files is caught by comparing tensors.
A hub revision cannot be resolved offline: for hub ids the tests check that the revision reaches diffusers.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import UNet2DConditionModel

from pipeline.config import load_config
from pipeline.models.tiny import build_tiny_sdxl

VARIANT = "fp16"


@pytest.fixture(scope="module")
def two_variants(tmp_path_factory):
    """(pipeline folder, default UNet state, fp16-variant UNet state): the variant's weights are perturbed."""
    folder = build_tiny_sdxl(tmp_path_factory.mktemp("variants") / "tiny_sdxl", seed=0)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    default = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    unet.save_pretrained(folder / "unet", variant=VARIANT)
    assert (folder / "unet" / f"diffusion_pytorch_model.{VARIANT}.safetensors").is_file()
    return str(folder), default, {k: v.detach().clone() for k, v in unet.state_dict().items()}


def _config(folder: str, *overrides: str):
    return load_config(None, [f"model.pretrained={folder}", f"model.variant={VARIANT}", "train.precision=fp32",
                              "model.clip_pretrained=random", "evaluate.holdout_pairs=0", *overrides])


def _same(state: dict, expected: dict) -> bool:
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def _manifest() -> dict:
    return {"model": {"kind": "sdxl"}, "counts": {"holdout": 0}}


# ------------------------------------------------------------------------------------------ training


def test_training_unet_loader_reads_the_configured_variant(two_variants):
    from pipeline.train.models import load_unet

    folder, default, variant = two_variants
    assert not _same(variant, default)
    cpu = torch.device("cpu")
    loaded = load_unet(folder, "sdxl", revision=None, variant=VARIANT, dtype=torch.float32, device=cpu)
    assert _same(loaded.state_dict(), variant)
    loaded = load_unet(folder, "sdxl", revision=None, variant=None, dtype=torch.float32, device=cpu)
    assert _same(loaded.state_dict(), default)


def _setup_in_one_rank(rank: int, folder: str, store: str, out: str) -> None:
    """The worker's setup_models for ZeRO-2 and ZeRO-3 (its own load path) in a world of one gloo rank; saves
    the policy's and the reference's parameters, gathered."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    import deepspeed
    import torch.distributed as dist

    from pipeline.train.models import setup_models
    from pipeline.train.run import with_absolute_paths, worker_plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        results = {}
        for stage in (2, 3):
            cfg = _config(folder, f"train.zero_stage={stage}", "train.mode=full", "loss.objective=rpo")
            plan = worker_plan(cfg, with_absolute_paths(cfg), _manifest(), train_rows=0)
            models = setup_models(cfg, plan, torch.device("cpu"))
            for role, module in (("policy", models.engine.module),
                                 ("reference", getattr(models.reference.runner, "module", models.reference.runner))):
                with deepspeed.zero.GatheredParameters(list(module.parameters())):
                    results[f"{role}_zero{stage}"] = {k: v.detach().clone() for k, v in module.named_parameters()}
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_worker_policy_and_reference_load_the_variant_under_zero2_and_zero3(two_variants, tmp_path):
    folder, _, variant = two_variants
    out = tmp_path / "loaded.pt"
    mp.spawn(_setup_in_one_rank, args=(folder, str(tmp_path / "store"), str(out)), nprocs=1, join=True)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"policy_zero2", "reference_zero2", "policy_zero3", "reference_zero3"}
    names = {name for name, _ in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").named_parameters()}
    for role, state in loaded.items():
        assert set(state) == names, role
        assert _same(state, {k: variant[k] for k in names}), role


def test_an_init_unet_loads_from_its_own_default_files(two_variants, tmp_path):
    """train.init_unet (re-alignment's promoted UNet, written by training with default names): the configured
    variant is the base's, so it does not apply to that folder."""
    from pipeline.train.models import load_unet
    from pipeline.train.run import training_model_path, worker_plan

    folder, default, _ = two_variants
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet").save_pretrained(tmp_path / "promoted")
    cfg = _config(folder, f"cluster.storage_path={tmp_path}", f"train.init_unet={tmp_path / 'promoted'}")
    plan = worker_plan(cfg, cfg, _manifest(), train_rows=0)
    assert plan.model_path == training_model_path(cfg) and (plan.revision, plan.variant) == (None, None)
    loaded = load_unet(plan.model_path, "sdxl", revision=plan.revision, variant=plan.variant, dtype=torch.float32,
                       device=torch.device("cpu"))
    assert _same(loaded.state_dict(), default)


# ---------------------------------------------------------------------------------------- generation


def test_generation_base_loader_reads_the_configured_variant(two_variants, tmp_path):
    from pipeline.generate.models import load_base
    from pipeline.generate.run import GenerateImages, generation_settings, model_specs

    folder, default, variant = two_variants
    cpu = torch.device("cpu")
    assert _same(load_base(folder, revision=None, variant=VARIANT, dtype=torch.float32, device=cpu).unet.state_dict(),
                 variant)
    assert _same(load_base(folder, revision=None, variant=None, dtype=torch.float32, device=cpu).unet.state_dict(),
                 default)
    # The actor's own path, from the specs run_generation gives it: the base and a UNet that goes into it.
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet").save_pretrained(tmp_path / "full")
    cfg = _config(folder)
    specs = model_specs(cfg, {"base": "base", "full": str(tmp_path / "full")})
    actor = GenerateImages({tag: spec.to_dict() for tag, spec in specs.items()}, generation_settings(cfg),
                           str(tmp_path / "out"))
    assert _same(actor._pipeline("base").unet.state_dict(), variant)
    assert actor._pipeline("full").vae is actor._pipeline("base").vae  # one base, loaded once, in the variant


# ------------------------------------------------------------------------------------- one place for all


def test_every_stage_loads_the_base_with_the_same_revision_and_variant(two_variants, tmp_path):
    """Precompute's encoders, the store's model record (which training checks), the training plan and generation's
    specs all carry model.revision / model.variant; another pipeline named to generation keeps its defaults."""
    from pipeline.generate.run import model_specs
    from pipeline.precompute.run import base_weights, encoder_spec, model_settings
    from pipeline.train.run import training_weights, worker_plan

    folder, _, _ = two_variants
    cfg = _config(folder, "model.revision=v1.0")
    wanted = {"revision": "v1.0", "variant": VARIANT}
    assert base_weights(cfg) == wanted == training_weights(cfg)
    spec = encoder_spec(cfg, folder, {"model": {"kind": "sdxl"}})
    assert {"revision": spec.revision, "variant": spec.variant} == wanted
    assert model_settings(cfg, folder)["variant"] == VARIANT
    plan = worker_plan(cfg, cfg, _manifest(), train_rows=0)
    assert (plan.model_path, plan.revision, plan.variant) == (str(Path(folder).resolve()), "v1.0", VARIANT)
    UNet2DConditionModel.from_pretrained(folder, subfolder="unet").save_pretrained(tmp_path / "full")
    other = shutil.copytree(folder, tmp_path / "other_pipeline")
    specs = model_specs(cfg, {"base": "base", "full": str(tmp_path / "full"), "other": str(other)})
    assert {tag: (s.revision, s.variant) for tag, s in specs.items()} == {
        "base": ("v1.0", VARIANT), "full": ("v1.0", VARIANT), "other": (None, None)}


class _Stop(Exception):
    pass


def test_a_hub_revision_and_variant_reach_every_loader(monkeypatch):
    """Offline a hub revision cannot be resolved, so this checks the arguments diffusers gets for a hub id."""
    import diffusers

    import pipeline.models.loader as loader
    import pipeline.precompute.stages as stages
    from pipeline.generate.models import load_base
    from pipeline.train.models import load_noise_schedule, load_unet, unet_config

    calls = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append((name, args[-1] if args else None, kwargs.get("revision"), kwargs.get("variant")))
            raise _Stop

        return fake

    monkeypatch.setattr(loader, "load_components", record("load_components"))
    monkeypatch.setattr(stages, "load_components", record("encoders"))
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "load_config", record("unet_config"))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", record("pipeline"))
    hub, cpu = "owner/sdxl", torch.device("cpu")
    for load in (
        lambda: load_unet(hub, "sdxl", revision="abc123", variant=VARIANT, dtype=torch.float32, device=cpu),
        lambda: load_noise_schedule(hub, "sdxl", revision="abc123"),
        lambda: unet_config(hub, revision="abc123"),
        lambda: load_base(hub, revision="abc123", variant=VARIANT, dtype=torch.float32, device=cpu),
        lambda: stages.load_encoders(stages.EncoderSpec(
            model_path=hub, kind="sdxl", revision="abc123", variant=VARIANT, clip_model="tiny", clip_pretrained=None,
            resolution=32, use_gpu=False, batch_size=1), ("vae", "text")),
    ):
        with pytest.raises(_Stop):
            load()
    assert calls == [
        ("load_components", hub, "abc123", VARIANT),
        ("load_components", hub, "abc123", None),  # a scheduler config has no variants
        ("unet_config", hub, "abc123", None),  # nor has a UNet's config.json
        ("pipeline", hub, "abc123", VARIANT),
        ("encoders", hub, "abc123", VARIANT),
    ]
