"""The comparison statistics, against hand-worked values and independent formulas."""

import math

import numpy as np
import pyarrow as pa
import pytest

from pipeline.evaluate.compare import (
    compare_models,
    mean_interval,
    paired_win_rate,
    share_interval,
    summary_lines,
    win_outcomes,
)


def test_win_rate_counts_ties_half_by_hand():
    aligned = np.array([3.0, 2.0, 5.0, 1.0])
    base = np.array([1.0, 2.0, 4.0, 7.0])
    assert win_outcomes(aligned, base).tolist() == [1.0, 0.5, 1.0, 0.0]
    result = paired_win_rate(aligned, base)
    assert result["value"] == 0.625 and result["n"] == 4  # (1 + 0.5 + 1 + 0) / 4
    low, high = result["ci"]
    assert 0.0 <= low <= 0.625 <= high <= 1.0


def test_differences_within_the_tie_margin_are_ties_by_hand():
    aligned = np.array([0.5, 0.104, 0.096, 0.2, 0.0])
    base = np.array([0.1, 0.1, 0.1, 0.1, 0.3])
    # margin 0.01: +0.4 win, +0.004 tie, -0.004 tie, +0.1 win, -0.3 loss
    assert win_outcomes(aligned, base, tie_margin=0.01).tolist() == [1.0, 0.5, 0.5, 1.0, 0.0]
    result = paired_win_rate(aligned, base, tie_margin=0.01)
    assert result["value"] == pytest.approx(3 / 5) and (result["wins"], result["ties"], result["losses"]) == (2, 2, 1)
    with pytest.raises(ValueError, match="tie_margin"):
        win_outcomes(aligned, base, tie_margin=-1.0)


def test_scorer_dust_does_not_make_a_win_rate_contradict_the_style_share():
    """README's old sample: the sketch share rose 0.00 -> 0.16 while the style win rate read 0.22, because the base's
    flat images scored ~4e-6 and the aligned model's flat ones a few 1e-6 less: dust decided 27 of 32 pairs."""
    rng = np.random.default_rng(0)
    base = rng.uniform(1e-6, 8e-6, 32)
    aligned = rng.uniform(0.0, 3e-6, 32)
    aligned[:5] = 0.95  # five sketches
    rows = [{"model": tag, "prompt_id": i, "seed": 0, "score_style": float(v),
             "style_class": "sketch" if (tag == "aligned" and i < 5) else "flat"}
            for tag, values in (("base", base), ("aligned", aligned)) for i, v in enumerate(values)]
    result = compare_models(pa.Table.from_pylist(rows), models=["base", "aligned"], baseline="base",
                            scorers=["style"], target_style="sketch", n_resamples=500)
    win = result["scorers"]["style"]["win_rate"]["aligned"]
    assert (win["wins"], win["ties"], win["losses"]) == (5, 27, 0) and win["value"] == pytest.approx(0.5 + 5 / 64)
    assert win_outcomes(aligned, base).mean() < 0.5  # without the margin the dust reads as the base winning
    assert result["style"]["share"]["aligned"]["value"] > result["style"]["share"]["base"]["value"]
    assert "aligned beats base 0.58" in summary_lines(result)[0] and "5 wins, 27 ties, 0 losses" in summary_lines(result)[0]
    override = compare_models(pa.Table.from_pylist(rows), models=["base", "aligned"], baseline="base",
                              scorers=["style"], n_resamples=500, tie_margins={"style": 0.0})
    assert override["scorers"]["style"]["win_rate"]["aligned"]["ties"] == 0


def test_bootstrap_interval_of_a_win_rate_matches_the_normal_approximation():
    wins = np.r_[np.ones(120), np.zeros(80)]  # 200 pairs, 60% wins: 0.6 +- 1.96 sqrt(0.24 / 200) = [0.532, 0.668]
    low, high = paired_win_rate(wins, np.full(200, 0.5))["ci"]
    half = 1.959964 * math.sqrt(0.6 * 0.4 / 200)
    assert low == pytest.approx(0.6 - half, abs=0.01) and high == pytest.approx(0.6 + half, abs=0.01)


def test_constant_outcomes_have_a_point_interval():
    assert paired_win_rate(np.ones(5), np.zeros(5)) == {"value": 1.0, "ci": [1.0, 1.0], "n": 5, "wins": 5,
                                                        "ties": 0, "losses": 0, "tie_margin": 0.0}
    assert mean_interval(np.array([2.5]))["ci"] == [2.5, 2.5]


def test_style_share_uses_the_wilson_interval():
    # 3 of 10, z = 1.959964: centre (0.3 + z^2/20) / (1 + z^2/10), half z sqrt(0.021 + z^2/400) / (1 + z^2/10)
    z = 1.959964
    centre = (0.3 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.3 * 0.7 / 10 + z * z / 400) / (1 + z * z / 10)
    result = share_interval(np.array([True] * 3 + [False] * 7))
    assert result["value"] == 0.3
    assert result["ci"] == pytest.approx([centre - half, centre + half], abs=1e-6)  # [0.108, 0.603]
    assert share_interval(np.zeros(8, bool))["ci"][1] > 0  # none of 8 still leaves room above zero


def test_compare_models_pairs_by_prompt_and_seed():
    rows = []
    for model, scores in {"base": [1.0, 2.0, 3.0, 4.0], "aligned": [2.0, 2.0, 1.0, 5.0]}.items():
        for i, score in enumerate(scores):
            rows.append({"model": model, "prompt_id": i // 2, "seed": i % 2, "score_clip": score,
                         "style_class": "sketch" if (model == "aligned" and i != 2) else "flat"})
    rows.append({"model": "aligned", "prompt_id": 9, "seed": 0, "score_clip": 99.0, "style_class": "sketch"})
    table = pa.Table.from_pylist(rows[::-1])  # order must not matter; prompt 9 has no base image: left out
    result = compare_models(table, models=["base", "aligned"], baseline="base", scorers=["clip"],
                            target_style="sketch", n_resamples=500)
    assert result["n_pairs"] == 4
    clip = result["scorers"]["clip"]
    assert clip["mean"] == {"base": 2.5, "aligned": 2.5}
    assert clip["win_rate"]["aligned"]["value"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert set(clip["win_rate"]) == {"aligned"}
    assert result["style"]["share"]["aligned"]["value"] == 0.75 and result["style"]["share"]["base"]["value"] == 0.0
    lines = summary_lines(result)
    assert lines[0].startswith("[evaluate] clip: mean base 2.5, aligned 2.5; win rate (95% CI, n=4) aligned beats base 0.62")
    assert "share in the target style 'sketch'" in lines[1]
    with pytest.raises(ValueError, match="baseline 'nope'"):
        compare_models(table, models=["base"], baseline="nope", scorers=["clip"])
