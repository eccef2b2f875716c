"""Issue 18, Ray faults: the driver SIGKILLed mid-build (its in-flight units are never published:
workers check the driver's lease), and a full disk under Ray (the same one line as locally,
not retried, no staging dirs left). Shares the session's simulated cluster (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chaoslib import TALLY, corrupt_entries, workload  # noqa: F401
from loadgraph.errors import BuildError
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.executors.ray import RayExecutor
from loadgraph.pipeline.graph import compile_specs
from loadgraph.pipeline.runner import build
from loadgraph.spec import load_spec_files

ROW = "Ray driver killed / disk full under Ray"
ROOT = Path(__file__).resolve().parents[2]
DRIVER = """
import sys
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.executors.ray import RayExecutor
from loadgraph.pipeline.graph import compile_specs
from loadgraph.pipeline.runner import build
from loadgraph.spec import load_spec_files

spec, cache_root, address, log = sys.argv[1:]
cache = Cache(cache_root)
env = {"env_vars": {"LOADGRAPH_FAULT": "slow-units:1.5", "LOADGRAPH_FAULT_LOG": log}}
build(compile_specs(load_spec_files([spec]), cache), cache, lambda: RayExecutor(address=address, runtime_env=env))
"""


def _published_units(cache_root: Path) -> dict[str, float]:
    return {str(p.parent): p.stat().st_mtime for p in (cache_root / "units").glob("*/*/unit.json")}


def test_units_of_a_killed_driver_are_never_published(ray_cluster, workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache_root, log = tmp_path / "cache", tmp_path / "starts.log"
    log.touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_cluster.address}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(spec), str(cache_root), ray_cluster.address, str(log)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(log.read_text().splitlines()) < 4:  # units in flight on the cluster
        assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before any unit started"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()  # reaped: a zombie would still answer kill(pid, 0)
    killed_at = time.time()
    TALLY.add(ROW, faults=1, runs=1, failed_runs=1)
    time.sleep(5)  # in-flight units sleep 1.5 s, then would publish; the watch ends them within ~2 s
    late = [u for u, t in _published_units(cache_root).items() if t > killed_at + 0.5]
    assert not late, late
    workers = {int(line.split()[2]) for line in log.read_text().splitlines()}
    started_after = len(log.read_text().splitlines())
    time.sleep(2)
    assert len(log.read_text().splitlines()) == started_after  # nothing new is started for a dead driver
    # The staging dirs of the ended units are a dead owner's: gc removes them.
    Cache(cache_root).gc(10**12, min_tmp_age_s=10**9)
    assert not [p for p in (cache_root / "tmp").iterdir()]
    assert workers
    TALLY.add(ROW, lost=len(corrupt_entries(cache_root)))
    assert not corrupt_entries(cache_root)


def test_disk_full_under_ray_is_the_local_one_line_and_leaves_no_staging(ray_cluster, workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache = Cache(tmp_path / "cache")
    env = {"env_vars": {"LOADGRAPH_FAULT": "enospc-after-bytes:1"}}
    graph = compile_specs(load_spec_files([spec]), cache)
    with pytest.raises(BuildError) as info:
        build(graph, cache, lambda: RayExecutor(address=ray_cluster.address, runtime_env=env))
    TALLY.add(ROW, faults=1, runs=1, failed_runs=1)
    message = str(info.value)
    assert message.startswith(f"no space left on the device of the cache {cache.root} while building ") and "\n" not in message
    assert not list((cache.root / "tmp").iterdir())
    assert not corrupt_entries(cache.root)
