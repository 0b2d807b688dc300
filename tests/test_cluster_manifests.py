"""cluster/: every manifest parses, names an entry point and a config that exist (and load), schedules are valid
cron, and the Ray dashboard is never exposed outside the cluster."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}

# ------------------------------------------------------------------------------------------ cron, by hand

CRON_FIELDS = [("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7)]


def cron_errors(expression: str) -> list[str]:
    """What is wrong with a 5-field cron expression (Kubernetes CronJob syntax without names); [] if valid."""
    fields = expression.split()
    if len(fields) != 5:
        return [f"{expression!r}: {len(fields)} fields, cron has 5 (minute hour day-of-month month day-of-week)"]
    errors = []
    for text, (name, low, high) in zip(fields, CRON_FIELDS):
        for part in text.split(","):
            match = re.fullmatch(r"(\*|\d+(?:-\d+)?)(?:/(\d+))?", part)
            if not match:
                errors.append(f"{name} {part!r}: not *, N, N-M, with an optional /step")
                continue
            span, step = match.groups()
            if step is not None and int(step) == 0:
                errors.append(f"{name} {part!r}: a step of 0")
            if span != "*":
                bounds = [int(v) for v in span.split("-")]
                if not all(low <= v <= high for v in bounds) or bounds != sorted(bounds):
                    errors.append(f"{name} {part!r}: outside {low}-{high} or reversed")
    return errors


@pytest.mark.parametrize("good", ["0 3 * * *", "*/15 0-6 1,15 * 1-5", "30 2 * 1/2 0", "0 0 31 12 7"])
def test_the_cron_check_accepts_valid_schedules(good):
    assert cron_errors(good) == []


@pytest.mark.parametrize("bad", ["0 3 * *", "60 3 * * *", "0 24 * * *", "0 3 0 * *", "0 3 * 13 *", "*/0 * * * *",
                                 "5-1 * * * *", "@daily", "0 3 * * MON-FRI"])
def test_the_cron_check_rejects_invalid_schedules(bad):
    assert cron_errors(bad)


# ------------------------------------------------------------------------------------------ the manifests


def documents() -> list[tuple[Path, dict]]:
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
                if doc.get("kind") == "ConfigMap":  # templates the scheduler fills in are manifests too
                    out += [(path, yaml.safe_load(v)) for k, v in doc.get("data", {}).items() if k.endswith(".yaml")]
    return out


def walk(node, key):
    """Every value stored under `key` anywhere in a parsed document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def check_command(command: str, where: str) -> None:
    """`python jobs/<script>.py --config <file> [--set k=v ...]`: the script and the config exist, and the config
    (with the overrides) loads and validates."""
    words = shlex.split(command)
    assert words[0] == "python" and words[1].startswith("jobs/"), f"{where}: {command!r} is not python jobs/..."
    assert (ROOT / words[1]).is_file(), f"{where}: entry point {words[1]} does not exist"
    assert "--config" in words, f"{where}: {command!r} names no --config"
    config = words[words.index("--config") + 1]
    assert (ROOT / config).is_file(), f"{where}: config {config} does not exist"
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    load_config(ROOT / config, overrides)


def test_every_manifest_parses_and_the_expected_ones_are_there():
    kinds = {(path.relative_to(CLUSTER).as_posix(), doc.get("kind")) for path, doc in documents()}
    for expected in [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob-align.yaml", "RayJob"),
                     ("kuberay/realign-cronjob.yaml", "CronJob"), ("kuberay/realign-cronjob.yaml", "RayJob"),
                     ("kuberay/realign-raycronjob.yaml", "RayCronJob"), ("ray-cluster.yaml", None),
                     ("runtime_env.yaml", None)]:
        assert expected in kinds, f"missing {expected}"
    for path, doc in documents():
        if doc.get("kind") in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['kind']} must be ray.io/v1"


def test_every_entry_point_and_config_exist():
    entrypoints = [(path, e) for path, doc in documents() for e in walk(doc, "entrypoint")]
    assert len(entrypoints) >= 3  # the align RayJob, the CronJob's RayJob, the RayCronJob
    for path, command in entrypoints:
        check_command(command, str(path))
    scripts = {shlex.split(c)[1] for _, c in entrypoints}
    assert {"jobs/align.py", "jobs/realign.py"} <= scripts


def test_every_file_starts_with_a_command_that_works():
    for path in MANIFESTS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path}: the first line should be the command that uses it"
        for command in re.findall(r"python (jobs/\S+\.py --config \S+(?: --set \S+)*)", first):
            check_command(f"python {command}", f"{path} header")


def test_schedules_are_valid_cron_and_slots_are_deterministic():
    schedules = [(path, s) for path, doc in documents() for s in walk(doc, "schedule")]
    assert len(schedules) == 2  # the CronJob and the RayCronJob
    for path, schedule in schedules:
        assert cron_errors(schedule) == [], f"{path}: {cron_errors(schedule)}"
    cron = next(doc for _, doc in documents() if doc.get("kind") == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    template = next(doc for _, doc in documents() if doc.get("kind") == "RayJob" and doc["metadata"]["name"] == "SLOT_NAME")
    assert template["spec"]["jobId"] == "SLOT_NAME"  # the Ray submission id is the slot's name too
    script = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "SLOT_NAME" in script and "kubectl create" in script


def test_the_dashboard_is_not_exposed_outside_the_cluster():
    for path, doc in documents():
        for service_type in walk(doc, "serviceType"):
            assert service_type == "ClusterIP", f"{path}: serviceType {service_type}"
        assert doc.get("kind") not in ("Ingress", "Service") or doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        assert True not in list(walk(doc, "enableIngress")), f"{path}: enableIngress"
        if doc.get("kind") in ("RayCluster", "RayJob"):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            if "headGroupSpec" in spec:
                assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", f"{path}: head service must be ClusterIP"
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    head = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # reached through `ray dashboard` (an SSH tunnel) only


def test_the_launcher_has_gpu_workers_and_shared_storage():
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    worker = launcher["available_node_types"]["gpu_worker"]
    assert worker["max_workers"] >= 1 and worker["node_config"]["InstanceType"].startswith(("p4", "p5", "g5", "g6"))
    assert any("/mnt/shared" in option for option in launcher["docker"]["run_options"])
    assert any("mount" in command for command in launcher["initialization_commands"])


def test_the_runtime_env_keeps_the_upload_small():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".venv/", "runs/"} <= set(env["excludes"])
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in gitignore and "/runs/" in gitignore  # ray job submit honours .gitignore too
