"""The sweep's plot: the metric of every trial against beta and against tau (the report embeds it)."""

from __future__ import annotations

import io
from typing import Any

from pipeline.storage import filesystem

MARKERS = {"finished": ("o", "tab:blue"), "stopped": ("v", "tab:orange"), "failed": ("x", "tab:red")}


def plot_sweep(rows: list[dict[str, Any]], metric: str, uri: str) -> str | None:
    """A PNG at ``uri`` (a path or object-store URI) with two panels, metric vs loss.beta and vs loss.tau, one marker per trial by
    status (a failed trial without a metric is drawn at the panel's bottom edge); None when no trial reported."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a cluster node
    import matplotlib.pyplot as plt

    values = [r["metric"] for r in rows if r["metric"] is not None]
    if not values:
        return None
    floor = min(values)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), constrained_layout=True)
    for ax, key, label in ((axes[0], "beta", "loss.beta"), (axes[1], "tau", "loss.tau")):
        for status, (marker, colour) in MARKERS.items():
            picked = [r for r in rows if r["status"] == status]
            if picked:
                ax.scatter([r[key] for r in picked], [floor if r["metric"] is None else r["metric"] for r in picked],
                           marker=marker, color=colour, label=status)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric} (last)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    fs, where = filesystem(uri)
    with fs.open_output_stream(where) as out:
        out.write(buffer.getvalue())
    return uri
