import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline.config import load_config
from pipeline.models.tiny import build_tiny_sd15, build_tiny_sdxl
from pipeline.precompute import resolve_model_path


@pytest.mark.parametrize("build", [build_tiny_sdxl, build_tiny_sd15], ids=["sdxl", "sd15"])
def test_fit_lowers_the_denoising_loss_and_saves_a_plain_diffusers_unet(tmp_path, build):
    random_unet = UNet2DConditionModel.from_pretrained(build(tmp_path / "random") / "unet")
    fitted = build(tmp_path / "fitted", toy_fit_steps=40, toy_fit_resolution=32)

    report = json.loads((fitted / "toy_fit.json").read_text())
    assert report["steps"] == 40 and report["resolution"] == 32
    assert report["last_loss"] < 0.5 * report["first_loss"], report  # from ~0.5 (random) it falls fast
    unet = UNet2DConditionModel.from_pretrained(fitted / "unet")
    changed = [
        not torch.equal(a, b) for a, b in zip(unet.state_dict().values(), random_unet.state_dict().values())
    ]
    assert all(changed)  # every tensor moved: the whole UNet was trained and saved


def test_fitted_build_is_deterministic(tmp_path):
    one = build_tiny_sdxl(tmp_path / "one", toy_fit_steps=3, toy_fit_resolution=32)
    two = build_tiny_sdxl(tmp_path / "two", toy_fit_steps=3, toy_fit_resolution=32)
    a = UNet2DConditionModel.from_pretrained(one / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(two / "unet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_folder_names_its_fit_so_another_setting_never_reuses_it(tmp_path):
    def path(*overrides):
        return load_config(None, [f"cluster.storage_path={tmp_path}", "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0",
                                  *overrides])

    # Only the folder name is checked: resolve_model_path would build, so compare what it would build into.
    from pipeline.precompute.run import tiny_model_dir

    assert tiny_model_dir(path()).name == "tiny_model"
    assert tiny_model_dir(path("model.tiny_fit_steps=400")).name == "tiny_model_fit400x64"
    assert tiny_model_dir(path("model.tiny_fit_steps=400", "precompute.resolution=32")).name == "tiny_model_fit400x32"
    assert tiny_model_dir(path("model.kind=sd15")).name == "tiny_model_sd15"
    assert resolve_model_path(path("model.pretrained=stabilityai/sdxl-turbo")) == "stabilityai/sdxl-turbo"


def test_negative_fit_steps_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="model.tiny_fit_steps"):
        load_config(None, ["model.tiny_fit_steps=-1"])


def test_the_default_base_is_the_toy_base_built_in_a_folder_named_by_its_settings(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.models.resolve import toy_base_dir
    from pipeline.train.toy_base import ToyBaseSettings

    cfg = load_config(None, [f"cluster.storage_path={tmp_path}"])
    assert cfg.model.pretrained == "toy"
    assert toy_base_dir(cfg) == tmp_path / "toy" / f"toy_base_{ToyBaseSettings().tag()}"
    at_32 = load_config(None, [f"cluster.storage_path={tmp_path}", "precompute.resolution=32"])
    assert toy_base_dir(at_32) != toy_base_dir(cfg)  # fitted at its resolution: another folder
    with pytest.raises(ConfigError, match="model.pretrained=tiny"):
        load_config(None, ["model.kind=sd15"])  # the toy base is SDXL-shaped
