"""Per-step metrics to TensorBoard, metrics.jsonl and MLflow, from Ray Train's controller.

A Ray Train `UserCallback` sees every `ray.train.report`; it writes rank 0's metrics (already averaged over ranks
by the workers) as scalars to TensorBoard, one JSON line per report to metrics.jsonl beside the checkpoints, and,
when an MLflow tracking URI is given (`cluster.mlflow_tracking_uri`, or MLFLOW_TRACKING_URI in the driver's
environment), to an MLflow run named after the run, in the experiment of that name. A resumed run logs into the
same MLflow run (found by its tag), so its curves continue.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ray.train.v2.api.callback import UserCallback

from pipeline.storage import is_local

RUN_TAG = "rpo_pipeline.run_uri"  # identifies the MLflow run of one training run folder across resumes


def mlflow_tracking_uri(configured: str | None) -> str | None:
    """The configured URI, else MLFLOW_TRACKING_URI of this (the driver's) environment, else None (no MLflow)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or None


class MetricsLogger(UserCallback):
    def __init__(self, run_uri: str, *, mlflow_uri: str | None = None, experiment: str = "rpo-pipeline",
                 params: dict[str, Any] | None = None):
        self.run_uri = run_uri
        self.mlflow_uri = mlflow_uri
        self.experiment = experiment
        self.params = params or {}
        self._writer = None
        self._mlflow_run_id: str | None = None

    def _tensorboard(self):
        if self._writer is None and is_local(self.run_uri):
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=os.path.join(self.run_uri, "tensorboard"))
        return self._writer

    def _mlflow(self):
        """An MlflowClient and the id of this training run's MLflow run (created once, found again on resume)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_uri)
        if self._mlflow_run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
            found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{self.run_uri}'")
            if found:
                self._mlflow_run_id = found[0].info.run_id
            else:
                run = client.create_run(experiment_id, tags={RUN_TAG: self.run_uri}, run_name=self.experiment)
                self._mlflow_run_id = run.info.run_id
                for key, value in self.params.items():
                    client.log_param(self._mlflow_run_id, key, str(value)[:500])
        return client

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
        if self.mlflow_uri:
            from mlflow.entities import Metric

            client = self._mlflow()
            now = time.time_ns() // 1_000_000
            client.log_batch(self._mlflow_run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])
