"""MetricsLogger, Ray Train's callback for metrics: TensorBoard + metrics.jsonl, and MLflow when asked."""

import json

from mlflow.tracking import MlflowClient

from pipeline.config import load_config
from pipeline.train.metrics import RUN_TAG, MetricsLogger, mlflow_tracking_uri
from pipeline.train.run import metrics_logger


def report(logger: MetricsLogger, step: int, loss: float) -> None:
    logger.after_report(None, [{"step": step, "loss": loss, "lr": 1e-5}], None)


def test_metrics_go_to_jsonl_tensorboard_and_one_mlflow_run_across_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder store: no server or database in a test
    tracking = f"file://{tmp_path / 'mlruns'}"
    run_dir = tmp_path / "run" / "train"
    run_dir.mkdir(parents=True)
    first = MetricsLogger(str(run_dir), mlflow_uri=tracking, experiment="exp", params={"loss.beta": 5000})
    report(first, 1, 0.69)
    report(first, 2, 0.68)
    resumed = MetricsLogger(str(run_dir), mlflow_uri=tracking, experiment="exp")  # a re-run of the same command
    report(resumed, 3, 0.67)

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in lines] == [(1, 0.69), (2, 0.68), (3, 0.67)]
    assert list((run_dir / "tensorboard").iterdir())

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].data.tags[RUN_TAG] == str(run_dir)
    assert runs[0].data.params["loss.beta"] == "5000"
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.69), (2, 0.68), (3, 0.67)]


def test_mlflow_is_off_unless_a_tracking_uri_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_tracking_uri(None) is None
    assert mlflow_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///elsewhere")
    assert mlflow_tracking_uri(None) == "file:///elsewhere"
    cfg = load_config(None, [f"cluster.mlflow_tracking_uri=file://{tmp_path}/mlruns", "name=exp"])
    logger = metrics_logger(cfg, str(tmp_path))
    assert logger.mlflow_uri == f"file://{tmp_path}/mlruns" and logger.experiment == "exp"
    assert logger.params["loss.objective"] == "rpo"
