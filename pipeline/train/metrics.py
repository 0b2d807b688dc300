"""Per-step metrics to TensorBoard (and MLflow when it is installed), from Ray Train's controller.

A Ray Train `UserCallback` sees every `ray.train.report`; it writes rank 0's metrics (already averaged over ranks
by the workers) as scalars, plus one JSON line per report to metrics.jsonl beside the checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

from ray.train.v2.api.callback import UserCallback

from pipeline.storage import is_local


class MetricsLogger(UserCallback):
    def __init__(self, run_uri: str):
        self.run_uri = run_uri
        self._writer = None
        self._mlflow = importlib.util.find_spec("mlflow") is not None

    def _tensorboard(self):
        if self._writer is None and is_local(self.run_uri):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.path.join(self.run_uri, "tensorboard"))
        return self._writer

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or not metrics[0]:
            return
        values = metrics[0]
        step = int(values.get("step", 0))
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}
        writer = self._tensorboard()
        if writer is not None:
            for key, value in scalars.items():
                writer.add_scalar(f"train/{key}", value, step)
            writer.flush()
            with open(os.path.join(self.run_uri, "metrics.jsonl"), "a") as out:
                out.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._mlflow:
            import mlflow

            mlflow.log_metrics(scalars, step=step)
