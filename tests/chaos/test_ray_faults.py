"""A Ray worker process SIGKILLed in the middle of a unit: Ray retries the unit (max_retries) and
the build exports the same bytes as the uninterrupted local build. A whole node removed
mid-build is tests/test_ray_cluster.py::test_node_killed_mid_build_still_builds_the_same_bytes
(same simulated cluster, shared per session); it is not repeated here."""

from __future__ import annotations

import os
import signal
import threading
import time

from chaoslib import TALLY, corrupt_entries, same_files, workload  # noqa: F401
from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.executors.ray import RayExecutor
from loadgraph.pipeline.graph import compile_specs
from loadgraph.pipeline.runner import build
from loadgraph.spec import load_spec_files


def test_worker_killed_mid_unit_is_retried_to_identical_output(ray_cluster, workload, tmp_path):
    spec = workload.spec(tmp_path)
    starts = tmp_path / "starts.log"
    starts.touch()
    env = {"env_vars": {"LOADGRAPH_FAULT": "slow-units:0.1", "LOADGRAPH_FAULT_LOG": str(starts)}}
    killed: list[str] = []
    done = threading.Event()

    def kill_a_busy_worker() -> None:
        # A unit logs "<node> <unit> <pid>" as it starts, then sleeps: kill the 8th one to start.
        while not done.is_set():
            lines = starts.read_text().splitlines()
            if len(lines) >= 8:
                _, unit, pid = lines[7].split()
                os.kill(int(pid), signal.SIGKILL)
                killed.append(unit)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    cache = Cache(tmp_path / "cache")
    try:
        report = build(compile_specs(load_spec_files([spec]), cache), cache, lambda: RayExecutor(runtime_env=env))
    finally:
        done.set()
        killer.join()
    TALLY.add("Ray worker killed mid-unit", faults=1, runs=1, failed_runs=int(not report.ok))
    assert report.ok and killed
    # One more unit start than there are units: the killed one ran again (Ray's retry).
    assert len(starts.read_text().splitlines()) > workload.total_units
    lost = same_files(tmp_path / "out", workload.ref_out) + corrupt_entries(cache.root)
    TALLY.add("Ray worker killed mid-unit", lost=len(lost))
    assert not lost
