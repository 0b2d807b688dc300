"""cluster/: every manifest is checked against what would read it, offline:

- Ray documents (RayCluster, RayJob, RayCronJob, also those kept as YAML strings in ConfigMaps) against KubeRay's own
  CRD schemas (tests/schemas/kuberay-v1.7.0/), closed to unknown fields as `kubectl apply --validate=strict` is, and
  against the rules KubeRay's operator adds at admission (ray-operator/controllers/ray/utils/validation.go);
- Kubernetes' own kinds (CronJob, ConfigMap, PVC, RBAC, ...) against Kubernetes' schemas (kubernetes-validate, strict);
- the `ray up` launcher against the schema that ships in the ray package (ray/autoscaler/ray-schema.json).
Each check has a negative test that it fails. Also: entry points and configs exist (and load), schedules are valid
cron, the CronJob's slot rendering works, and the Ray dashboard is never exposed outside the cluster."""

import importlib.util
import json
import re
import shlex
import subprocess
import zoneinfo
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).parents[1]
CLUSTER = ROOT / "cluster"
MANIFESTS = sorted(CLUSTER.rglob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob"}
KUBERAY = Path(__file__).parent / "schemas" / "kuberay-v1.7.0"  # see its README.md for the source and commit
CRD_FILES = {"RayCluster": "raycluster.v1.json", "RayJob": "rayjob.v1.json", "RayCronJob": "raycronjob.v1.json"}
# The API servers that the CronJob's kubectl (v1.36) supports: one minor version either side.
KUBERNETES_VERSIONS = ("1.35", "1.36", "1.37")
# What the CronJob's pod makes of SLOT_NAME for its Job rpo-realign-29000000 (a slot in February 2025).
SAMPLE_JOB_NAME = "rpo-realign-29000000"
SAMPLE_SLOT = "realign-29000000"

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


# ------------------------------------------------------------------------------------------ reading the manifests


@lru_cache(maxsize=1)
def manifests() -> tuple[tuple[str, dict], ...]:
    """(where, document) for every document under cluster/; `where` names the file, and for a RayJob kept as a
    YAML string in a ConfigMap also the ConfigMap and key. Such templates are read with SLOT_NAME filled in as the
    CronJob's pod fills it (test_the_cronjob_renders_one_rayjob_per_slot runs the pod's script to check that)."""
    out = []
    for path in MANIFESTS:
        file = path.relative_to(ROOT).as_posix()
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            out.append((file, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        where = f"{file} (ConfigMap {doc['metadata']['name']}, data.{key})"
                        out.append((where, yaml.safe_load(text.replace("SLOT_NAME", SAMPLE_SLOT))))
    return tuple(out)


def label(doc: dict) -> str:
    """kind/name, for error messages."""
    return f"{doc.get('kind', '(no kind)')}/{(doc.get('metadata') or {}).get('name', '(no name)')}"


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


def the(kind: str, name: str | None = None) -> dict:
    """The one document of `kind` (and `name`) under cluster/."""
    found = [d for _, d in manifests() if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} documents {kind}/{name or '*'} under cluster/"
    return found[0]


# ------------------------------------------------------------------------------------------ KubeRay's CRD schemas

# Kubernetes validates metadata itself (ObjectMeta), not through the CRD schema, which says only `type: object`.
# These are the ObjectMeta fields a manifest may set; the rest are the server's.
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
    },
}


def closed(node):
    """A CRD's structural schema (OpenAPI v3 with Kubernetes' extensions) as a JSON Schema that rejects what the
    API server rejects under strict field validation: an object that lists `properties` (or lists none and has no
    `additionalProperties`) allows no other field, unless `x-kubernetes-preserve-unknown-fields: true`;
    `x-kubernetes-int-or-string` takes an integer or a string; `nullable` allows null; an
    `x-kubernetes-embedded-resource` object needs apiVersion and kind and may carry metadata. (Formats and CEL rules,
    x-kubernetes-validations, are not evaluated: the operator's rules below cover the CEL ones on fields used here.)"""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: closed(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = closed(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [closed(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        if "properties" not in props.get("metadata", {}):  # the server checks an embedded resource's ObjectMeta
            props["metadata"] = OBJECT_META
        out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind"})
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def list_type(validator, value, instance, schema):
    """x-kubernetes-list-type: a `map` list has one item per key (x-kubernetes-list-map-keys, defaults filled in as
    the server does), a `set` list no repeated item; the API server refuses duplicates."""
    if not validator.is_type(instance, "array") or value not in ("map", "set"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    item_props = schema.get("items", {}).get("properties", {})
    seen = {}
    for index, item in enumerate(instance):
        if value == "map" and isinstance(item, dict):
            key = tuple(item.get(k, item_props.get(k, {}).get("default")) for k in keys)
        else:
            key = json.dumps(item, sort_keys=True)
        if key in seen:
            yield jsonschema.ValidationError(f"items {seen[key]} and {index} repeat {keys or 'the same item'}: {key}")
        seen.setdefault(key, index)


StrictCRDValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                                  {"x-kubernetes-list-type": list_type})


@lru_cache(maxsize=None)
def crd_validator(kind: str):
    schema = closed(json.loads((KUBERAY / CRD_FILES[kind]).read_text()))
    schema["properties"]["metadata"] = OBJECT_META
    return StrictCRDValidator(schema)


def crd_errors(doc: dict, where: str = "(test)") -> list[str]:
    """Where `doc` breaks its KubeRay CRD schema: 'file: Kind/name: $.json.path: message' each."""
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"{where}: {label(doc)}: apiVersion {doc.get('apiVersion')!r}, KubeRay serves ray.io/v1"]
    errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: e.json_path)
    return [f"{where}: {label(doc)}: {e.json_path}: {e.message}" for e in errors]


# ------------------------------------------------------------------------------------------ KubeRay's operator rules
# What KubeRay v1.7.0's operator refuses beyond the schema, from ray-operator/controllers/ray/utils/validation.go
# (function names cited). A refused RayJob never runs (the operator marks it Failed, with an event), and a refused
# RayCronJob creates no RayJob. Not followed here (no manifest uses them): GCS fault tolerance, auth modes, TLS and
# network-policy details, label syntax, the details of deletionRules, RayService.

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_RAYCLUSTER_NAME = 53  # MaxRayClusterNameLength (utils/constant.go)
MAX_RAYJOB_NAME = MAX_RAYCLUSTER_NAME - 6  # MaxRayJobNameLength
MAX_RAYCRONJOB_NAME = MAX_RAYJOB_NAME - 11  # MaxRayCronJobNameLength: room for -<minutes> in its RayJobs' names
# RayClusterSpec fields behind alpha feature gates, off by default in v1.7.0 (pkg/features/features.go).
GATED_FIELDS = {"networkPolicy": "RayClusterNetworkPolicy", "tlsOptions": "RayClusterMTLS",
                "historyServerOptions": "RayClusterHistoryServer"}
MANAGED_BY = ("ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue")  # the CRD's CEL rule on managedBy


def name_errors(kind: str, name: str, limit: int) -> list[str]:
    """ValidateRayClusterMetadata / ValidateRayJobMetadata / ValidateRayCronJobSpec: short enough for the names the
    operator derives from it, and a DNS-1035 label (a RayCronJob's own name only needs to be one because its
    RayJobs, <name>-<minute>, must be)."""
    errors = []
    if len(name) > limit:
        errors.append(f"{kind} name {name!r} is longer than {limit} characters")
    if len(name) > 63 or not DNS_1035.fullmatch(name):
        errors.append(f"{kind} name {name!r} is not a DNS-1035 label (lower-case letters, digits, '-')")
    return errors


def group_errors(group: str, spec: dict) -> list[str]:
    """validateRayGroupResources, validateRayGroupLabels, and a pod template with a container."""
    errors = []
    params = spec.get("rayStartParams") or {}
    if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and spec.get("resources"):
        errors.append(f"{group}: resources set both in rayStartParams and in resources")
    if "labels" in params:
        errors.append(f"{group}: rayStartParams['labels'] is not supported; use the group's labels field")
    if not (((spec.get("template") or {}).get("spec") or {}).get("containers")):
        errors.append(f"{group}: the pod template has no container")
    return errors


def raycluster_spec_errors(spec: dict) -> list[str]:
    """ValidateRayClusterSpec, the parts a manifest here can break."""
    errors = []
    head = spec.get("headGroupSpec") or {}
    errors += group_errors("headGroupSpec", head)
    autoscaling = spec.get("enableInTreeAutoscaling") is True  # IsAutoscalingEnabled
    for index, group in enumerate(spec.get("workerGroupSpecs") or []):
        where = f"workerGroupSpecs[{index}] ({group.get('groupName')})"
        errors += group_errors(where, group)
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not autoscaling and (low is None or high is None):
            errors.append(f"{where}: minReplicas and maxReplicas are both needed when autoscaling is off")
        if (low is not None and low < 0) or (high is not None and high < 0):
            errors.append(f"{where}: negative minReplicas or maxReplicas")
        if low is not None and high is not None and low > high:
            errors.append(f"{where}: minReplicas {low} > maxReplicas {high}")
        if group.get("suspend") and autoscaling:
            errors.append(f"{where}: a worker group cannot be suspended with the autoscaler on")
    if not autoscaling:
        containers = ((head.get("template") or {}).get("spec") or {}).get("containers") or [{}]
        env = {e.get("name"): e.get("value") for e in containers[0].get("env") or []}
        if env.get("RAY_enable_autoscaler_v2") in ("1", "true"):
            errors.append("RAY_enable_autoscaler_v2 is set on the head while enableInTreeAutoscaling is not true")
    for field, gate in GATED_FIELDS.items():
        if field in spec:
            errors.append(f"{field} needs the {gate} feature gate, off by default")
    if "managedBy" in spec and spec["managedBy"] not in MANAGED_BY:
        errors.append(f"managedBy must be one of {MANAGED_BY}")
    return errors


def rayjob_spec_errors(spec: dict) -> list[str]:
    """ValidateRayJobSpec (with validateDeletionConfiguration and validateLegacyDeletionPolicies' main rules)."""
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes") is True
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    selector = spec.get("clusterSelector") or {}
    mode = spec.get("submissionMode", "K8sJobMode")
    backoff = spec.get("backoffLimit")
    if spec.get("suspend") and not shutdown:
        errors.append("suspend needs shutdownAfterJobFinishes: true")
    if ttl < 0:
        errors.append("ttlSecondsAfterFinished must not be negative")
    # validateDeletionConfiguration, since KubeRay 1.4: a TTL only means something when the cluster is shut down.
    if ttl > 0 and not shutdown:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true (KubeRay >= 1.4 refuses it)")
    strategy = spec.get("deletionStrategy")
    if strategy is not None:  # the RayJobDeletionPolicy gate is on by default in v1.7.0
        legacy = "onSuccess" in strategy or "onFailure" in strategy
        rules = bool(strategy.get("deletionRules"))
        if rules and shutdown:
            errors.append("deletionStrategy.deletionRules and shutdownAfterJobFinishes are mutually exclusive")
        if rules and legacy:
            errors.append("deletionStrategy: onSuccess/onFailure and deletionRules are mutually exclusive")
        if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
            errors.append("deletionStrategy needs both onSuccess and onFailure, or deletionRules")
    # A RayJob either brings its cluster (rayClusterSpec) or runs on an existing one (clusterSelector).
    if selector:
        if spec.get("suspend"):
            errors.append("clusterSelector mode cannot be suspended")
        if not selector.get("ray.io/cluster"):
            errors.append("clusterSelector needs the cluster's name under ray.io/cluster")
        if mode == "SidecarMode":
            errors.append("clusterSelector is not supported in SidecarMode")
        if backoff is not None and backoff > 0:
            errors.append("backoffLimit > 0 is incompatible with clusterSelector")
    elif spec.get("rayClusterSpec") is None:
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if mode == "InteractiveMode" and backoff is not None and backoff > 0:
        errors.append("backoffLimit > 0 is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        for field in ("submitterPodTemplate", "submitterConfig"):
            if field in spec:
                errors.append(f"SidecarMode does not support {field}")
        head_pod = ((spec.get("rayClusterSpec") or {}).get("headGroupSpec") or {}).get("template", {}).get("spec", {})
        if head_pod.get("restartPolicy", "Never") != "Never":
            errors.append("SidecarMode needs the head pod's restartPolicy Never or unset")
    if spec.get("rayClusterSpec") is not None:
        if ((spec["rayClusterSpec"].get("authOptions") or {}).get("enableK8sTokenAuth")):
            errors.append("K8s token auth is not supported for RayJob")
        errors += [f"rayClusterSpec: {e}" for e in raycluster_spec_errors(spec["rayClusterSpec"])]
    try:  # the operator unmarshals runtimeEnvYAML into a map before it submits anything
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML", ""))
        if runtime_env is not None and not isinstance(runtime_env, dict):
            errors.append("runtimeEnvYAML is not a YAML mapping")
    except yaml.YAMLError as err:
        errors.append(f"runtimeEnvYAML does not parse: {err}")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            errors.append(f"{field} must be positive")
    if backoff is not None and backoff < 0:
        errors.append("backoffLimit must not be negative")
    return errors


def raycronjob_spec_errors(spec: dict) -> list[str]:
    """ValidateRayCronJobSpec (the name is checked in kuberay_errors). The schedule check is cron_errors, stricter
    than the operator's parser (no @daily or names): the CronJob and the RayCronJob keep one syntax."""
    errors = []
    schedule = spec.get("schedule", "")
    if "TZ" in schedule:
        errors.append("schedule: no TZ= or CRON_TZ=; use timeZone")
    errors += [f"schedule: {e}" for e in cron_errors(schedule)]
    if "timeZone" in spec:
        try:
            zoneinfo.ZoneInfo(spec["timeZone"])
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            errors.append(f"timeZone {spec['timeZone']!r} is not a time zone")
    errors += [f"jobTemplate: {e}" for e in rayjob_spec_errors(spec.get("jobTemplate") or {})]
    return errors


def kuberay_errors(doc: dict, where: str = "(test)") -> list[str]:
    """What KubeRay's operator refuses in a RayCluster, RayJob or RayCronJob: 'file: Kind/name: what' each."""
    kind, name, spec = doc["kind"], doc["metadata"].get("name", ""), doc.get("spec") or {}
    if kind == "RayCluster":
        errors = name_errors(kind, name, MAX_RAYCLUSTER_NAME) + raycluster_spec_errors(spec)
    elif kind == "RayJob":
        errors = name_errors(kind, name, MAX_RAYJOB_NAME) + rayjob_spec_errors(spec)
    else:
        errors = name_errors(kind, name, MAX_RAYCRONJOB_NAME) + raycronjob_spec_errors(spec)
    return [f"{where}: {label(doc)}: {e}" for e in errors]


# ------------------------------------------------------------------------------------------ Kubernetes' kinds


def kubernetes_errors(doc: dict, where: str = "(test)") -> list[str]:
    """Where `doc` breaks Kubernetes' own (strict) schema in any of KUBERNETES_VERSIONS."""
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where}: {label(doc)}: {e.json_path}: {e.message} (Kubernetes {version})")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where}: {label(doc)}: Kubernetes {version} has no {doc['apiVersion']} {doc['kind']}")
    return errors


# ------------------------------------------------------------------------------------------ ray up's schema


@lru_cache(maxsize=1)
def ray_up_validator():
    ray_dir = Path(importlib.util.find_spec("ray").origin).parent  # without importing ray
    return jsonschema.Draft7Validator(json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))


def ray_up_errors(config: dict, where: str = "(test)") -> list[str]:
    """ray up's checks (ray.autoscaler._private.util.validate_config): its JSON schema, then the head node type
    exists and the node types' min_workers fit in max_workers."""
    errors = [f"{where}: {e.json_path}: {e.message}" for e in ray_up_validator().iter_errors(config)]
    types = config.get("available_node_types") or {}
    if types and config.get("head_node_type") not in types:
        errors.append(f"{where}: $.head_node_type: {config.get('head_node_type')!r} is not in available_node_types")
    if sum(t.get("min_workers", 0) for t in types.values()) > config.get("max_workers", 0):
        errors.append(f"{where}: $.max_workers: smaller than the node types' min_workers together")
    return errors


# ------------------------------------------------------------------------------------------ the manifests pass


def test_every_manifest_parses_and_the_expected_ones_are_there():
    kinds = {(where.split(" ")[0], doc.get("kind")) for where, doc in manifests()}
    for expected in [("kuberay/raycluster.yaml", "RayCluster"), ("kuberay/rayjob-align.yaml", "RayJob"),
                     ("kuberay/realign-cronjob.yaml", "CronJob"), ("kuberay/realign-cronjob.yaml", "RayJob"),
                     ("kuberay/realign-raycronjob.yaml", "RayCronJob"), ("ray-cluster.yaml", None),
                     ("runtime_env.yaml", None)]:
        assert (f"cluster/{expected[0]}", expected[1]) in kinds, f"missing {expected}"


def test_ray_documents_match_kuberays_crd_schemas():
    checked = [(where, doc) for where, doc in manifests() if doc.get("kind") in RAY_KINDS]
    assert len(checked) == 4  # RayCluster, the align RayJob, the CronJob's RayJob, the RayCronJob
    errors = [e for where, doc in checked for e in crd_errors(doc, where)]
    assert errors == [], "\n".join(errors)


def test_ray_documents_pass_kuberays_operator_rules():
    errors = [e for where, doc in manifests() if doc.get("kind") in RAY_KINDS for e in kuberay_errors(doc, where)]
    assert errors == [], "\n".join(errors)


def test_kubernetes_documents_match_kubernetes_schemas():
    checked = [(where, doc) for where, doc in manifests() if "apiVersion" in doc and doc["kind"] not in RAY_KINDS]
    assert {doc["kind"] for _, doc in checked} == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob",
                                                   "PersistentVolumeClaim"}
    errors = [e for where, doc in checked for e in kubernetes_errors(doc, where)]
    assert errors == [], "\n".join(errors)


def test_the_launcher_matches_ray_ups_schema():
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert ray_up_errors(launcher, "cluster/ray-cluster.yaml") == []


def test_cluster_selectors_name_the_raycluster_defined_here():
    clusters = {doc["metadata"]["name"] for _, doc in manifests() if doc.get("kind") == "RayCluster"}
    selected = [(where, s["ray.io/cluster"]) for where, doc in manifests() for s in walk(doc, "clusterSelector")]
    assert len(selected) == 2
    for where, name in selected:
        assert name in clusters, f"{where}: clusterSelector names {name!r}, not a RayCluster under cluster/"


def test_images_are_pinned_and_come_from_a_named_source():
    images = [(where, image) for where, doc in manifests() for image in walk(doc, "image")]
    for where, image in images:
        if image.startswith("<your-registry>/"):
            continue  # the project's image, built from cluster/Dockerfile
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{where}: image {image!r} has no version tag"
        assert "bitnami" not in image, f"{where}: {image}: Bitnami's images left docker.io/bitnami in 2025"
    others = {image for _, image in images if not image.startswith("<your-registry>/")}
    assert others == {"registry.k8s.io/kubectl:v1.36.0", "docker.io/library/busybox:1.37.0"}


# ------------------------------------------------------------------------------------------ each check can fail

GOOD_RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "realign-29000000"},
    "spec": {"entrypoint": "python jobs/realign.py", "clusterSelector": {"ray.io/cluster": "rpo-cluster"}},
}


def rayjob(**spec) -> dict:
    """GOOD_RAYJOB with spec fields changed (None removes one)."""
    doc = json.loads(json.dumps(GOOD_RAYJOB))
    for key, value in spec.items():
        if value is None:
            doc["spec"].pop(key, None)
        else:
            doc["spec"][key] = value
    return doc


def own_cluster(**head_pod) -> dict:
    """A small rayClusterSpec; head_pod adds fields to the head container."""
    return {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
        {"name": "ray-head", "image": "rayproject/ray:2.60.0", **head_pod}]}}}}


# The CronJob's RayJob as it was before KubeRay 1.4's rule was followed here: every scheduled run was refused.
OLD_SCHEDULED_RAYJOB = yaml.safe_load("""
apiVersion: ray.io/v1
kind: RayJob
metadata: {name: realign-29000000}
spec:
  jobId: realign-29000000
  clusterSelector: {ray.io/cluster: rpo-cluster}
  submissionMode: K8sJobMode
  entrypoint: python jobs/realign.py --config jobs/configs/realign_sdxl.yaml
  ttlSecondsAfterFinished: 86400
""")


def test_the_crd_check_accepts_a_good_rayjob_and_rejects_unknown_fields():
    assert crd_errors(GOOD_RAYJOB) == []
    typo = rayjob(shutdownAfterJobFinish=True)
    assert crd_errors(typo) == ["(test): RayJob/realign-29000000: $.spec: Additional properties are not allowed "
                                "('shutdownAfterJobFinish' was unexpected)"]
    deep = rayjob(clusterSelector=None, rayClusterSpec=own_cluster(imagePullPolicy="Always", imagee="x"))
    (error,) = crd_errors(deep, "cluster/x.yaml")
    assert error.startswith("cluster/x.yaml: RayJob/realign-29000000: $.spec.rayClusterSpec.headGroupSpec.template"
                            ".spec.containers[0]: ") and "'imagee' was unexpected" in error
    extra_meta = json.loads(json.dumps(GOOD_RAYJOB))
    extra_meta["metadata"]["nam"] = "x"
    assert "$.metadata" in crd_errors(extra_meta)[0]
    assert "apiVersion" in crd_errors({**GOOD_RAYJOB, "apiVersion": "ray.io/v1alpha1"})[0]


@pytest.mark.parametrize("quantity, ok", [("8", True), (8, True), ("900Gi", True), ("8 cores", False), ([8], False)])
def test_the_crd_check_knows_int_or_string(quantity, ok):
    cluster = own_cluster(resources={"limits": {"cpu": quantity}})
    assert (crd_errors(rayjob(clusterSelector=None, rayClusterSpec=cluster)) == []) == ok


def test_the_crd_check_refuses_duplicate_keys_of_a_map_list():
    cluster = own_cluster()
    containers = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    containers.append(dict(containers[0]))
    (error,) = crd_errors(rayjob(clusterSelector=None, rayClusterSpec=cluster))
    assert ".spec.containers: items 0 and 1 repeat ['name']" in error


def test_closed_follows_the_structural_schema_extensions():
    schema = {"type": "object", "properties": {
        "strict": {"type": "object", "properties": {"a": {"type": "string"}}},
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                 "properties": {"a": {"type": "string"}}},
        "empty": {"type": "object"},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"x-kubernetes-int-or-string": True},
        "maybe": {"type": "string", "nullable": True},
        "embedded": {"type": "object", "x-kubernetes-embedded-resource": True,
                     "properties": {"spec": {"type": "object"}}},
    }}
    validator = StrictCRDValidator(closed(schema))
    good = {"strict": {"a": "x"}, "open": {"a": "x", "b": 1}, "empty": {}, "map": {"k": "v"}, "port": 8080,
            "maybe": None, "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {}}}
    assert list(validator.iter_errors(good)) == []
    assert validator.is_valid({"port": "http"})
    for bad in [{"strict": {"b": 1}}, {"empty": {"x": 1}}, {"map": {"k": 1}}, {"port": 1.5}, {"port": None},
                {"embedded": {"kind": "Pod"}}, {"embedded": {"apiVersion": "v1", "kind": "Pod", "x": 1}},
                {"unknown": 1}]:
        assert not validator.is_valid(bad), bad


def test_the_rules_accept_the_modes_kuberay_allows():
    assert rayjob_spec_errors(GOOD_RAYJOB["spec"]) == []
    assert rayjob_spec_errors(rayjob(shutdownAfterJobFinishes=True, ttlSecondsAfterFinished=600)["spec"]) == []
    assert rayjob_spec_errors(rayjob(clusterSelector=None, rayClusterSpec=own_cluster(),
                                     submissionMode="SidecarMode")["spec"]) == []
    assert rayjob_spec_errors(rayjob(deletionStrategy={"deletionRules": [{"policy": "DeleteSelf"}]})["spec"]) == []


@pytest.mark.parametrize("spec, refused", [
    ({"ttlSecondsAfterFinished": 86400}, "ttlSecondsAfterFinished needs shutdownAfterJobFinishes"),
    ({"ttlSecondsAfterFinished": -1, "shutdownAfterJobFinishes": True}, "must not be negative"),
    ({"suspend": True}, "suspend needs shutdownAfterJobFinishes"),
    ({"suspend": True, "shutdownAfterJobFinishes": True}, "clusterSelector mode cannot be suspended"),
    ({"clusterSelector": None}, "one of rayClusterSpec or clusterSelector"),
    ({"clusterSelector": {"app": "x"}}, "ray.io/cluster"),
    ({"submissionMode": "SidecarMode"}, "not supported in SidecarMode"),
    ({"backoffLimit": 2}, "incompatible with clusterSelector"),
    ({"clusterSelector": None, "rayClusterSpec": own_cluster(), "submissionMode": "InteractiveMode",
      "backoffLimit": 1}, "incompatible with InteractiveMode"),
    ({"clusterSelector": None, "rayClusterSpec": own_cluster(), "submissionMode": "SidecarMode",
      "submitterPodTemplate": {}}, "does not support submitterPodTemplate"),
    ({"deletionStrategy": {"onSuccess": {"policy": "DeleteSelf"}}}, "both onSuccess and onFailure"),
    ({"deletionStrategy": {"deletionRules": [{}]}, "shutdownAfterJobFinishes": True}, "mutually exclusive"),
    ({"runtimeEnvYAML": "- a list"}, "not a YAML mapping"),
    ({"runtimeEnvYAML": "a: [b"}, "does not parse"),
    ({"activeDeadlineSeconds": 0}, "activeDeadlineSeconds must be positive"),
    ({"backoffLimit": -1}, "backoffLimit must not be negative"),
    ({"clusterSelector": None, "rayClusterSpec": {"headGroupSpec": {"template": {"spec": {"containers": []}}}}},
     "rayClusterSpec: headGroupSpec: the pod template has no container"),
    ({"clusterSelector": None, "rayClusterSpec": {**own_cluster(), "workerGroupSpecs": [
        {"groupName": "gpu", "template": {"spec": {"containers": [{"name": "w"}]}}}]}},
     "minReplicas and maxReplicas are both needed"),
    ({"clusterSelector": None, "rayClusterSpec": {**own_cluster(), "workerGroupSpecs": [
        {"groupName": "gpu", "minReplicas": 2, "maxReplicas": 1, "template": {"spec": {"containers": [{}]}}}]}},
     "minReplicas 2 > maxReplicas 1"),
    ({"clusterSelector": None, "rayClusterSpec": {**own_cluster(), "tlsOptions": {}}}, "RayClusterMTLS"),
])
def test_the_rules_refuse_what_kuberay_refuses(spec, refused):
    errors = rayjob_spec_errors(rayjob(**spec)["spec"])
    assert any(refused in e for e in errors), errors


def test_the_rules_refuse_the_old_scheduled_rayjob_and_names_kuberay_refuses():
    assert crd_errors(OLD_SCHEDULED_RAYJOB) == []  # the schema alone let it through
    assert kuberay_errors(OLD_SCHEDULED_RAYJOB, "cluster/kuberay/realign-cronjob.yaml") == [
        "cluster/kuberay/realign-cronjob.yaml: RayJob/realign-29000000: ttlSecondsAfterFinished needs "
        "shutdownAfterJobFinishes: true (KubeRay >= 1.4 refuses it)"]
    unfilled = {**GOOD_RAYJOB, "metadata": {"name": "SLOT_NAME"}}
    assert "not a DNS-1035 label" in kuberay_errors(unfilled)[0]
    long_name = {**GOOD_RAYJOB, "metadata": {"name": "r" * 48}}
    assert "longer than 47" in kuberay_errors(long_name)[0]


def test_the_raycronjob_rules_refuse_bad_schedules_zones_names_and_templates():
    good = {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": {"name": "rpo-realign"},
            "spec": {"schedule": "0 3 * * *", "timeZone": "Etc/UTC", "jobTemplate": GOOD_RAYJOB["spec"]}}
    assert kuberay_errors(good) == [] and crd_errors(good) == []
    for change, refused in [({"timeZone": "Mars/Olympus_Mons"}, "not a time zone"),
                            ({"schedule": "CRON_TZ=UTC 0 3 * * *"}, "use timeZone"),
                            ({"schedule": "0 3 * *"}, "schedule:"),
                            ({"jobTemplate": OLD_SCHEDULED_RAYJOB["spec"]}, "jobTemplate: ttlSecondsAfterFinished")]:
        errors = kuberay_errors({**good, "spec": {**good["spec"], **change}})
        assert any(refused in e for e in errors), (change, errors)
    assert "longer than 36" in kuberay_errors({**good, "metadata": {"name": "r" * 37}})[0]
    assert "'timezone' was unexpected" in crd_errors({**good, "spec": {**good["spec"], "timezone": "UTC"}})[0]


def test_the_kubernetes_check_rejects_unknown_fields_and_wrong_types():
    cron = json.loads(json.dumps(the("CronJob")))
    assert kubernetes_errors(cron) == []
    cron["spec"]["concurrency"] = "Forbid"
    assert "'concurrency' was unexpected" in kubernetes_errors(cron)[0]
    pod = json.loads(json.dumps(the("CronJob")))["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    pod["containers"][0]["args"] = "apply -f x"
    errors = kubernetes_errors({**the("CronJob"), "spec": {**the("CronJob")["spec"], "jobTemplate": {
        "spec": {"template": {"spec": pod}}}}})
    assert "$.spec.jobTemplate.spec.template.spec.containers[0].args" in errors[0]
    assert "Kubernetes 1.35" in kubernetes_errors({"apiVersion": "batch/v2", "kind": "CronJob",
                                                   "metadata": {"name": "x"}})[0]


def test_the_ray_up_check_rejects_unknown_keys_and_a_missing_head_type():
    launcher = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    assert ray_up_errors({**launcher, "max_worker": 8}) == [
        "(test): $: Additional properties are not allowed ('max_worker' was unexpected)"]
    assert "$.head_node_type" in ray_up_errors({**launcher, "head_node_type": "cpu_head"})[0]
    bad_resources = json.loads(json.dumps(launcher))
    bad_resources["available_node_types"]["head"]["resources"] = {"CPU": -1}
    assert "$.available_node_types.head.resources.CPU" in ray_up_errors(bad_resources)[0]
    too_many = json.loads(json.dumps(launcher))
    too_many["available_node_types"]["gpu_worker"]["min_workers"] = too_many["max_workers"] + 1
    assert ray_up_errors(too_many) == ["(test): $.max_workers: smaller than the node types' min_workers together"]


# ------------------------------------------------------------------------------------------ scheduling


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


def test_every_entry_point_and_config_exist():
    entrypoints = [(where, e) for where, doc in manifests() for e in walk(doc, "entrypoint")]
    assert len(entrypoints) >= 3  # the align RayJob, the CronJob's RayJob, the RayCronJob
    for where, command in entrypoints:
        check_command(command, where)
    scripts = {shlex.split(c)[1] for _, c in entrypoints}
    assert {"jobs/align.py", "jobs/realign.py"} <= scripts


def test_every_file_starts_with_a_command_that_works():
    for path in MANIFESTS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path}: the first line should be the command that uses it"
        for command in re.findall(r"python (jobs/\S+\.py --config \S+(?: --set \S+)*)", first):
            check_command(f"python {command}", f"{path} header")


def test_schedules_are_valid_cron_and_in_utc():
    schedules = [(where, doc["spec"]) for where, doc in manifests() if doc.get("kind") in ("CronJob", "RayCronJob")]
    assert len(schedules) == 2
    for where, spec in schedules:
        assert cron_errors(spec["schedule"]) == [], f"{where}: {cron_errors(spec['schedule'])}"
        assert spec["timeZone"] == "Etc/UTC", f"{where}: the schedule's time zone should be UTC, as documented"


def test_the_cronjob_renders_one_rayjob_per_slot(tmp_path):
    """Runs the CronJob's render step (its init container's script) for a sample Job name, then checks what the
    kubectl step would apply: the slot's RayJob, named and submitted as the slot."""
    cron, config_map = the("CronJob"), the("ConfigMap", "rpo-realign-rayjob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (render,), (submit,) = pod["initContainers"], pod["containers"]
    assert render["command"] == ["/bin/sh", "-ec"]
    (script,) = render["args"]
    (tmp_path / "template").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "template" / "rayjob.yaml").write_text(config_map["data"]["rayjob.yaml"])
    script = script.replace("/template/", f"{tmp_path}/template/").replace("/work/", f"{tmp_path}/work/")
    subprocess.run(["sh", "-ec", script], check=True, env={"CRON_JOB_NAME": SAMPLE_JOB_NAME, "PATH": "/usr/bin:/bin"},
                   capture_output=True)
    rendered = yaml.safe_load((tmp_path / "work" / "rayjob.yaml").read_text())
    assert rendered["metadata"]["name"] == rendered["spec"]["jobId"] == SAMPLE_SLOT
    assert rendered == the("RayJob", SAMPLE_SLOT)  # what the schema and rule tests checked
    # The kubectl step applies exactly that file; the Role lets it (server-side apply creates through PATCH).
    assert submit["image"].startswith("registry.k8s.io/kubectl:")
    assert submit["args"][:2] == ["apply", "--server-side"] and submit["args"][-2:] == ["-f", "/work/rayjob.yaml"]
    assert [m["name"] for m in submit["volumeMounts"]] == ["work"]
    assert "work" in {m["name"] for m in render["volumeMounts"]}
    (rule,) = the("Role")["rules"]
    assert rule["resources"] == ["rayjobs"] and {"create", "get", "patch"} <= set(rule["verbs"])
    assert pod["serviceAccountName"] == the("ServiceAccount")["metadata"]["name"]


def test_overlap_is_left_to_the_registry_lock():
    """concurrencyPolicy: Forbid cannot keep runs apart (the CronJob's Job ends right after kubectl): the files must
    not claim it does, and must name the registry lock, which jobs/realign.py takes."""
    for path in (CLUSTER / "kuberay" / "realign-cronjob.yaml", CLUSTER / "kuberay" / "realign-raycronjob.yaml"):
        text = path.read_text()
        assert "Registry.lock" in text and "only overlap guard" in text, f"{path}: name the registry lock"
        assert "skips a slot while the previous one still runs" not in text, f"{path}: Forbid does no such thing"
    realign = (ROOT / "pipeline" / "realign.py").read_text()
    assert ".lock(" in realign, "pipeline/realign.py no longer takes the registry lock the manifests rely on"


# ------------------------------------------------------------------------------------------ exposure and launcher


def test_the_dashboard_is_not_exposed_outside_the_cluster():
    for where, doc in manifests():
        for service_type in walk(doc, "serviceType"):
            assert service_type == "ClusterIP", f"{where}: serviceType {service_type}"
        if doc.get("kind") in ("Ingress", "Service"):
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP", f"{where}: {label(doc)}"
        assert True not in list(walk(doc, "enableIngress")), f"{where}: enableIngress"
        if doc.get("kind") in ("RayCluster", "RayJob"):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            if "headGroupSpec" in spec:
                assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", f"{where}: head service must be ClusterIP"
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
