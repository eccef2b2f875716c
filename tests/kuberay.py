"""What KubeRay (v1.7) does with our manifests, as far as the tests need it, taken from its source:

- `submitter_args`: the submitter's command line, as `BuildJobSubmitCommand` (ray-operator
  controllers/ray/common/job.go) builds it for the default K8sJobMode, joined with spaces and run
  as `/bin/bash -ce -- <args>` (`configureSubmitterContainer` in rayjob_controller.go).
- `webhook_errors`: the rules of `ValidateRayClusterSpec` / `ValidateRayJobSpec` /
  `ValidateRayCronJobSpec` (controllers/ray/utils/validation.go) that our manifests could trip.
- `crd_schema`: the openAPIV3Schema of a CRD in ../shared/peers/kuberay-crds, made strict where the
  API server would prune: an unknown field there is silently dropped, which hides typos.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import yaml

SUBMITTER_COMMAND = ["/bin/bash", "-ce", "--"]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # MaxRayClusterNameLength, MaxRayJobNameLength (utils/constant.go)
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def crds_dir() -> Path:
    """The CRDs in the shared/ folder beside the checkout (or above it)."""
    for base in Path(__file__).resolve().parents:
        if (candidate := base / "shared" / "peers" / "kuberay-crds").is_dir():
            return candidate
    raise FileNotFoundError("shared/peers/kuberay-crds not found beside the checkout")


def submitter_args(job_spec: dict, dashboard_url: str, job_id: str, health_command: str) -> str:
    """The one bash script KubeRay's submitter pod runs (K8sJobMode). `health_command` stands for
    KubeRay's Python one-liner that polls the dashboard's GCS health endpoint (not under test)."""
    address = dashboard_url if dashboard_url.startswith("http://") else f"http://{dashboard_url}"
    entrypoint = job_spec["entrypoint"].strip()
    cmd = ["until", health_command, ">/dev/null", "2>&1", ";",
           "do", "echo", f'"Waiting for Ray Dashboard GCS to become healthy at {address} ..."', ";", "sleep", "2", ";", "done", ";"]
    cmd += ["if", "!", "ray", "job", "status", "--address", address, job_id, ">/dev/null", "2>&1", ";", "then"]
    cmd += ["ray", "job", "submit", "--address", address, "--no-wait"]
    if job_spec.get("runtimeEnvYAML") or job_spec.get("metadata"):
        raise NotImplementedError("runtimeEnvYAML / metadata: quoted by Go's strconv.Quote; add it here when a manifest uses them")
    cmd += ["--submission-id", job_id]
    for field, flag in (("entrypointNumCpus", "--entrypoint-num-cpus"), ("entrypointNumGpus", "--entrypoint-num-gpus")):
        if job_spec.get(field, 0) > 0:
            cmd += [flag, f"{float(job_spec[field]):f}"]
    cmd += ["--", entrypoint, ";", "fi", ";", "ray", "job", "logs", "--address", address, "--follow", job_id]
    return " ".join(cmd)


def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    return bool(parts) and parts >= minimum


def _cluster_spec_errors(spec: dict) -> list[str]:
    errors = []
    groups = [("Head", spec["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{name}: group should have at least one container")
        params = group.get("rayStartParams", {})
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{name}: resource fields set in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{name}: rayStartParams['labels'] is not supported")
    auth = spec.get("authOptions") or {}
    if auth.get("mode") == "token" and not _version_at_least(str(spec.get("rayVersion", "")), (2, 52, 0)):
        errors.append("authOptions.mode is 'token' but rayVersion is not >= 2.52.0")
    return errors


def _job_spec_errors(job: dict) -> list[str]:
    errors = []
    selector = job.get("clusterSelector") or {}
    mode = job.get("submissionMode", "K8sJobMode")
    if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
        errors.append("suspend needs shutdownAfterJobFinishes")
    if job.get("ttlSecondsAfterFinished", 0) < 0:
        errors.append("ttlSecondsAfterFinished must be non-negative")
    if not job.get("shutdownAfterJobFinishes") and job.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if not job.get("rayClusterSpec") and not selector:
        errors.append("one of rayClusterSpec or clusterSelector must be set")
    if selector:
        if not selector.get("ray.io/cluster"):
            errors.append("clusterSelector needs ray.io/cluster")
        if mode == "SidecarMode":
            errors.append("clusterSelector is not supported in SidecarMode")
        if job.get("suspend"):
            errors.append("clusterSelector does not support suspend")
        # ray-project/kuberay#4527: a retry would delete the selected cluster, which the job does not own.
        if job.get("backoffLimit", 0) > 0:
            errors.append("backoffLimit > 0 is not allowed with clusterSelector")
    if mode == "InteractiveMode" and job.get("backoffLimit", 0) > 0:
        errors.append("backoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode" and (job.get("submitterPodTemplate") or job.get("submitterConfig")):
        errors.append("SidecarMode supports neither submitterPodTemplate nor submitterConfig")
    if "activeDeadlineSeconds" in job and job["activeDeadlineSeconds"] <= 0:
        errors.append("activeDeadlineSeconds must be positive")
    if job.get("backoffLimit", 0) < 0:
        errors.append("backoffLimit must be non-negative")
    if job.get("rayClusterSpec"):
        errors += _cluster_spec_errors(job["rayClusterSpec"])
    return errors


def webhook_errors(doc: dict) -> list[str]:
    """What KubeRay's validation would reject in one RayCluster / RayJob / RayCronJob document."""
    kind, name = doc["kind"], doc["metadata"]["name"]
    errors = []
    if not DNS1035.fullmatch(name) or len(name) > MAX_NAME.get(kind, 63):
        errors.append(f"name {name!r} is not a DNS-1035 label of at most {MAX_NAME.get(kind, 63)} characters")
    if kind == "RayCluster":
        errors += _cluster_spec_errors(doc["spec"])
    elif kind == "RayJob":
        errors += _job_spec_errors(doc["spec"])
    elif kind == "RayCronJob":
        if len(doc["spec"].get("schedule", "").split()) != 5:  # cron.ParseStandard: five fields
            errors.append("schedule is not a standard five-field cron expression")
        errors += [f"jobTemplate: {e}" for e in _job_spec_errors(doc["spec"].get("jobTemplate") or {})]
    return [f"{kind} {name}: {e}" for e in errors]


def _strict(schema: object) -> object:
    """Unknown fields fail where the API server would prune them (no preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    crd = yaml.load((crds_dir() / CRD_FILES[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 3 MB of YAML
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta separately
    return schema
