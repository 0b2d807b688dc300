"""Judging models: generate the same prompts and seeds for each, score every image on an actor pool, compare each
model with a baseline, write the report.

    result = evaluate_models(cfg, {"base": "base", "aligned": "runs/toy/model"}, out_dir="runs/toy", baseline="base")
    result.comparison["scorers"]["style"]["win_rate"]["aligned"]   # {"value", "ci", "n"}
    result.report_path                                             # runs/toy/report/index.html

Layout under ``out_dir``: ``generate/`` (PNGs + index.parquet), ``evaluate/`` (scores.parquet, comparison.json),
``report/`` (index.html, report.json, plots).
"""

from __future__ import annotations

import datetime
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import AlignConfig, join_uri
from pipeline.evaluate.compare import compare_models
from pipeline.storage import absolute, exists, filesystem, is_local, upload_dir, write_text


@dataclass
class EvaluationResult:
    comparison: dict[str, Any]
    report_path: str
    scores_uri: str
    index_uri: str


def scorer_options(cfg: AlignConfig, name: str) -> dict[str, Any]:
    """build_scorer's keyword arguments for ``name`` from evaluate.<name> (clip defaults to the run's CLIP)."""
    if name == "style":
        return {"target_style": cfg.data.toy_target_style}
    options = vars(getattr(cfg.evaluate, name)).copy()
    if name == "clip" and options["arch"] is None:
        from pipeline.models.resolve import resolve_clip_pretrained

        options["arch"], options["weights"] = cfg.model.clip_model, options["weights"] or resolve_clip_pretrained(cfg)
    return options


class ScoreImages:
    """Ray Data callable class: loads every configured scorer once, adds a ``score_<name>`` column per scorer (and
    ``style_class`` with the style scorer) to each batch of generated images."""

    def __init__(self, scorers: dict[str, dict[str, Any]], image_root: str):
        import torch

        from pipeline.evaluate.scorers import build_scorer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorers = {name: build_scorer(name, device=device, **options) for name, options in scorers.items()}
        self.image_root = image_root

    def _image(self, relative: str):
        from PIL import Image

        fs, path = filesystem(join_uri(self.image_root, relative))
        with fs.open_input_file(path) as src:
            image = Image.open(src)
            image.load()
        return image.convert("RGB")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [self._image(str(f)) for f in batch["file"]]
        prompts = [str(p) for p in batch["prompt"]]
        out = dict(batch)
        for name, scorer in self.scorers.items():
            out[f"score_{name}"] = np.asarray(scorer.score(images, prompts), dtype=np.float64)
            if hasattr(scorer, "classes"):
                out["style_class"] = np.array(scorer.classes(images))
        return out


def run_scoring(cfg: AlignConfig, index: pa.Table, image_root: str) -> pa.Table:
    """The generation index with one float64 ``score_<name>`` column per scorer of evaluate.scorers."""
    import ray

    e = cfg.evaluate
    scorers = {name: scorer_options(cfg, name) for name in e.scorers}
    _check_scorers_load(scorers)
    scored = ray.data.from_arrow(index).map_batches(
        ScoreImages,
        fn_constructor_kwargs={"scorers": scorers, "image_root": image_root},
        compute=ray.data.ActorPoolStrategy(size=e.num_actors),
        batch_size=e.batch_size,
        batch_format="numpy",
        num_cpus=e.actor_num_cpus,
        num_gpus=e.actor_num_gpus,
    )
    table = pa.Table.from_pylist(scored.take_all())
    return table.sort_by([("model", "ascending"), ("prompt_id", "ascending"), ("seed", "ascending")])


def _check_scorers_load(scorers: dict[str, dict[str, Any]]) -> None:
    """Missing weights end the job here, before any image is made, with the scorer's own message (which names the
    path and where the file comes from), not inside an actor's traceback. Weights that are there are loaded by the
    actors only: a reward model is gigabytes, and the driver need not hold a copy."""
    from pipeline.evaluate.scorers import build_scorer

    for name, options in scorers.items():
        weights = options.get("weights")
        missing = weights is None or (weights.startswith((".", "/", "~")) and not Path(weights).expanduser().exists())
        if name not in ("style", "clip") and missing:
            build_scorer(name, device="cpu", **options)  # raises WeightsNotFound


def evaluate_generated(cfg: AlignConfig, generation, *, out_dir: str, baseline: str,
                       info: dict[str, Any] | None = None, sweep: dict[str, Any] | None = None) -> EvaluationResult:
    """Score a finished generation (pipeline.generate.run.GenerationResult), compare, write scores and report."""
    e = cfg.evaluate
    scores = run_scoring(cfg, generation.index, generation.out_dir)
    models = list(dict.fromkeys(generation.index.column("model").to_pylist()))
    models = [baseline] + [m for m in models if m != baseline]
    comparison = compare_models(
        scores, models=models, baseline=baseline, scorers=list(e.scorers),
        target_style=cfg.data.toy_target_style if "style" in e.scorers else None,
        confidence_level=e.confidence_level, n_resamples=e.bootstrap_resamples, tie_margins=e.tie_margins,
    )
    scores_uri = join_uri(out_dir, "evaluate", "scores.parquet")
    fs, path = filesystem(scores_uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(scores, path, filesystem=fs)
    write_text(join_uri(out_dir, "evaluate", "comparison.json"), json.dumps(comparison, indent=1))
    report_path = write_run_report(cfg, comparison, scores, generation.out_dir, out_dir, info or {}, sweep=sweep)
    return EvaluationResult(comparison, report_path, scores_uri, generation.index_uri)


def write_run_report(cfg: AlignConfig, comparison: dict[str, Any], scores: pa.Table, image_root: str,
                     out_dir: str, info: dict[str, Any], *, sweep: dict[str, Any] | None = None) -> str:
    """``<out_dir>/report/index.html``; built locally and uploaded when ``out_dir`` is an object-store URI."""
    from pipeline.evaluate.report import write_report

    metrics = join_uri(cfg.run_dir, "train", "metrics.jsonl")
    info = {
        "run": cfg.name, "objective": cfg.loss.objective, "base_model": cfg.model.pretrained,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generation": vars(cfg.generate), **info, "config": cfg.to_dict(),
    }
    report_uri = join_uri(out_dir, "report")
    if is_local(out_dir) and is_local(image_root):
        html = write_report(
            absolute(report_uri), comparison=comparison, scores=scores, image_root=absolute(image_root),
            metrics_jsonl=absolute(metrics) if is_local(metrics) and exists(metrics) else None, info=info,
            grid_prompts=cfg.evaluate.grid_prompts, sweep=sweep,
        )
        return str(html)
    from pipeline.generate.models import local_copy

    with tempfile.TemporaryDirectory() as staging:
        local_images = image_root if is_local(image_root) else str(local_copy(image_root))
        local_metrics = None
        if exists(metrics):
            local_metrics = metrics if is_local(metrics) else str(local_copy(metrics))
        write_report(staging, comparison=comparison, scores=scores, image_root=local_images,
                     metrics_jsonl=local_metrics, info=info, grid_prompts=cfg.evaluate.grid_prompts, sweep=sweep)
        upload_dir(staging, report_uri)
    return join_uri(report_uri, "index.html")


def evaluate_models(cfg: AlignConfig, models: dict[str, str], *, out_dir: str, baseline: str,
                    info: dict[str, Any] | None = None, sweep: dict[str, Any] | None = None) -> EvaluationResult:
    """Generate (paired prompts and seeds) for every model, score, compare with ``baseline``, write the report
    (with a sweep section when ``sweep`` is given: pipeline.tune.run's trials table and plot)."""
    from pipeline.generate.run import run_generation

    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not one of the models {sorted(models)}")
    _check_scorers_load({name: scorer_options(cfg, name) for name in cfg.evaluate.scorers})
    generation = run_generation(cfg, models, out_dir=join_uri(out_dir, "generate"))
    return evaluate_generated(cfg, generation, out_dir=out_dir, baseline=baseline,
                              info={"models": models, **(info or {})}, sweep=sweep)


