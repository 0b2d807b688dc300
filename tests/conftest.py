"""Shared fixtures. One Ray session serves the whole suite (ray.init costs ~5 s)."""

import os

# Set before Ray, DeepSpeed or torch are imported anywhere in the test process.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1, reached through the standard AWS_* environment variables, which
    are set before Ray starts so its workers inherit them. Returns the endpoint URL."""
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true")
    yield endpoint
    server.stop()


S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
          "AWS_EC2_METADATA_DISABLED")


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """A local Ray with this machine's CPUs; tests that need Ray take this fixture (its workers reach s3_endpoint).

    The dashboard stays on, as on users' clusters: Ray Train V2's placement-group cleaner asks the state API (served
    by the dashboard) whether a run's controller is gone, and without it the placement groups of finished or
    stopped runs are never freed, so a later run (a sweep's next trial) waits for CPUs forever."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                                      **{key: os.environ[key] for key in S3_ENV}}},
        )
    yield ray
    ray.shutdown()
