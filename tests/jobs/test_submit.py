"""The two ways users run a job on a running head, for real: `ray start --head` on free local ports, then
`ray job submit --working-dir . -- python jobs/align.py ...` (waits for SUCCEEDED), then the same script with
RAY_ADDRESS pointing at that head. The head is stopped by killing exactly the processes it started."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]
VENV_BIN = str(Path(sys.executable).parent)

TINY = [  # the smallest run that still goes through every stage
    "--set", "data.toy_pairs=12", "--set", "data.toy_resolution=32", "--set", "precompute.resolution=32",
    "--set", "model.pretrained=tiny", "--set", "model.tiny_fit_steps=0", "--set", "model.clip_pretrained=random",
    "--set", "train.max_steps=2", "--set", "train.batch_size_per_worker=2",
    "--set", "generate.num_prompts=2", "--set", "generate.seeds=[0]", "--set", "generate.num_inference_steps=2",
    "--set", "evaluate.scorers=[style]", "--set", "evaluate.bootstrap_resamples=100",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_env(**extra) -> dict:
    # The head's job drivers run `python` from the head's PATH: the venv's, as with an activated venv.
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
            "DS_ACCELERATOR": "cpu", "RAY_TRAIN_V2_ENABLED": "1", "HF_HUB_OFFLINE": "1", **extra}


def processes_under(temp_dir: str) -> list[int]:
    """Pids whose command line names this head's temp dir: the head's raylet, GCS, dashboard and workers."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def head():
    """A real head on free ports, in its own temp dir and process group; stopped (only it) at the end."""
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = free_port(), free_port()
    # Every port the head listens on is picked free: the defaults (52365 for the job agent, ...) clash with any
    # other Ray on the machine, and a head whose job agent cannot bind accepts no submissions.
    agent_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                          "metrics-export-port", "runtime-env-agent-port",
                                                          "ray-client-server-port")]
    proc = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", *agent_ports, "--num-cpus=2", f"--temp-dir={temp_dir}",
         "--disable-usage-stats"],
        cwd=ROOT, env=head_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:  # the job API answers once the dashboard is up
            ok = subprocess.run([f"{VENV_BIN}/ray", "job", "list", "--address", url], env=head_env(),
                                capture_output=True, text=True)
            if ok.returncode == 0:
                break
            assert proc.poll() is None and time.monotonic() < deadline, f"head did not start: {ok.stderr[-2000:]}"
            time.sleep(2)
        yield {"gcs": f"127.0.0.1:{port}", "url": url}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # anything that left the group (workers, dashboard agents)
            for pid in processes_under(temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        assert processes_under(temp_dir) == [], "the head left processes behind"


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One run folder for both paths: the direct run resumes what the submitted job made (that keeps it short)."""
    return tmp_path_factory.mktemp("submit")


def check_run(storage: Path, stdout: str) -> None:
    model = storage / "toy" / "model"
    assert (model / "config.json").is_file() and json.loads((model / "final_metrics.json").read_text())["step"] == 2
    report = storage / "toy" / "report" / "index.html"
    assert report.is_file() and f"[align] report: {report}" in stdout


def test_ray_job_submit_with_working_dir_succeeds(head, storage):
    submission_id = f"align-test-{os.getpid()}"
    runtime_env = {"excludes": [".venv/", "runs/", ".git/", "bench/results/"],
                   "env_vars": {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}}
    submit = [f"{VENV_BIN}/ray", "job", "submit", "--address", head["url"], "--submission-id", submission_id,
              "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "jobs/align.py", "--set", f"cluster.storage_path={storage}", *TINY]
    deadline = time.monotonic() + 300
    while True:  # the head's job agent registers a little after the job API answers ("try again later")
        run = subprocess.run(submit, cwd=ROOT, env=head_env(), capture_output=True, text=True, timeout=900)
        if "No available agent" not in run.stdout + run.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Uploading package" in run.stdout + run.stderr  # the working dir went up as a package
    status = subprocess.run([f"{VENV_BIN}/ray", "job", "status", "--address", head["url"], submission_id],
                            env=head_env(), capture_output=True, text=True, timeout=60)
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    check_run(storage, run.stdout)

    again = subprocess.run(  # a retried schedule with the same submission id cannot run twice
        [f"{VENV_BIN}/ray", "job", "submit", "--address", head["url"], "--submission-id", submission_id,
         "--no-wait", "--", "python", "jobs/align.py"], cwd=ROOT, env=head_env(), capture_output=True, text=True,
        timeout=120,
    )
    assert again.returncode != 0 and "already exists" in again.stdout + again.stderr


def test_the_script_joins_the_head_through_ray_address(head, storage):
    run = subprocess.run(
        [sys.executable, "jobs/align.py", "--set", f"cluster.storage_path={storage}", *TINY],
        cwd=ROOT, env=head_env(RAY_ADDRESS=head["gcs"]), capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "Started a local Ray instance" not in run.stdout + run.stderr  # it joined the head, as RAY_ADDRESS says
    assert "nothing new" in run.stdout  # it found the submitted job's store: same head, same storage
    check_run(storage, run.stdout)
