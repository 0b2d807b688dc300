"""The re-alignment gate: promote the candidate model, or keep the one in use, and say why.

A pure function of the evaluation's comparison (``pipeline.evaluate.run.evaluate_models(...).comparison``, the
candidate compared with the promoted model on the same prompts and seeds) and the gate's settings:

- **win rate**: the lower end of the candidate's paired win-rate interval on ``gate_scorer`` must be *above*
  ``min_win_rate_lower`` (0.5 = better than a coin flip with the comparison's confidence);
- **no regression**: no scorer's mean may be worse than the baseline's by more than ``max_regression``, measured
  as a fraction of the baseline mean's magnitude (scorers live on different scales; a fraction compares them).

    decision = decide(comparison, candidate="candidate", gate_scorer="style", min_win_rate_lower=0.5,
                      max_regression=0.05)
    decision.promote, decision.reasons
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Below this magnitude a baseline mean counts as zero, and the regression is measured in absolute terms instead.
ZERO_MEAN = 1e-12


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]  # one sentence per check, passed or failed, for people and the registry
    checks: list[dict[str, Any]] = field(default_factory=list)  # name, passed, value, threshold per check

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_regression(candidate_mean: float, baseline_mean: float, *, higher_is_better: bool = True) -> float:
    """How much worse the candidate's mean is, as a fraction of the baseline mean's magnitude (<= 0: not worse)."""
    worse_by = (baseline_mean - candidate_mean) if higher_is_better else (candidate_mean - baseline_mean)
    scale = abs(baseline_mean)
    return worse_by / scale if scale > ZERO_MEAN else worse_by


def decide(comparison: dict[str, Any], *, candidate: str, gate_scorer: str, min_win_rate_lower: float,
           max_regression: float) -> GateDecision:
    """Promote only if every check passes. A comparison that lacks the candidate or the gate scorer is an error
    (a misconfigured gate must not quietly keep or promote)."""
    baseline = comparison["baseline"]
    scorers = comparison["scorers"]
    if gate_scorer not in scorers:
        raise ValueError(f"realign.gate_scorer {gate_scorer!r} was not scored; the comparison has "
                         f"{sorted(scorers)}: add it to evaluate.scorers or pick one of those")
    if candidate not in comparison["models"] or candidate == baseline:
        raise ValueError(f"candidate {candidate!r} is not a compared model other than the baseline "
                         f"{baseline!r} (models: {comparison['models']})")
    level = f"{comparison.get('confidence_level', 0.95):.0%}"
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []

    win = scorers[gate_scorer]["win_rate"][candidate]
    lower = float(win["ci"][0])
    passed = lower > min_win_rate_lower
    checks.append({"name": f"win_rate_lower:{gate_scorer}", "passed": passed, "value": lower,
                   "threshold": min_win_rate_lower})
    reasons.append(
        f"{gate_scorer} win rate of {candidate} over {baseline}: {win['value']:.3f}, {level} interval "
        f"[{win['ci'][0]:.3f}, {win['ci'][1]:.3f}] over {win['n']} pairs; lower end "
        f"{'above' if passed else 'not above'} {min_win_rate_lower:g}"
    )

    for name, result in scorers.items():
        cand, base = float(result["mean"][candidate]), float(result["mean"][baseline])
        regression = relative_regression(cand, base)
        passed = regression <= max_regression
        checks.append({"name": f"regression:{name}", "passed": passed, "value": regression,
                       "threshold": max_regression})
        reasons.append(
            f"{name} mean {cand:.4g} vs {base:.4g}: "
            + (f"worse by {regression:.1%}" if regression > 0 else "not worse")
            + (f", within the allowed {max_regression:.1%}" if passed else f", more than the allowed {max_regression:.1%}")
        )

    return GateDecision(promote=all(c["passed"] for c in checks), reasons=reasons, checks=checks)
