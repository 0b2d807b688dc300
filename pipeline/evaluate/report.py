"""The per-run report: one self-contained HTML page (no JavaScript, no external resources) plus report.json.

    html = write_report("runs/toy/report", comparison=comparison, scores=scores, image_root="runs/toy/generate",
                        metrics_jsonl="runs/toy/train/metrics.jsonl", info={"run": "toy", ...})
    screenshot(html, "runs/toy/report/screenshot.png")          # headless Chromium (Debian's `chromium`)

The page shows: the run's facts (config collapsed), the metrics table (mean score per model and the paired win rate
of each model over the baseline, intervals at the comparison's confidence level; the style share), base-vs-aligned
image grids for the same prompts and seeds, the training curves from metrics.jsonl (matplotlib, Agg), an optional
sweep section, and how to read it all. Images are embedded as base64 data URIs so the file can be mailed or
uploaded alone; report.json holds every number the page shows, and the plots are also saved beside as PNGs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image

THUMBNAIL_PX = 256  # larger images are embedded as JPEG thumbnails of this size, to keep the page small
PIXELATED_MAX_PX = 128  # images this small (toy renders) are shown enlarged with hard pixel edges
SHOWN_PX = 192  # the displayed width of every grid image (an exact multiple of 32 and 64 px toy renders)
TABLE_HEADER_RGB = (214, 226, 242)  # the metrics tables' header colour; the render test looks for it
REQUIRED_COLUMNS = ("model", "prompt_id", "prompt", "seed", "file")
CHROMIUM_HINT = "install it with: apt-get update && apt-get install -y chromium (as root; setup.sh does this)"

# Curves plotted from metrics.jsonl: series name -> the keys that may carry it (training logs the first; the others
# are the short names some tools use).
CURVE_KEYS = {
    "loss": ("loss",),
    "accuracy": ("implicit_accuracy", "accuracy"),
    "margin": ("reward_margin", "margin"),
    "holdout_accuracy": ("holdout_accuracy",),
    "holdout_margin": ("holdout_margin",),
}
# Training logs the step-0 holdout values on its first holdout line as start_<key>: they belong at step 0.
START_KEYS = {"holdout_accuracy": "start_holdout_accuracy", "holdout_margin": "start_holdout_margin"}
PANELS = (  # (title, y label, [(series, legend label, style)], chance line)
    ("Loss", "loss", [("loss", "training batch", "-")], None),
    ("Implicit accuracy", "share of pairs", [("accuracy", "training batch", "-"),
                                             ("holdout_accuracy", "held-apart pairs", "o-")], 0.5),
    ("Reward margin", "margin", [("margin", "training batch", "-"), ("holdout_margin", "held-apart pairs", "o-")],
     0.0),
)


# ------------------------------------------------------------------------------------------------ entry point


def write_report(report_dir: str | Path, *, comparison: dict, scores: pa.Table, image_root: str | Path,
                 metrics_jsonl: str | Path | None, info: dict, grid_prompts: int = 8,
                 sweep: dict | None = None) -> Path:
    """Write ``<report_dir>/index.html`` (self-contained), ``report.json`` and the plots' PNGs; return the HTML path."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    models = list(comparison["models"])
    check_scores(scores, models)

    curves = read_metrics(metrics_jsonl) if metrics_jsonl is not None and Path(metrics_jsonl).is_file() else None
    curves_png = plot_curves(curves, report_dir / "curves.png") if curves else None
    grid = grid_rows(scores, models=models, grid_prompts=grid_prompts, scorers=list(comparison.get("scorers", {})))
    sweep_png = copy_sweep_plot(sweep, report_dir / "sweep_metric.png") if sweep else None

    sections = [  # numbers first, then how to read them; the tall image grids last
        info_section(info),
        metrics_section(comparison),
        HOW_TO_READ,
        curves_section(curves, curves_png, metrics_jsonl),
        sweep_section(sweep, sweep_png) if sweep else "",
        grid_section(grid, models=models, image_root=Path(image_root)),
    ]
    title = f"Report: {info.get('run', report_dir.parent.name)}"
    page = PAGE.format(title=esc(title), css=CSS, body="\n".join(s for s in sections if s))
    html_path = report_dir / "index.html"
    html_path.write_text(page, encoding="utf-8")

    shown = {
        "comparison": comparison, "info": info, "curves": curves, "metrics_jsonl": str(metrics_jsonl or ""),
        "grid": grid, "plots": [p.name for p in (curves_png, sweep_png) if p is not None], "sweep": sweep,
    }
    (report_dir / "report.json").write_text(json.dumps(jsonable(shown), indent=1, allow_nan=False) + "\n")
    return html_path


def check_scores(scores: pa.Table, models: Sequence[str]) -> None:
    """The columns the grid needs are there, and every compared model has images."""
    missing = [c for c in REQUIRED_COLUMNS if c not in scores.column_names]
    if missing:
        raise ValueError(f"report: the scores table lacks column(s) {missing}; it has {scores.column_names}")
    present = set(scores.column("model").to_pylist())
    absent = [m for m in models if m not in present]
    if absent:
        raise ValueError(f"report: comparison['models'] names {absent}, which have no rows in the scores table "
                         f"(models there: {sorted(present)})")


# ------------------------------------------------------------------------------------------------ formatting


def esc(text: Any) -> str:
    """Every piece of text on the page goes through here: prompts and config values are user data."""
    return html.escape(str(text), quote=True)


def fmt(value: Any) -> str:
    """Numbers as the page shows them (report.json keeps them unrounded)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


def fmt_interval(ci: Sequence[float] | None) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def level_label(comparison: dict) -> str:
    level = float(comparison.get("confidence_level", 0.95))
    return f"{level * 100:g}% CI"


def jsonable(value: Any) -> Any:
    """Strict JSON: NaN/inf become null, paths and other objects their text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return jsonable(value.item())
    return str(value)


# ------------------------------------------------------------------------------------------------ run facts


def info_section(info: dict) -> str:
    rows = []
    for key, value in info.items():
        if key == "config":
            continue
        if isinstance(value, dict):
            inner = "".join(f"<tr><th>{esc(k)}</th><td>{esc(_plain(v))}</td></tr>" for k, v in value.items())
            shown = f'<table class="inner">{inner}</table>'
        else:
            shown = esc(_plain(value))
        rows.append(f"<tr><th>{esc(key)}</th><td>{shown}</td></tr>")
    config = ""
    if "config" in info:
        text = json.dumps(jsonable(info["config"]), indent=2)
        config = f"<details><summary>Config</summary><pre>{esc(text)}</pre></details>"
    return f'<section><h2>Run</h2><table class="facts">{"".join(rows)}</table>{config}</section>'


def _plain(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(jsonable(value))
    return fmt(value)


# ------------------------------------------------------------------------------------------------ metrics table


def metrics_section(comparison: dict) -> str:
    """Per scorer: each model's mean with its interval, and each other model's win rate over the baseline."""
    models = list(comparison["models"])
    baseline = comparison["baseline"]
    others = [m for m in models if m != baseline]
    label = level_label(comparison)
    head = "".join(f"<th>{esc(m)}: mean [{label}]</th>" for m in models)
    head += "".join(f"<th>{esc(m)} beats {esc(baseline)}: win rate [{label}] (pairs)</th>" for m in others)
    body = []
    for scorer, result in comparison.get("scorers", {}).items():
        cells = [f"<th>{esc(scorer)}</th>"]
        for m in models:
            mean = result.get("mean", {}).get(m)
            ci = result.get("mean_ci", {}).get(m)
            cells.append(f'<td>{fmt(mean)} <span class="ci">{fmt_interval(ci)}</span></td>')
        for m in others:
            win = result.get("win_rate", {}).get(m)
            if win is None:
                cells.append("<td>n/a</td>")
            else:
                cells.append(f'<td>{fmt(win["value"])} <span class="ci">{fmt_interval(win.get("ci"))}</span> '
                             f'<span class="n">(n={fmt(win.get("n"))})</span></td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    table = (f'<table class="metrics"><thead><tr><th>scorer</th>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>')
    n_pairs = comparison.get("n_pairs")
    lead = (f"<p>{fmt(n_pairs)} (prompt, seed) pairs per model, baseline <b>{esc(baseline)}</b>; intervals are "
            f"{esc(label)}s.</p>")
    return f"<section><h2>Metrics</h2>{lead}{table}{style_table(comparison)}</section>"


def style_table(comparison: dict) -> str:
    style = comparison.get("style")
    if not style:
        return ""
    label = level_label(comparison)
    head = "".join(f"<th>{esc(m)} [{label}] (images)</th>" for m in comparison["models"])
    cells = []
    for m in comparison["models"]:
        share = style.get("share", {}).get(m)
        cells.append("<td>n/a</td>" if share is None else
                     f'<td>{fmt(share["value"])} <span class="ci">{fmt_interval(share.get("ci"))}</span> '
                     f'<span class="n">(n={fmt(share.get("n"))})</span></td>')
    return (f'<h3>Style alignment</h3><table class="metrics"><thead><tr><th>share of images in style</th>{head}</tr>'
            f'</thead><tbody><tr><th>{esc(style.get("target", ""))}</th>{"".join(cells)}</tr></tbody></table>')


# ------------------------------------------------------------------------------------------------ image grids


def score_columns(scores: pa.Table, scorers: Sequence[str] = ()) -> list[str]:
    """The score_<name> columns, those of ``scorers`` first in that order (the metrics table's), then the rest."""
    present = [c for c in scores.column_names if c.startswith("score_")]
    first = [f"score_{name}" for name in scorers if f"score_{name}" in present]
    return first + [c for c in present if c not in first]


def grid_rows(scores: pa.Table, *, models: Sequence[str], grid_prompts: int,
              scorers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The first ``grid_prompts`` prompt ids (in id order), one row per (prompt, seed) with each model's image file
    and scores (in ``scorers`` order); a model without that (prompt, seed) gets None (shown as a gap)."""
    columns = list(REQUIRED_COLUMNS) + score_columns(scores, scorers)
    if "style_class" in scores.column_names:
        columns.append("style_class")
    records = scores.select(columns).to_pylist()
    chosen = sorted({r["prompt_id"] for r in records})[:grid_prompts]
    keep = set(chosen)
    by_key: dict[tuple[int, int], dict[str, Any]] = {}
    for r in records:
        if r["prompt_id"] not in keep or r["model"] not in models:
            continue
        row = by_key.setdefault((r["prompt_id"], r["seed"]), {"prompt_id": r["prompt_id"], "seed": r["seed"],
                                                              "prompt": r["prompt"], "images": {}})
        row["images"][r["model"]] = {
            "file": r["file"],
            "scores": {c[len("score_"):]: r[c] for c in columns if c.startswith("score_")},
            **({"style_class": r["style_class"]} if "style_class" in r else {}),
        }
    rows = [by_key[k] for k in sorted(by_key)]
    for row in rows:
        row["images"] = {m: row["images"].get(m) for m in models}
    return rows


def image_data_uri(path: Path) -> tuple[str, bool]:
    """(data URI, small): PNG/JPEG bytes as they are when at most THUMBNAIL_PX, else a THUMBNAIL_PX JPEG thumbnail."""
    if not path.is_file():
        raise FileNotFoundError(f"report: image {path} (from the scores table's 'file' column, relative to "
                                f"image_root) does not exist; was the generation folder moved?")
    with Image.open(path) as image:
        width, height = image.size
        kind = image.format
        if max(width, height) > THUMBNAIL_PX:
            thumb = image.convert("RGB")
            thumb.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=85)
            data, mime = buffer.getvalue(), "image/jpeg"
        elif kind in ("PNG", "JPEG"):
            data, mime = path.read_bytes(), f"image/{kind.lower()}"
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data, mime = buffer.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", max(width, height) <= PIXELATED_MAX_PX


def caption(image: dict[str, Any]) -> str:
    parts = [f"{esc(name)} {fmt(value)}" for name, value in image["scores"].items()]
    if image.get("style_class") is not None:
        parts.append(f"class {esc(image['style_class'])}")
    return "<br>".join(parts)


def grid_section(rows: list[dict[str, Any]], *, models: Sequence[str], image_root: Path) -> str:
    if not rows:
        return "<section><h2>Images</h2><p>No prompts to show (evaluate.grid_prompts is 0).</p></section>"
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    body = []
    for row in rows:
        cells = [f'<td class="prompt"><span class="pid">#{fmt(row["prompt_id"])}, seed {fmt(row["seed"])}</span>'
                 f'<br>{esc(row["prompt"])}</td>']
        for m in models:
            image = row["images"][m]
            if image is None:
                cells.append('<td class="gap">no image for this prompt and seed</td>')
                continue
            uri, small = image_data_uri(image_root / image["file"])
            css_class = ' class="pixelated"' if small else ""
            cells.append(f'<td><figure><img{css_class} src="{uri}" alt="{esc(m)}: {esc(row["prompt"])}">'
                         f"<figcaption>{caption(image)}</figcaption></figure></td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<section><h2>Images: same prompt and seed, one column per model</h2><table class="grid"><thead><tr>'
            f'<th>prompt</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></section>')


# ------------------------------------------------------------------------------------------------ training curves


def read_metrics(path: str | Path) -> dict[str, dict[str, list]]:
    """Series {name: {"step": [...], "value": [...]}} from metrics.jsonl, sorted by step, keeping the last value per
    step (a resumed run logs its steps again); names as in CURVE_KEYS, only those present."""
    path = Path(path)
    per_series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"report: {path} line {number} is not a JSON object with a 'step' ({error}); "
                             f"metrics.jsonl is written by training, one object per line") from None
        for name, keys in CURVE_KEYS.items():
            value = next((record[k] for k in keys if _is_number(record.get(k))), None)
            if value is not None:
                per_series.setdefault(name, {})[step] = float(value)
        for name, key in START_KEYS.items():
            if _is_number(record.get(key)):
                per_series.setdefault(name, {})[0] = float(record[key])
    return {name: {"step": sorted(points), "value": [points[s] for s in sorted(points)]}
            for name, points in per_series.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_curves(curves: dict[str, dict[str, list]], png_path: Path) -> Path | None:
    """One PNG with a panel per quantity that has data (loss, implicit accuracy, reward margin; training batches and
    held-apart pairs together); None when no series is plottable."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [p for p in PANELS if any(name in curves for name, _, _ in p[2])]
    if not panels:
        return None
    figure = Figure(figsize=(4.2 * len(panels), 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # Agg explicitly: no display, no pyplot global state
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, ylabel, series, chance) in zip(axes, panels):
        for name, label, style in series:
            if name in curves:
                ax.plot(curves[name]["step"], curves[name]["value"], style, label=label, markersize=4)
        if chance is not None:
            ax.axhline(chance, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len([n for n, _, _ in series if n in curves]) > 1:
            ax.legend(fontsize=8)
    figure.savefig(png_path, format="png", metadata={"Software": None})  # no version stamp: same input, same bytes
    return png_path


def png_data_uri(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def curves_section(curves: dict | None, png: Path | None, metrics_jsonl: str | Path | None) -> str:
    if metrics_jsonl is None:
        note = "No training metrics were given (no metrics.jsonl: this run did not train, or its folder is elsewhere)."
    elif curves is None:
        note = f"No training metrics: {esc(metrics_jsonl)} does not exist."
    elif png is None:
        note = f"{esc(metrics_jsonl)} has no loss, accuracy or margin values to plot."
    else:
        return (f'<section><h2>Training curves</h2><img class="plot" src="{png_data_uri(png)}" '
                f'alt="training curves"><p class="note">From {esc(metrics_jsonl)}; the last value per step.</p>'
                f"</section>")
    return f'<section><h2>Training curves</h2><p class="note">{note}</p></section>'


# ------------------------------------------------------------------------------------------------ sweep


def copy_sweep_plot(sweep: dict, png_path: Path) -> Path | None:
    """The sweep's own plot (pipeline.tune.plot, a path or object-store URI under sweep["plot"]) copied beside."""
    source = sweep.get("plot")
    if not source:
        return None
    from pipeline.storage import filesystem

    fs, where = filesystem(str(source))
    with fs.open_input_stream(where) as stream:
        png_path.write_bytes(stream.read())
    return png_path


def sweep_section(sweep: dict, png: Path | None) -> str:
    """A table of trials (swept values, last metric, status) with the best marked, and the sweep's plot."""
    metric = sweep.get("metric", "metric")
    trials = sweep.get("trials", [])
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("config") or {})))
    head = "".join(f"<th>{esc(k)}</th>" for k in keys)
    body = []
    for t in trials:
        best = t.get("trial_id") == sweep.get("best")
        status = t.get("status") or ("stopped early" if t.get("stopped_early") else "finished")
        cells = [f"<td>{esc(t.get('trial_id'))}{' (best)' if best else ''}</td>"]
        cells += [f"<td>{esc(fmt((t.get('config') or {}).get(k)))}</td>" for k in keys]
        cells += [f"<td>{esc(fmt(t.get('metric')))}</td>", f"<td>{esc(fmt(t.get('last_step')))}</td>",
                  f"<td>{esc(status)}{': ' + esc(t['error']) if t.get('error') else ''}</td>"]
        row_class = ' class="best"' if best else ""
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    plot = f'<img class="plot" src="{png_data_uri(png)}" alt="sweep metric per trial">' if png else ""
    mode = sweep.get("mode", "max")
    return (f"<section><h2>Sweep</h2><p>{len(trials)} trials; best = the finished trial with the "
            f"{'highest' if mode == 'max' else 'lowest'} last {esc(metric)}, evaluated above.</p>"
            f'<table class="metrics"><thead><tr><th>trial</th>{head}<th>{esc(metric)} (last)</th><th>last step</th>'
            f'<th>status</th></tr></thead><tbody>{"".join(body)}</tbody></table>{plot}</section>')


# ------------------------------------------------------------------------------------------------ rendering


def screenshot(html_path: str | Path, png_path: str | Path, *, width: int = 1280, height: int = 2000,
               timeout_s: float = 60.0) -> Path:
    """Render ``html_path`` in headless Chromium (Debian's ``chromium``) to a ``width`` x ``height`` PNG."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError(f"headless Chromium is not on PATH: {CHROMIUM_HINT}")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:  # own profile: parallel renders coexist
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                   "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}",
                   f"--window-size={width},{height}", f"--screenshot={png_path}", html_path.as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if not png_path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {html_path} (exit {done.returncode}): "
                           f"{done.stderr.strip()[-800:]}")
    return png_path


# ------------------------------------------------------------------------------------------------ page


HOW_TO_READ = """<section><h2>How to read this</h2>
<p><b>Mean</b>: the average score of each model's images under each scorer, with a bootstrap interval.
<b>Win rate</b>: over the same (prompt, seed) pairs, the share where that model's image scores higher than the
baseline's (ties count half): 0.5 means no difference, and an interval that lies wholly above 0.5 is evidence that
the model is preferred by that scorer. Base and aligned images start from the same noise, so the grids show what
training changed and little else. <b>Style share</b> (toy world): the share of images the style scorer classifies
in the target style, with a Wilson interval. <b>Training curves</b>: implicit accuracy is the share of preference
pairs where the trained model moved towards the preferred image more than the reference did; it starts at 0.5.
Held-apart pairs were never trained on: training accuracy rising while held-apart accuracy stays flat is
overfitting. Reward scores are only comparable within one scorer, never across scorers.</p></section>"""

CSS = """
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; margin: 24px; color: #1d2330;
       background: #ffffff; max-width: 1400px; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; border-bottom: 2px solid #c9d4e5; padding-bottom: 4px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #c9d4e5; padding: 4px 8px; text-align: left; vertical-align: top; font-size: 14px; }
table.metrics thead th, table.grid thead th { background: rgb(%d, %d, %d); }
table.metrics tbody th { background: #f3f6fb; }
table.facts th { background: #f3f6fb; width: 180px; }
table.inner th { width: auto; }
.ci { color: #4a5a78; }
.n, .note, .pid { color: #6b7789; font-size: 12px; }
td.prompt { max-width: 260px; }
td.gap { color: #a0a8b5; font-style: italic; width: %dpx; }
figure { margin: 0; }
figure img { width: %dpx; height: auto; display: block; }
img.pixelated { image-rendering: pixelated; }
figcaption { font-size: 12px; color: #33405a; margin-top: 2px; }
img.plot { max-width: 100%%; }
tr.best td { font-weight: bold; }
pre { background: #f6f7f9; padding: 8px; font-size: 12px; overflow: auto; }
""" % (*TABLE_HEADER_RGB, SHOWN_PX, SHOWN_PX)

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{css}</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
