"""clusters/: the `ray up` YAML against Ray's own schema, and a real local head
(clusters/local/cluster.py) taking `ray job submit` and `loadgraph submit`. The KubeRay manifests: test_kuberay.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import ray
import torch
import yaml

from conftest import run_cli, write_spec

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
CACHE_MOUNT = "/mnt/loadgraph"
CACHE_PATH = "/mnt/loadgraph/cache"


# -- `ray up` ----------------------------------------------------------------------------------


def test_ray_up_yaml_validates_against_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTERS / "aws" / "loadgraph-gpu.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the file as written
    validate_config(prepare_config(config))  # and as `ray up` sees it, defaults merged
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    types = config["available_node_types"]
    gpu_types = [t for t, v in types.items() if v["node_config"]["InstanceType"].startswith(("g5", "g6", "p4", "p5"))]
    assert gpu_types and any(types[t].get("min_workers", 0) >= 1 for t in gpu_types)
    for name, node_type in types.items():
        # Node-type commands replace the global list: each type must mount the cache itself.
        commands = " ".join(node_type.get("initialization_commands", config["initialization_commands"]))
        assert f"{CACHE_MOUNT}" in commands and "mount" in commands, name
    run = " ".join(config["docker"]["run_options"])
    assert f"--volume {CACHE_MOUNT}:{CACHE_MOUNT}" in run and f"LOADGRAPH_CACHE={CACHE_PATH}" in run
    assert "--num-cpus=0" in " ".join(config["head_start_ray_commands"]) and types[config["head_node_type"]]["resources"] == {"CPU": 0}


# -- a real local head -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_cluster():
    """clusters/local/cluster.py: a head and one worker, explicit ports, stopped by PID."""
    state_dir = Path(tempfile.mkdtemp(prefix="lgr-", dir="/tmp"))  # short: Ray's socket paths are length-limited
    script = CLUSTERS / "local" / "cluster.py"
    up = subprocess.run([sys.executable, script, "up", "--dir", state_dir, "--workers", "1"], capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, up.stderr
        state = json.loads((state_dir / "cluster.json").read_text())
        # Every node its own temp dir (and session in it): a shared one lets one node's runtime-env
        # agent delete a job's unpacked working dir under another node's workers.
        temp_dirs = [Path(n["temp_dir"]) for n in state["nodes"]]
        assert len(set(temp_dirs)) == len(state["nodes"]) == 2
        assert all((t / "session_latest").is_dir() for t in temp_dirs)
        yield state
    finally:
        subprocess.run([sys.executable, script, "down", "--dir", state_dir], capture_output=True, timeout=120)
        shutil.rmtree(state_dir, ignore_errors=True)
    for node in state["nodes"]:
        assert not Path(f"/proc/{node['pid']}").exists() or "Z" in Path(f"/proc/{node['pid']}/stat").read_text().split()[2]


def _logits(model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 19)[None]).logits


def _cli_started(*args: str, timeout: float = 240) -> Callable[[], subprocess.CompletedProcess]:
    """`loadgraph ARGS` started now; call the result to wait for it (independent submissions run
    side by side: each is mostly waiting on the job API)."""
    cmd = [sys.executable, "-m", "loadgraph.cli", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})

    def result() -> subprocess.CompletedProcess:
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    return result


def test_ray_job_submit_and_loadgraph_submit_on_a_real_head(local_cluster, models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models("llama"), base)  # changed in place below, as a retrained checkpoint is
    cache = tmp_path / "cache"
    work = tmp_path / "job"
    work.mkdir()
    dashboard = local_cluster["dashboard"]
    # Started first, they run beside the main sequence (their inputs never change):
    # bad input found by the plan on the cluster: exit 2 naming it, no build submitted; and a build
    # that fails on the cluster after planning (its export path holds someone's files): exit 1.
    write_spec(work / "bad.yaml", {"source": {"model": str(tmp_path / "not-there")}, "export": {"path": str(tmp_path / "bad-out")}})
    bad = _cli_started("submit", work / "bad.yaml", "--address", dashboard, "--working-dir", work, "--cache", cache)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("not a model")
    write_spec(work / "clobber.yaml", {"source": {"model": str(models("llama"))}, "verify": False, "export": {"path": str(tmp_path / "foreign")}})
    clobber = ["submit", work / "clobber.yaml", "--address", dashboard, "--working-dir", work, "--cache", cache]
    failed = _cli_started(*clobber, "--wait")

    # `ray job submit` of a build, beside `loadgraph submit` of another export (its own export node) of the same model
    # twice at once (a scheduler that fires twice), one with --wait: both plan on the cluster,
    # derive one id, one job runs and the other submitter attaches to it; --wait streams its logs.
    write_spec(work / "raw.yaml", {"source": {"model": str(base)}, "verify": False, "export": {"path": str(tmp_path / "raw-out"), "max_shard_size": "48KB"}})
    ray_cli = Path(sys.executable).parent / "ray"
    job = subprocess.Popen([ray_cli, "job", "submit", "--address", dashboard, "--working-dir", ".", "--", "loadgraph", "build", "raw.yaml", "--cache", cache],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    write_spec(work / "spec.yaml", {"source": {"model": str(base)}, "verify": False, "export": {"path": str(tmp_path / "out"), "max_shard_size": "64KB"}})
    args = ["submit", work / "spec.yaml", "--address", dashboard, "--working-dir", work, "--cache", cache]
    first, again = _cli_started(*args, "--wait"), _cli_started(*args)
    job_output = job.communicate(timeout=240)[0]
    assert job.returncode == 0 and "succeeded" in job_output and "(ray executor)" in job_output, job_output
    assert torch.equal(_logits(tmp_path / "raw-out"), _logits(base))

    # The failed one's next submission gets a fresh id.
    failed = failed()
    assert failed.returncode == 1 and "not a loadgraph export" in failed.stderr and "FAILED" in failed.stderr, failed.stderr
    retry = _cli_started(*clobber)

    first, again = first(), again()
    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    sid = first.stdout.strip()
    assert re.fullmatch(r"loadgraph-\d{8}-[0-9a-f]{16}", sid) and again.stdout.strip() == sid
    assert "SUCCEEDED" in first.stderr, first.stderr
    verbs = sorted("submitted" if f"submitted {sid}" in r.stderr else "attached" if "attached to" in r.stderr else "?" for r in (first, again))
    assert verbs == ["attached", "submitted"], first.stderr + again.stderr
    assert torch.equal(_logits(tmp_path / "out"), _logits(base))

    # The input changes in place (same path, same spec text): a new content key, so a new job,
    # followed with --wait through a proxy that drops the log stream twice while the job runs.
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "loadgraph_test_retrained": 1}))
    changed, cuts = _submit_wait_through_dropping_proxy(dashboard, work / "spec.yaml", work, cache)
    assert cuts == 2 and changed.returncode == 0 and "SUCCEEDED" in changed.stderr, changed.stderr
    assert changed.stderr.count("(ray executor)") == 1, changed.stderr  # re-attached: nothing shown twice
    assert changed.stdout.strip() != sid and f"submitted {changed.stdout.strip()}" in changed.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["loadgraph_test_retrained"] == 1

    bad = bad()
    assert bad.returncode == 2 and "not-there" in bad.stderr and "planning on the cluster failed" in bad.stderr, bad.stderr
    assert bad.stdout.strip() == ""
    retry = retry()
    assert retry.returncode == 0 and retry.stdout.strip() == f"{failed.stdout.strip()}-r2"
    from ray.job_submission import JobSubmissionClient

    JobSubmissionClient(dashboard).stop_job(retry.stdout.strip())  # it would fail like the first: spare the CPU
    elsewhere = write_spec(tmp_path / "elsewhere.yaml", {"source": {"model": str(base)}})
    outside = run_cli("submit", elsewhere, "--address", dashboard, "--working-dir", work)
    assert outside.returncode == 2 and "not inside the working directory" in outside.stderr


class CuttingProxy:
    """127.0.0.1:port forwarding to the dashboard; cut() drops every open connection, as a lost
    port-forward or a restarted ingress does to a log stream."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.open: list[socket.socket] = []
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        for s in self.open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.open = []
        self.cuts += 1

    def close(self) -> None:
        self.server.close()
        for s in self.open:
            with contextlib.suppress(OSError):
                s.close()


def _submit_wait_through_dropping_proxy(dashboard: str, spec: Path, work: Path, cache: Path) -> tuple[subprocess.CompletedProcess, int]:
    """`loadgraph submit --wait` through a CuttingProxy, cut twice a second apart once the build
    job is running (its units slowed down so that it runs for a few seconds)."""
    from ray.job_submission import JobSubmissionClient

    proxy = CuttingProxy(dashboard)
    client = JobSubmissionClient(dashboard)
    cmd = [sys.executable, "-m", "loadgraph.cli", "submit", spec, "--address", f"http://127.0.0.1:{proxy.port}", "--working-dir", work,
           "--cache", cache, "--env", "LOADGRAPH_FAULT=slow-units:0.3", "--wait"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proxy.cuts < 2 and proc.poll() is None:
            running = [j for j in client.list_jobs() if j.entrypoint.startswith("loadgraph build") and j.status == "RUNNING"
                       and (j.runtime_env or {}).get("env_vars", {}).get("LOADGRAPH_FAULT")]
            if running and "building" in client.get_job_logs(running[0].submission_id):
                time.sleep(1.0)
                proxy.cut()
            time.sleep(0.2)
        cuts = proxy.cuts
        out, err = proc.communicate(timeout=300)
    finally:
        proxy.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), cuts
