"""Comparing models on the same prompts and seeds: means, paired win rates and style shares, with intervals.

Pure functions of score arrays (scipy does the statistics):
- paired win rate of A over B: the share of (prompt, seed) pairs where A's image scores higher by more than the
  scorer's tie margin (`names.TIE_MARGINS`: smaller differences are numerical dust), ties counting half, with a
  bootstrap interval over pairs (scipy.stats.bootstrap, percentile method, seeded);
- mean score with a bootstrap interval;
- share of images in the target style with a Wilson score interval (scipy.stats.binomtest), which stays meaningful
  at 0 or n of n, where a bootstrap collapses to a point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy import stats

from pipeline.evaluate.names import TIE_MARGINS

PAIR_KEYS = ("prompt_id", "seed")
BOOTSTRAP_SEED = 0


def win_outcomes(candidate: np.ndarray, baseline: np.ndarray, *, tie_margin: float = 0.0) -> np.ndarray:
    """1 where the candidate scores higher by more than ``tie_margin``, 0 where lower by more, else 0.5 (a tie)."""
    candidate, baseline = np.asarray(candidate, np.float64), np.asarray(baseline, np.float64)
    if candidate.shape != baseline.shape:
        raise ValueError(f"paired scores need equal shapes, got {candidate.shape} and {baseline.shape}")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    difference = candidate - baseline
    return (difference > tie_margin) + 0.5 * (np.abs(difference) <= tie_margin)


def mean_interval(values: np.ndarray, *, confidence_level: float = 0.95, n_resamples: int = 2000) -> dict[str, Any]:
    """The mean and its bootstrap interval; a constant sample (or a single value) gets the point as its interval."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        raise ValueError("no values to average")
    mean = float(values.mean())
    if values.size < 2 or np.all(values == values[0]):
        return {"value": mean, "ci": [mean, mean], "n": int(values.size)}
    result = stats.bootstrap(
        (values,), np.mean, confidence_level=confidence_level, n_resamples=n_resamples, method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    interval = result.confidence_interval
    return {"value": mean, "ci": [float(interval.low), float(interval.high)], "n": int(values.size)}


def paired_win_rate(candidate: np.ndarray, baseline: np.ndarray, *, confidence_level: float = 0.95,
                    n_resamples: int = 2000, tie_margin: float = 0.0) -> dict[str, Any]:
    """Win rate of ``candidate`` over ``baseline`` on paired scores (ties half), with a bootstrap interval, and
    the counts of wins, ties and losses behind it."""
    outcomes = win_outcomes(candidate, baseline, tie_margin=tie_margin)
    result = mean_interval(outcomes, confidence_level=confidence_level, n_resamples=n_resamples)
    counts = {"wins": int((outcomes == 1).sum()), "ties": int((outcomes == 0.5).sum()),
              "losses": int((outcomes == 0).sum()), "tie_margin": float(tie_margin)}
    return {**result, **counts}


def share_interval(hits: np.ndarray, *, confidence_level: float = 0.95) -> dict[str, Any]:
    """Share of True values with its Wilson score interval."""
    hits = np.asarray(hits, dtype=bool)
    if hits.size == 0:
        raise ValueError("no images to count")
    k, n = int(hits.sum()), int(hits.size)
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=confidence_level, method="wilson")
    return {"value": k / n, "ci": [float(interval.low), float(interval.high)], "n": n}


def paired_columns(scores: pa.Table, models: list[str], column: str) -> dict[str, np.ndarray]:
    """``column`` per model, over the (prompt_id, seed) pairs that every model has, in one order."""
    per_model = {}
    for tag in models:
        rows = scores.filter(pc.equal(scores.column("model"), tag))
        keys = zip(*(rows.column(k).to_pylist() for k in PAIR_KEYS))
        per_model[tag] = dict(zip(keys, rows.column(column).to_pylist()))
    common = sorted(set.intersection(*(set(values) for values in per_model.values())))
    return {tag: np.array([values[key] for key in common]) for tag, values in per_model.items()}


def compare_models(scores: pa.Table, *, models: list[str], baseline: str, scorers: list[str],
                   target_style: str | None = None, confidence_level: float = 0.95,
                   n_resamples: int = 2000, tie_margins: dict[str, float] | None = None) -> dict[str, Any]:
    """The comparison the report, the summary lines and the re-alignment gate read (shape: see the README).
    ``tie_margins`` (scorer -> margin) overrides `TIE_MARGINS`, the differences below which a pair is a tie."""
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {models}")
    options = {"confidence_level": confidence_level}
    margins = {**TIE_MARGINS, **(tie_margins or {})}
    out: dict[str, Any] = {"baseline": baseline, "models": list(models), "confidence_level": confidence_level,
                           "scorers": {}}
    for name in scorers:
        paired = paired_columns(scores, models, f"score_{name}")
        out["n_pairs"] = len(paired[baseline])
        means = {tag: mean_interval(values, n_resamples=n_resamples, **options) for tag, values in paired.items()}
        out["scorers"][name] = {
            "mean": {tag: m["value"] for tag, m in means.items()},
            "mean_ci": {tag: m["ci"] for tag, m in means.items()},
            "win_rate": {
                tag: paired_win_rate(paired[tag], paired[baseline], n_resamples=n_resamples,
                                     tie_margin=margins[name], **options)
                for tag in models if tag != baseline
            },
        }
    if "style_class" in scores.column_names and target_style is not None:
        classes = paired_columns(scores, models, "style_class")
        out["style"] = {
            "target": target_style,
            "share": {tag: share_interval(values == target_style, **options) for tag, values in classes.items()},
        }
    out.setdefault("n_pairs", len(paired_columns(scores, models, "seed")[baseline]))
    return out


def summary_lines(comparison: dict[str, Any]) -> list[str]:
    """One line per scorer (and one for the style share): means per model and win rates over the baseline."""
    level = f"{comparison['confidence_level']:.0%}"
    base = comparison["baseline"]
    lines = []
    for name, result in comparison["scorers"].items():
        means = ", ".join(f"{tag} {value:.4g}" for tag, value in result["mean"].items())
        wins = "; ".join(
            f"{tag} beats {base} {w['value']:.2f} [{w['ci'][0]:.2f}, {w['ci'][1]:.2f}]"
            + (f" ({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)" if "ties" in w else "")
            for tag, w in result["win_rate"].items()
        )
        lines.append(f"[evaluate] {name}: mean {means}; win rate ({level} CI, n={comparison['n_pairs']}) {wins}")
    if "style" in comparison:
        style = comparison["style"]
        shares = ", ".join(
            f"{tag} {s['value']:.2f} [{s['ci'][0]:.2f}, {s['ci'][1]:.2f}]" for tag, s in style["share"].items()
        )
        lines.append(f"[evaluate] share in the target style '{style['target']}' ({level} CI): {shares}")
    return lines
