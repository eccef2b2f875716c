"""kill -9 of `loadgraph build --executor local` at seeded random points of a merge + quantize
(bnb-nf4) + export build: every rerun finishes, reuses the units the killed run had published,
computes only the rest, and exports bytes identical to an uninterrupted build; the cache
verifies clean. Ray's node and worker deaths: test_ray_faults.py and tests/test_ray_cluster.py."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from chaoslib import TALLY, cli, corrupt_entries, kill_points, report_nodes, same_files, unit_log, workload  # noqa: F401

K = int(os.environ.get("LOADGRAPH_CHAOS_KILLS", "20"))


def test_kill_points_cover_the_build(workload):
    points = kill_points(workload.total_units, K)
    assert len(points) == K and workload.total_units >= 40
    # Both modes, spread over the build (fetch, merge, quantize, export units).
    assert {m for m, _ in points} == {"kill-after-units", "kill-in-unit"}
    assert min(n for _, n in points) < workload.total_units // 3 < max(n for _, n in points)


PARALLEL = 2  # points run two at a time (each is a chain of processes): the suite must stay short


@pytest.mark.parametrize("batch", range((K + PARALLEL - 1) // PARALLEL))
def test_killed_build_resumes_to_identical_output(batch, workload, tmp_path):
    points = range(batch * PARALLEL, min(K, (batch + 1) * PARALLEL))
    with ThreadPoolExecutor(PARALLEL) as pool:
        for f in [pool.submit(_kill_and_resume, point, workload, tmp_path / f"p{point}") for point in points]:
            f.result()


def _kill_and_resume(point, workload, tmp_path):
    mode, n = kill_points(workload.total_units, K)[point]
    spec = workload.spec(tmp_path)
    cache, logs = tmp_path / "cache", tmp_path / "logs"
    killed = cli("build", spec, "--executor", "local", "--cache", cache, logdir=logs, env={"LOADGRAPH_FAULT": f"{mode}:{n}"}, row="kill -9 (local executor)")
    TALLY.add("kill -9 (local executor)", faults=1)
    assert killed.rc == -9, killed.output
    assert not (tmp_path / "out").exists()  # nothing exported by a killed build
    assert not corrupt_entries(cache)  # whatever it published is whole

    rerun = cli("build", spec, "--executor", "local", "--cache", cache, "--json", tmp_path / "r.json", logdir=logs,
                env={"LOADGRAPH_UNIT_LOG": str(tmp_path / "units.log")}, row="kill -9 (local executor)")
    assert rerun.rc == 0, rerun.output
    finished_before = n if mode == "kill-after-units" else n - 1
    nodes = report_nodes(tmp_path / "r.json")
    reused = sum(workload.ref_units[nd["key"]] if nd["status"] == "cached" else nd["units_reused"] for nd in nodes)
    computed = unit_log(tmp_path / "units.log")
    assert reused == finished_before, (mode, n, nodes)
    assert len(computed) == workload.total_units - finished_before and len(set(computed)) == len(computed)
    assert [nd["key"] for nd in nodes] == workload.ref_keys
    lost = same_files(tmp_path / "out", workload.ref_out) + corrupt_entries(cache)
    TALLY.add("kill -9 (local executor)", lost=len(lost))
    assert not lost
    assert not any((cache / "units").iterdir())  # every node dropped its resume points
    if point % 5 == 0:  # corrupt_entries() above ran the same re-hash in-process; the CLI too, now and then
        verify = cli("cache", "verify", "--cache", cache, logdir=logs)
        assert verify.rc == 0, verify.output
