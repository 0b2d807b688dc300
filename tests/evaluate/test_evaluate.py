"""End to end: two models generated on the same prompts and seeds, scored on an actor pool by real scorers (tiny
twins loaded from their published file formats), compared, reported."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DConditionModel

from pipeline.config import load_config
from pipeline.evaluate.run import evaluate_models
from pipeline.evaluate.scorer_weights import WeightsNotFound
from pipeline.evaluate.scorers import save_tiny_twin
from pipeline.precompute import resolve_model_path


def test_evaluate_models_scores_compares_and_reports(ray_session, tmp_path):
    twin = save_tiny_twin("pickscore", tmp_path / "pickscore_twin")
    overrides = [
        f"cluster.storage_path={tmp_path}", "model.pretrained=tiny", "model.clip_pretrained=random", "model.tiny_fit_steps=0",
        "precompute.resolution=32",
        "generate.num_prompts=3", "generate.seeds=[0, 1]", "generate.num_inference_steps=2",
        "evaluate.scorers=[style, clip, pickscore]", "evaluate.bootstrap_resamples=200",
        *[f"evaluate.pickscore.{k}={v}" for k, v in twin.items() if v is not None],
    ]
    cfg = load_config(None, overrides)
    unet = UNet2DConditionModel.from_pretrained(resolve_model_path(cfg), subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(1.2)
    unet.save_pretrained(tmp_path / "changed")

    result = evaluate_models(cfg, {"base": "base", "aligned": str(tmp_path / "changed")}, out_dir=str(tmp_path / "run"),
                             baseline="base")
    comparison = result.comparison
    assert comparison["models"] == ["base", "aligned"] and comparison["n_pairs"] == 3 * 2
    assert set(comparison["scorers"]) == {"style", "clip", "pickscore"}
    for name, scored in comparison["scorers"].items():
        win = scored["win_rate"]["aligned"]
        assert 0 <= win["ci"][0] <= win["value"] <= win["ci"][1] <= 1 and win["n"] == 6
    assert set(comparison["style"]["share"]) == {"base", "aligned"}
    scores = pq.read_table(result.scores_uri)
    assert scores.num_rows == 12 and {"score_style", "score_clip", "score_pickscore", "style_class"} <= set(
        scores.column_names)
    assert len(set(scores.column("score_pickscore").to_pylist())) > 1  # the twin tells images apart
    assert json.loads((tmp_path / "run" / "evaluate" / "comparison.json").read_text()) == comparison
    report = tmp_path / "run" / "report" / "index.html"
    assert result.report_path == str(report) and report.is_file()
    assert json.loads((report.parent / "report.json").read_text())["comparison"]["scorers"].keys() == {
        "style", "clip", "pickscore"}


def test_missing_reward_weights_stop_before_any_image(tmp_path):
    cfg = load_config(None, [f"cluster.storage_path={tmp_path}", "model.pretrained=tiny", "model.tiny_fit_steps=0",
                             "evaluate.scorers=[style, hpsv2]", f"evaluate.hpsv2.weights={tmp_path}/nope.pt"])
    with pytest.raises(WeightsNotFound, match=r"hpsv2.*nope\.pt.*evaluate\.hpsv2\.weights"):
        evaluate_models(cfg, {"base": "base"}, out_dir=str(tmp_path / "run"), baseline="base")
    assert not (tmp_path / "run" / "generate").exists() and not (tmp_path / "toy").exists()


def test_unknown_scorer_is_a_config_error_listing_the_known_ones():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"evaluate.scorers\[1\].*'pickscor'.*'clip', 'pickscore', 'hpsv2'"):
        load_config(None, ["evaluate.scorers=[style, pickscor]"])
