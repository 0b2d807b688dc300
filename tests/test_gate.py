"""The promote/keep decision on hand-made comparisons (the shape evaluate_models returns)."""

import pytest

from pipeline.gate import decide, relative_regression


def comparison(*, win_ci, style_means=(0.40, 0.50), clip_means=(0.30, 0.30)):
    """promoted vs candidate; style and clip means as (promoted, candidate)."""
    return {
        "baseline": "promoted", "models": ["promoted", "candidate"], "confidence_level": 0.95, "n_pairs": 8,
        "scorers": {
            "style": {"mean": {"promoted": style_means[0], "candidate": style_means[1]},
                      "mean_ci": {"promoted": [0, 1], "candidate": [0, 1]},
                      "win_rate": {"candidate": {"value": sum(win_ci) / 2, "ci": list(win_ci), "n": 8}}},
            "clip": {"mean": {"promoted": clip_means[0], "candidate": clip_means[1]},
                     "mean_ci": {"promoted": [0, 1], "candidate": [0, 1]},
                     "win_rate": {"candidate": {"value": 0.5, "ci": [0.2, 0.8], "n": 8}}},
        },
    }


GATE = {"candidate": "candidate", "gate_scorer": "style", "min_win_rate_lower": 0.5, "max_regression": 0.05}


def test_promotes_when_the_interval_clears_the_threshold_and_nothing_regresses():
    decision = decide(comparison(win_ci=(0.62, 0.94)), **GATE)
    assert decision.promote
    assert [c["passed"] for c in decision.checks] == [True, True, True]
    assert "lower end above 0.5" in decision.reasons[0]


def test_keeps_when_the_lower_end_is_not_above_the_threshold():
    # 0.5 exactly is not above 0.5: a candidate that may be no better than a coin flip is not promoted.
    decision = decide(comparison(win_ci=(0.5, 0.9)), **GATE)
    assert not decision.promote
    assert decision.checks[0] == {"name": "win_rate_lower:style", "passed": False, "value": 0.5, "threshold": 0.5}
    assert "not above 0.5" in decision.reasons[0]


def test_keeps_when_another_scorer_regresses_beyond_the_margin():
    # clip 0.30 -> 0.28: worse by 0.02 / 0.30 = 6.7% > 5%.
    decision = decide(comparison(win_ci=(0.7, 0.9), clip_means=(0.30, 0.28)), **GATE)
    assert not decision.promote
    clip = next(c for c in decision.checks if c["name"] == "regression:clip")
    assert clip["value"] == pytest.approx(0.02 / 0.30) and not clip["passed"]
    assert "worse by 6.7%, more than the allowed 5.0%" in decision.reasons[2]


def test_a_regression_within_the_margin_passes():
    # clip 0.30 -> 0.29: worse by 3.3% <= 5%.
    decision = decide(comparison(win_ci=(0.7, 0.9), clip_means=(0.30, 0.29)), **GATE)
    assert decision.promote


def test_relative_regression_by_hand():
    assert relative_regression(0.9, 1.0) == pytest.approx(0.1)
    assert relative_regression(1.1, 1.0) == pytest.approx(-0.1)  # better: negative
    assert relative_regression(-1.2, -1.0) == pytest.approx(0.2)  # negative scores: magnitude of the baseline
    assert relative_regression(-0.1, 0.0) == pytest.approx(0.1)  # zero baseline: absolute


def test_a_misconfigured_gate_is_an_error_not_a_decision():
    with pytest.raises(ValueError, match="realign.gate_scorer 'pickscore' was not scored"):
        decide(comparison(win_ci=(0.7, 0.9)), **{**GATE, "gate_scorer": "pickscore"})
    with pytest.raises(ValueError, match="candidate 'promoted' is not a compared model"):
        decide(comparison(win_ci=(0.7, 0.9)), **{**GATE, "candidate": "promoted"})
