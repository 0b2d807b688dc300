"""The preflight's scorer checks: every tiny twin passes, a wrong, edited, truncated or missing file fails with a
line naming the file and what is wrong, the check agrees with the loaders on what loads, and every published
architecture builds on the meta device in well under a second with its published parameter count."""

import json
import shutil
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.evaluate.scorer_check import ScorerCheck, check_scorer
from pipeline.evaluate.scorers import build_scorer, save_tiny_twin

SCORERS = ("clip", "pickscore", "hpsv2", "aesthetic", "imagereward", "style")
# The production configs' weights (jobs/configs/sdxl_pickapic.yaml), all hub ids or open_clip tags.
PUBLISHED = {
    "clip": {"arch": "ViT-H-14", "weights": "laion2b_s32b_b79k"},
    "pickscore": {"weights": "yuvalkirstain/PickScore_v1"},
    "hpsv2": {"weights": "xswu/HPSv2/HPS_v2.1_compressed.pt"},
    "aesthetic": {"weights": "camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth"},
    "imagereward": {"weights": "THUDM/ImageReward"},
}


def _head(width: int) -> int:
    """The published MLP head (aesthetic and ImageReward): width -> 1024 -> 128 -> 64 -> 16 -> 1, with biases."""
    sizes = (width, 1024, 128, 64, 16, 1)
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))


def _imagereward_parameters() -> int:
    """ImageReward's parameter count worked out by hand from the published dimensions (BLIP's ViT-L/16 at 224 px
    and med_config.json's BERT with cross-attention to 1024-wide image tokens), not from our modules."""
    w, tokens = 1024, (224 // 16) ** 2 + 1
    vit = (3 * 16 * 16 * w + w) + w + tokens * w + 2 * w  # patch embedding, class token, positions, final norm
    vit += 24 * (2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w))
    h, ff = 768, 3072
    bert = 30524 * h + 512 * h + 2 * h  # word and position embeddings, LayerNorm
    self_attention = 3 * (h * h + h) + (h * h + h) + 2 * h
    cross_attention = (h * h + h) + 2 * (w * h + h) + (h * h + h) + 2 * h
    bert += 12 * (self_attention + cross_attention + (h * ff + ff) + (ff * h + h) + 2 * h)
    return vit + bert + _head(h)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("twins")
    return {name: save_tiny_twin(name, root / name) for name in SCORERS}


@pytest.fixture(autouse=True)
def no_hub_cache(monkeypatch):
    """Hub ids are never found in this machine's cache (a test that wants a cached file says which)."""
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kwargs: None)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "repo_exists", refuse)
    monkeypatch.setattr(huggingface_hub, "file_exists", refuse)


def _failed(check: ScorerCheck, *parts: str) -> str:
    """The check failed, and its problem line holds every part (a file, a key, a shape)."""
    assert not check.ok, check
    assert check.problem and check.fix, check
    for part in parts:
        assert part in check.problem, (part, check.problem)
    return check.problem


def _loads(name: str, kwargs: dict) -> bool:
    try:
        build_scorer(name, **kwargs)
    except Exception:  # the loaders' refusals, and safetensors' own error for a broken header
        return False
    return True


# ------------------------------------------------------------------------------------------------- the twins


@pytest.mark.parametrize("name", SCORERS)
def test_every_scorers_twin_passes_naming_its_file_and_parameter_count(name, twins, no_network, capfd):
    check = check_scorer(name, **twins[name])
    assert check == ScorerCheck(name, True, check.found, None, None, check.parameters)
    if name == "style":
        assert check.parameters is None and "no weights" in check.found
        return
    assert 10_000 < check.parameters < 3_000_000  # a tiny twin, counted
    weights = twins[name]["weights"]
    assert weights in check.found and "fit" in check.found
    assert capfd.readouterr() == ("", "")  # the preflight prints; the check says nothing


def test_the_clip_scorers_random_weights_pass_and_say_so(no_network):
    check = check_scorer("clip", weights="random", arch="tiny")
    assert check.ok and "random" in check.found and check.parameters > 0


# --------------------------------------------------------------------------------------------- wrong files


def test_another_scorers_twin_fails_naming_the_file_and_what_is_wrong(twins):
    hps, head, clip = twins["hpsv2"]["weights"], twins["aesthetic"]["weights"], twins["clip"]["weights"]
    # The HPS checkpoint as aesthetic's head: a dict holding a state dict, not one.
    _failed(check_scorer("aesthetic", **{**twins["aesthetic"], "weights": hps}), hps, "state dict of tensors")
    # The aesthetic head as an HPS checkpoint.
    _failed(check_scorer("hpsv2", **{**twins["hpsv2"], "weights": head}), head, "not an HPS checkpoint")
    # A CLIP's state dict as ImageReward.pt: every key listed as missing or unexpected.
    _failed(check_scorer("imagereward", **{**twins["imagereward"], "weights": clip}), clip,
            "missing keys", "blip.text_encoder.embeddings.LayerNorm.bias", "unexpected keys", "ln_final.weight")
    # The aesthetic head as the clip scorer's CLIP.
    _failed(check_scorer("clip", weights=head, arch="tiny"), head, "missing", "unexpected (e.g. layers.0.bias")


def test_wrong_shapes_name_the_key_and_both_shapes(twins, tmp_path):
    state = torch.load(twins["hpsv2"]["weights"], weights_only=True)
    state["state_dict"]["ln_final.weight"] = state["state_dict"]["ln_final.weight"][:8]
    torch.save(state, tmp_path / "hps.pt")
    _failed(check_scorer("hpsv2", weights=str(tmp_path / "hps.pt"), arch="tiny"),
            str(tmp_path / "hps.pt"), "ln_final.weight (8,) instead of (32,)")

    narrow = {k: v[:, :16] if k == "layers.0.weight" else v
              for k, v in torch.load(twins["aesthetic"]["weights"], weights_only=True).items()}
    torch.save(narrow, tmp_path / "head.pth")  # a head for 16-wide embeddings on a 32-wide CLIP
    _failed(check_scorer("aesthetic", **{**twins["aesthetic"], "weights": str(tmp_path / "head.pth")}),
            "head.pth", "layers.0.weight (1024, 16) instead of (1024, 32)")


def test_a_pickscore_safetensors_file_with_a_wrong_shape_fails_naming_the_key_and_shapes(twins, tmp_path):
    folder = tmp_path / "PickScore_v1"
    shutil.copytree(twins["pickscore"]["weights"], folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["visual_projection.weight"] = tensors["visual_projection.weight"][:, :8].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _failed(check_scorer("pickscore", weights=str(folder), backbone=twins["pickscore"]["backbone"]),
            str(folder), "visual_projection.weight: file (16, 8) vs model (16, 16)")


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header through ``edit``, keeping its data bytes."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length:])


def test_an_edited_or_truncated_safetensors_file_fails_naming_the_file(twins, tmp_path):
    edited, truncated = tmp_path / "edited", tmp_path / "truncated"
    for folder in (edited, truncated):
        shutil.copytree(twins["pickscore"]["weights"], folder)
    # A shape changed in the header alone: its byte range no longer fits (safetensors would refuse the file).
    _rewrite_header(edited / "model.safetensors",
                    lambda header: header["logit_scale"].__setitem__("shape", [2]))
    problem = _failed(check_scorer("pickscore", weights=str(edited), backbone=twins["pickscore"]["backbone"]),
                      str(edited / "model.safetensors"), "'logit_scale'", "(2,)", "edited or corrupt header")
    assert not _loads("pickscore", {**twins["pickscore"], "weights": str(edited)}), problem

    file = truncated / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])  # a download cut short
    _failed(check_scorer("pickscore", weights=str(truncated), backbone=twins["pickscore"]["backbone"]),
            str(file), "truncated")


def test_a_truncated_torch_file_fails_as_unreadable(twins, tmp_path):
    cut = tmp_path / "HPS_v2.1_compressed.pt"
    cut.write_bytes(Path(twins["hpsv2"]["weights"]).read_bytes()[:5000])
    _failed(check_scorer("hpsv2", weights=str(cut), arch="tiny"), str(cut), "not a readable PyTorch weights file")


@pytest.mark.parametrize("name", SCORERS[:5])
def test_a_missing_file_fails_with_where_it_comes_from_and_the_key_to_set(name, twins, tmp_path, no_network):
    missing = str(tmp_path / "models" / "nothing-here.pt")
    check = check_scorer(name, **{**twins[name], "weights": missing})
    _failed(check, missing)
    source = {"clip": "open_clip", "pickscore": "yuvalkirstain/PickScore_v1", "hpsv2": "xswu/HPSv2",
              "aesthetic": "improved-aesthetic-predictor", "imagereward": "THUDM/ImageReward"}[name]
    assert source in check.problem and source in check.fix
    assert f"evaluate.{name}.weights" in check.problem and f"evaluate.{name}.weights" in check.fix


@pytest.mark.parametrize("name", SCORERS[:5])
def test_weights_not_named_fail_for_every_reward_model(name, no_network):
    check = check_scorer(name, arch="tiny" if name == "clip" else None, offline=True)
    _failed(check, f"evaluate.{name}.weights")


def test_missing_backbones_and_tokenizers_fail_naming_their_key(twins, tmp_path):
    nowhere = str(tmp_path / "nowhere")
    _failed(check_scorer("aesthetic", **{**twins["aesthetic"], "backbone": nowhere}), nowhere,
            "evaluate.aesthetic.backbone")
    _failed(check_scorer("pickscore", **{**twins["pickscore"], "backbone": nowhere}), nowhere,
            "evaluate.pickscore.backbone")
    _failed(check_scorer("imagereward", **{**twins["imagereward"], "backbone": nowhere}), nowhere,
            "evaluate.imagereward.backbone")
    # A backbone-less non-published aesthetic arch would be a random CLIP.
    _failed(check_scorer("aesthetic", weights=twins["aesthetic"]["weights"], arch="tiny"),
            "evaluate.aesthetic.backbone")
    _failed(check_scorer("aesthetic", **{**twins["aesthetic"], "backbone": "random"}), "random CLIP")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openais_torchscript_file_and_unknown_tags_and_models_fail(twins, tmp_path):
    archive = tmp_path / "ViT-L-14.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), archive)
    _failed(check_scorer("clip", weights=str(archive), arch="tiny"), str(archive), "TorchScript")
    # laion2b_s32b_b79k is ViT-H-14's tag, not ViT-L-14's: read as a file, and there is none.
    _failed(check_scorer("clip", weights="laion2b_s32b_b79k", arch="ViT-L-14", offline=True),
            "'laion2b_s32b_b79k'", "neither a file nor a pretrained tag of ViT-L-14")
    _failed(check_scorer("hpsv2", weights=twins["hpsv2"]["weights"], arch="ViT-Q-99"), "ViT-Q-99")
    assert not check_scorer("dreamsim").ok


# ------------------------------------------------------------------------- the loaders' own key rules


def _variants(twins: dict, root: Path) -> list[tuple[str, dict, bool]]:
    """(scorer, kwargs, whether the loader takes it): files each loader's own rules accept or refuse."""
    hps = torch.load(twins["hpsv2"]["weights"], weights_only=True)
    torch.save(hps["state_dict"], root / "hps_unnested.pt")  # HPS needs its 'state_dict' nesting
    clip = torch.load(twins["clip"]["weights"], weights_only=True)
    torch.save({f"module.{k}": v for k, v in clip.items()}, root / "clip_module.pt")  # open_clip strips 'module.'
    torch.save({**clip, "logit_scale": clip["logit_scale"].reshape(1)}, root / "clip_1d_scale.pt")  # reshaped
    grid = {k: v.float() for k, v in clip.items()}  # float32: open_clip cannot interpolate float16 on the CPU
    grid["visual.positional_embedding"] = grid["visual.positional_embedding"][:10]  # a 3x3 grid + class token
    torch.save(grid, root / "clip_grid.pt")  # open_clip interpolates it to the model's 4x4 grid
    save_file({k: v.float().contiguous() for k, v in clip.items()}, root / "clip.safetensors")
    reward = torch.load(twins["imagereward"]["weights"], weights_only=True)
    extras = ("blip.vision_proj.", "blip.text_proj.")  # BLIP's contrastive projections: accepted and dropped
    torch.save({k: v for k, v in reward.items() if not k.startswith(extras)}, root / "ir_without_extras.pt")
    torch.save({**reward, "blip.itm_head.weight": torch.zeros(2, 32)}, root / "ir_itm_head.pt")  # not accepted
    legacy = root / "PickScore_v1_transformers4"  # as transformers 4 saved it: with the position_ids buffers
    shutil.copytree(twins["pickscore"]["weights"], legacy)
    tensors = load_file(legacy / "model.safetensors")
    for tower, length in (("text_model", 77), ("vision_model", 17)):
        tensors[f"{tower}.embeddings.position_ids"] = torch.arange(length)[None]
    save_file(tensors, legacy / "model.safetensors", metadata={"format": "pt"})
    ir = twins["imagereward"]
    return [
        ("pickscore", {**twins["pickscore"], "weights": str(legacy)}, True),
        *((name, twins[name], True) for name in SCORERS[:5]),
        ("hpsv2", {"weights": str(root / "hps_unnested.pt"), "arch": "tiny"}, False),
        ("clip", {"weights": twins["hpsv2"]["weights"], "arch": "tiny"}, True),  # open_clip reads 'state_dict'
        ("clip", {"weights": str(root / "clip_module.pt"), "arch": "tiny"}, True),
        ("clip", {"weights": str(root / "clip_1d_scale.pt"), "arch": "tiny"}, True),
        ("clip", {"weights": str(root / "clip_grid.pt"), "arch": "tiny"}, True),
        ("clip", {"weights": str(root / "clip.safetensors"), "arch": "tiny"}, True),
        ("hpsv2", {"weights": str(root / "clip.safetensors"), "arch": "tiny"}, False),  # torch.load only
        ("aesthetic", {**twins["aesthetic"], "backbone": twins["hpsv2"]["weights"]}, True),
        ("imagereward", {**ir, "weights": str(root / "ir_without_extras.pt")}, True),
        ("imagereward", {**ir, "weights": str(root / "ir_itm_head.pt")}, False),
        ("imagereward", {**ir, "weights": str(Path(ir["weights"]).parent)}, True),  # the folder
    ]


def test_the_check_passes_what_the_loader_loads_and_fails_what_it_refuses(twins, tmp_path, no_network):
    for name, kwargs, loads in _variants(twins, tmp_path):
        assert _loads(name, kwargs) is loads, (name, kwargs)  # the case is what it claims
        check = check_scorer(name, **kwargs)
        assert check.ok is loads, (name, kwargs, check)
        if not loads:
            assert Path(kwargs["weights"]).name in check.problem, check.problem


# ------------------------------------------------------------------------------------------------ the hub


def test_offline_hub_ids_build_the_published_architecture_and_say_the_file_was_not_fetched(no_network):
    for name, kwargs in PUBLISHED.items():
        check = check_scorer(name, offline=True, **kwargs)
        assert check.ok and check.problem is None, check
        assert "built on meta" in check.found and "not fetched (offline)" in check.found, check.found
        assert "M parameters)" in check.found  # the count of each part built


def test_online_the_hub_is_asked_that_the_repo_and_file_exist(monkeypatch):
    present = {("xswu/HPSv2", "HPS_v2.1_compressed.pt"), ("THUDM/ImageReward", "ImageReward.pt"),
               ("bert-base-uncased", "vocab.txt")}
    asked = []

    def file_exists(repo, name, **kwargs):
        asked.append((repo, name))
        return (repo, name) in present

    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda repo, **kwargs: repo != "nobody/nothing")
    monkeypatch.setattr(huggingface_hub, "file_exists", file_exists)
    assert check_scorer("hpsv2", **PUBLISHED["hpsv2"]).ok
    assert ("xswu/HPSv2", "HPS_v2.1_compressed.pt") in asked
    _failed(check_scorer("hpsv2", weights="xswu/HPSv2/HPS_v3.pt"), "xswu/HPSv2", "HPS_v3.pt")
    _failed(check_scorer("hpsv2", weights="nobody/nothing/HPS_v2.1_compressed.pt"), "no repo nobody/nothing")
    _failed(check_scorer("imagereward", **PUBLISHED["imagereward"]), "THUDM/ImageReward", "med_config.json")


def test_an_unreachable_hub_fails_online_and_is_skipped_offline(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "repo_exists", unreachable)
    check = check_scorer("hpsv2", **PUBLISHED["hpsv2"])
    _failed(check, "could not ask the hub", "xswu/HPSv2", "ConnectionError")
    assert "--offline" in check.fix
    assert check_scorer("hpsv2", offline=True, **PUBLISHED["hpsv2"]).ok


def test_a_hub_file_in_the_local_cache_is_checked_like_a_local_file(twins, monkeypatch, no_network):
    cache = {"HPS_v2.1_compressed.pt": twins["hpsv2"]["weights"]}
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name, **kwargs: cache.get(name))
    check = check_scorer("hpsv2", weights=PUBLISHED["hpsv2"]["weights"], arch="tiny", offline=True)
    assert check.ok and "from the hub cache" in check.found and twins["hpsv2"]["weights"] in check.found
    cache["HPS_v2.1_compressed.pt"] = twins["aesthetic"]["weights"]  # a wrong file in the cache
    _failed(check_scorer("hpsv2", weights=PUBLISHED["hpsv2"]["weights"], arch="tiny", offline=True),
            twins["aesthetic"]["weights"], "not an HPS checkpoint")


# ------------------------------------------------------------------------------ the published architectures


def test_every_published_architecture_builds_on_meta_with_its_published_size_in_well_under_seconds(no_network):
    check_scorer("pickscore", offline=True, **PUBLISHED["pickscore"])  # imports open_clip and transformers once
    check_scorer("clip", weights="openai", arch="ViT-B-32", offline=True)
    seconds, parameters = {}, {}
    for name, kwargs in PUBLISHED.items():
        start = time.perf_counter()
        check = check_scorer(name, offline=True, **kwargs)
        seconds[name], parameters[name] = time.perf_counter() - start, check.parameters
        assert check.ok, check
    vit_h14 = 986_109_441  # open_clip's ViT-H-14 (986.11M in its model table)
    vit_l14 = 427_616_513  # open_clip's ViT-L-14 (427.62M)
    assert parameters["clip"] == vit_h14 and parameters["hpsv2"] == vit_h14
    assert parameters["pickscore"] == vit_h14  # the same CLIP-H in transformers' layout
    assert parameters["aesthetic"] == vit_l14 + _head(768)  # OpenAI's ViT-L/14 and the MLP head
    assert parameters["imagereward"] == _imagereward_parameters() == 446_206_689
    assert max(seconds.values()) < 3.0, seconds
