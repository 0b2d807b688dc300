"""The search space of a sweep (``tune.search_space``): parsed, checked against the config, turned into Ray Tune's.

    loss.beta: [1000, 5000]                 a grid (every value, crossed with the other grids)
    loss.tau: {grid: [0.05, 0.1]}           the same, spelled out
    loss.objective: {choice: [rpo, dpo]}    one value drawn per sample (tune.num_samples)
    loss.alpha: {uniform: [0.0, 1.0]}       drawn uniformly between the bounds
    train.lr: {loguniform: [1e-6, 1e-4]}    drawn uniformly in log space

Every value of a grid or choice, and both bounds of a range, are checked by building the config with that value
and validating it, so a value the config refuses stops the sweep before any trial starts, naming the key.
No Ray here: the config module calls ``check_search_space`` while it validates.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

KINDS = ("grid", "choice", "uniform", "loguniform")
# A sweep trains every trial on one feature store made from one model and one data table, and it decides where
# its trials live: only the objective and the training settings vary.
SWEEPABLE_SECTIONS = ("loss", "train")


@dataclass(frozen=True)
class Dimension:
    key: str  # dotted config key, e.g. "loss.beta"
    kind: str  # one of KINDS
    values: tuple  # the grid/choice values, or (low, high) of a range


def parse_search_space(space: dict[str, Any]) -> list[Dimension]:
    """One Dimension per key; a malformed entry raises ConfigError naming tune.search_space's key."""
    from pipeline.config import ConfigError

    dims = []
    for key, spec in space.items():
        where = f"config key 'tune.search_space' entry '{key}'"
        if isinstance(spec, (list, tuple)):
            kind, values = "grid", list(spec)
        elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in KINDS:
            kind, values = next(iter(spec.items()))
        else:
            raise ConfigError(f"{where}: {spec!r} is not a search dimension; write a list (a grid) or one of "
                              f"{{grid: [...]}}, {{choice: [...]}}, {{uniform: [low, high]}}, {{loguniform: [low, high]}}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            values = [_number(v) for v in values]
            numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numbers or not values[0] < values[1]:
                raise ConfigError(f"{where}: {kind} needs [low, high] with low < high, got {values!r}")
            if kind == "loguniform" and values[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {values!r}")
        dims.append(Dimension(key, kind, tuple(values)))
    return dims


def _number(value: Any) -> Any:
    """YAML 1.1 reads 1e-6 as the string "1e-6": a bound means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def with_values(values: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A copy of the config dict ``values`` with each dotted key of ``settings`` set."""
    out = copy.deepcopy(values)
    for key, value in settings.items():
        node = out
        *sections, last = key.split(".")
        for part in sections:
            node = node[part]
        node[last] = value
    return out


def check_search_space(cfg) -> None:
    """Each key exists and may be swept, and the config accepts every value (ConfigError naming key and reason)."""
    from pipeline.config import AlignConfig, ConfigError, _lookup

    if not cfg.tune.search_space:
        return
    base = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, search_space={})).to_dict()
    for dim in parse_search_space(cfg.tune.search_space):
        current = _lookup(cfg, dim.key)  # raises on a key that does not exist
        where = f"config key 'tune.search_space' entry '{dim.key}'"
        if dim.key.split(".")[0] not in SWEEPABLE_SECTIONS or dataclasses.is_dataclass(current):
            raise ConfigError(f"{where}: a sweep varies settings of {' and '.join(SWEEPABLE_SECTIONS)} only (every "
                              f"trial trains on the same feature store, in a folder of its own); sweep another key by "
                              f"running one sweep per value")
        if dim.kind in ("uniform", "loguniform") and (isinstance(current, (bool, int)) or not isinstance(current, float)):
            raise ConfigError(f"{where}: {dim.kind} draws real numbers, but '{dim.key}' is {type(current).__name__}; "
                              f"use a grid or {{choice: [...]}}")
        for value in dim.values:
            try:
                AlignConfig.from_dict(with_values(base, {dim.key: value}))
            except ConfigError as err:
                raise ConfigError(f"{where}: value {value!r} would be refused: {err}") from None


def samples_and_trials(space: dict[str, Any], num_samples: int) -> tuple[int, int]:
    """(Tune's num_samples, the sweep's number of trials). Tune repeats the whole grid once per sample, so
    ``tune.num_samples`` draws of the random dimensions give num_samples x grid-size trials; a space of grids alone
    has nothing to draw and runs each grid point once."""
    dims = parse_search_space(space)
    grid_points = 1
    for dim in dims:
        if dim.kind == "grid":
            grid_points *= len(dim.values)
    samples = num_samples if any(dim.kind != "grid" for dim in dims) else 1
    return samples, samples * grid_points


def tune_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune's param_space: the dotted keys stay flat (each trial's config is {dotted key: value})."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v)}
    return {dim.key: make[dim.kind](list(dim.values)) for dim in parse_search_space(space)}
