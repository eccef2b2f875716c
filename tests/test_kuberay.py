"""clusters/kuberay: every manifest against KubeRay's CRD schemas (v1.7.0, ../shared/peers) and
the Kubernetes core schemas (kubernetes-validate, offline), KubeRay's webhook rules, token auth
through authOptions, and the RayJob/RayCronJob entrypoints replayed through KubeRay's submitter
command line with a recording `ray`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from kuberay import SUBMITTER_COMMAND, crd_schema, submitter_args, webhook_errors

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "clusters" / "kuberay"
CACHE_MOUNT = "/mnt/loadgraph"
CACHE_PATH = "/mnt/loadgraph/cache"
K8S_VERSION = "1.31.0"  # the oldest Kubernetes the manifests are checked against (CronJob timeZone, sidecars...)
RAY_KINDS = ("RayCluster", "RayJob", "RayCronJob")
RAY_TOKEN_SECRET = "loadgraph-ray-token"


def _manifests() -> dict[str, list[dict]]:
    docs: dict[str, list[dict]] = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def _job_specs(docs: dict[str, list[dict]]) -> list[dict]:
    return [d["spec"] for d in docs["RayJob"]] + [d["spec"]["jobTemplate"] for d in docs["RayCronJob"]]


def _cluster_specs(docs: dict[str, list[dict]]) -> list[dict]:
    return [d["spec"] for d in docs["RayCluster"]] + [j["rayClusterSpec"] for j in _job_specs(docs) if "rayClusterSpec" in j]


def _pod_templates(spec: dict) -> list[dict]:
    return [g["template"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]


def _schema_errors(doc: dict) -> list[str]:
    """CRD schema (strict) for Ray kinds, plus every embedded pod template and all core objects
    against Kubernetes' own schemas (strict: unknown fields fail)."""
    errors = []
    if doc["kind"] in RAY_KINDS:
        errors += [f"{doc['kind']}: {e.json_path}: {e.message}" for e in jsonschema.Draft7Validator(crd_schema(doc["kind"])).iter_errors(doc)]
        specs = [doc["spec"], doc["spec"].get("jobTemplate", {})]
        templates = [t for s in specs for c in [s.get("rayClusterSpec", s)] if "headGroupSpec" in c for t in _pod_templates(c)]
        objects = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": doc["metadata"]["name"]}, "template": t} for t in templates]
        objects += [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}]  # ObjectMeta, through a kind that has one
    else:
        objects = [doc]
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']} {doc['metadata']['name']}: {exc.path}: {exc.message}")
    return errors


def test_every_manifest_passes_the_crd_and_core_schemas_and_kuberays_webhook():
    docs = _manifests()
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "PersistentVolumeClaim", "ConfigMap"} <= set(docs)
    problems = [e for kind in docs for doc in docs[kind] for e in _schema_errors(doc) + webhook_errors(doc)]
    assert problems == []
    # The checks themselves catch what they are for: a misspelt field KubeRay would prune, a
    # misspelt pod field, and a retried RayJob on a selected cluster.
    (cluster,) = docs["RayCluster"]
    typo = {**cluster, "spec": {**cluster["spec"], "authOption": cluster["spec"]["authOptions"]}}
    assert any("authOption" in e for e in _schema_errors(typo))
    pod = json.loads(json.dumps(cluster))
    pod["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrm"] = {}
    assert any("valueFrm" in e for e in _schema_errors(pod))
    selected = next(d for d in docs["RayJob"] if "clusterSelector" in d["spec"])
    assert any("backoffLimit" in e for e in webhook_errors({**selected, "spec": {**selected["spec"], "backoffLimit": 1}}))


def test_every_cluster_spec_uses_kuberay_token_auth_and_mounts_one_cache():
    docs = _manifests()
    (pvc,) = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert len(_cluster_specs(docs)) == 3
    for spec in _cluster_specs(docs):
        # KubeRay injects the token into the Ray containers, the autoscaler and the submitter, and
        # uses it for its own job API calls, only when the spec says so.
        assert spec["authOptions"] == {"mode": "token", "secretName": RAY_TOKEN_SECRET}
        assert spec["rayVersion"] == ray.__version__
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"] for g in spec["workerGroupSpecs"])
        for template in _pod_templates(spec):
            pod = template["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            for c in pod["containers"]:
                assert c["image"].endswith(":0.1.0")
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                cache_volume = next(name for name, path in mounts.items() if path == CACHE_MOUNT)
                assert claims[cache_volume] == pvc["metadata"]["name"]
                env = {e["name"]: e for e in c["env"]}
                assert env["LOADGRAPH_CACHE"]["value"] == CACHE_PATH
                assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(env)  # the operator's job, from the secret
                # The nightly spec names a gated repo: the hub token comes from a secret, not from git.
                assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "loadgraph-hf-token", "key": "token"}
    # The plain CronJob is no Ray pod: it reads the same secret itself (KubeRay's key name).
    (plain,) = docs["CronJob"]
    env = {e["name"]: e for e in plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": RAY_TOKEN_SECRET, "key": "auth_token"}


def test_kuberay_jobs_build_specs_that_parse():
    from loadgraph.spec import parse_spec

    docs = _manifests()
    (config_map,) = docs["ConfigMap"]
    specs = {f"/etc/loadgraph/specs/{name}": yaml.safe_load(text) for name, text in config_map["data"].items()}
    for job in _job_specs(docs):
        argv = shlex.split(job["entrypoint"])
        assert argv[:2] == ["loadgraph", "build"]
        targets = parse_spec(specs[argv[2]], argv[2])
        assert len(targets) == 4 and len({t.export.path for t in targets}) == 4
        assert Path(argv[argv.index("--json") + 1]).parent == Path(CACHE_MOUNT)  # a directory that exists: the volume's root
    (plain,) = docs["CronJob"]
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    command = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["loadgraph", "submit"] and "--wait" in command
    assert f"/etc/loadgraph/specs/{command[2]}" in specs
    (cluster,) = docs["RayCluster"]
    assert command[command.index("--address") + 1] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    selected = [j for j in _job_specs(docs) if "clusterSelector" in j]
    assert [j["clusterSelector"]["ray.io/cluster"] for j in selected] == [cluster["metadata"]["name"]]


# -- KubeRay's submitter command line, replayed -----------------------------------------------

# Ray's own `ray job submit` parses the line (click, then shlex.join of the entrypoint words,
# ray/dashboard/modules/job/cli.py); only its HTTP client is replaced by one that records.
FAKE_RAY = """#!{python}
import json, os, sys
args = sys.argv[1:]
def record(**doc):
    with open(os.environ["REPLAY_LOG"], "a") as f:
        f.write(json.dumps(doc) + "\\n")
record(program="ray", argv=args)
if args[:2] == ["job", "status"]:
    sys.exit(1)  # no job with this id yet: the submitter goes on to submit
if args[:2] == ["job", "submit"]:
    import ray.dashboard.modules.job.cli as cli
    class Client:
        def submit_job(self, **kw):
            record(program="job-api", submitted=kw["entrypoint"], submission_id=kw["submission_id"])
            return kw["submission_id"]
        def get_version(self):
            return "1"
    cli._get_sdk_client = lambda *a, **k: Client()
    cli.submit.main(args[2:], prog_name="ray job submit", standalone_mode=False)
"""
# Anything else the submitter pod would run by itself (it mounts neither specs nor cache).
FAKE_TOOL = """#!/bin/sh
printf '{{"program": "{name}", "argv": "%s"}}\\n' "$*" >> "$REPLAY_LOG"
"""


@pytest.fixture
def replay(tmp_path):
    """Run KubeRay's submitter script for an entrypoint with recording `ray`, `loadgraph`, `mkdir`;
    returns (exit code, records)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY.format(python=sys.executable))
    for name in ("loadgraph", "mkdir"):
        (bin_dir / name).write_text(FAKE_TOOL.format(name=name))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "replay.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "REPLAY_LOG": str(log)}

    def run(argv: list[str]) -> tuple[int, list[dict]]:
        log.write_text("")
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        return proc.returncode, [json.loads(line) for line in log.read_text().splitlines()]

    return run


def _submitter_replay(replay, job: dict) -> tuple[int, list[dict], str]:
    script = submitter_args(job, "loadgraph-build-raycluster-abcde-head-svc.default.svc.cluster.local:8265", "loadgraph-build-x7k2p", "true")
    code, records = replay([*SUBMITTER_COMMAND, script])
    return code, records, script


def test_kuberay_submitter_hands_each_whole_entrypoint_to_ray_as_one_job(replay):
    jobs = _job_specs(_manifests())
    assert len(jobs) == 3
    for job in jobs:
        code, records, script = _submitter_replay(replay, job)
        assert code == 0, (script, records)
        # In the submitter pod: status (absent), submit, follow the logs; nothing else runs there.
        assert [r["argv"][:2] for r in records if r["program"] == "ray"] == [["job", "status"], ["job", "submit"], ["job", "logs"]]
        assert not [r for r in records if r["program"] in ("loadgraph", "mkdir")], script
        (submitted,) = [r["submitted"] for r in records if r["program"] == "job-api"]
        assert shlex.split(submitted) == shlex.split(job["entrypoint"])
        # And on the cluster, the job's shell runs that one command with every argument.
        code, ran = replay(["/bin/sh", "-c", submitted])
        assert code == 0 and [r["program"] for r in ran] == ["loadgraph"]
        assert ran[0]["argv"] == " ".join(shlex.split(job["entrypoint"])[1:])


def test_the_replay_catches_an_entrypoint_with_shell_operators(replay):
    """The defect this guards against: `a && b` gives Ray only `a` and runs `b` in the submitter."""
    old = {"entrypoint": "mkdir -p /mnt/loadgraph/reports && loadgraph build /etc/loadgraph/specs/nightly.yaml --json /mnt/loadgraph/reports/x.json"}
    code, records, _ = _submitter_replay(replay, old)
    assert [r["submitted"] for r in records if r["program"] == "job-api"] == ["mkdir -p /mnt/loadgraph/reports"]
    assert [r["argv"] for r in records if r["program"] == "loadgraph"] == ["build /etc/loadgraph/specs/nightly.yaml --json /mnt/loadgraph/reports/x.json"]
