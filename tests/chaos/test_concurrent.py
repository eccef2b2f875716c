"""Two and four builders of one spec on one cache, as separate processes started together: all
succeed, every work unit is computed exactly once (LOADGRAPH_UNIT_LOG records each computed
unit with its pid), every node is built by one of them, and the export is the reference's.
Concurrent builders on a Ray cluster: tests/test_ray_cluster.py::test_two_concurrent_builds_compute_every_unit_once."""

from __future__ import annotations

from collections import Counter

import pytest

from chaoslib import TALLY, corrupt_entries, finish, report_nodes, same_files, start, unit_log, workload  # noqa: F401


@pytest.mark.parametrize("builders", [2, 4])
def test_concurrent_builders_compute_each_unit_once(builders, workload, tmp_path):
    spec = workload.spec(tmp_path)
    cache, log = tmp_path / "cache", tmp_path / "units.log"
    handles = [start(["build", spec, "--executor", "local", "--cache", cache, "--json", tmp_path / f"r{i}.json"], tmp_path / "logs",
                     {"LOADGRAPH_UNIT_LOG": str(log)}) for i in range(builders)]
    runs = [finish(h, row="concurrent builders (processes)") for h in handles]
    TALLY.add("concurrent builders (processes)", faults=1)
    for run in runs:
        assert run.rc == 0, run.output
    # They really overlapped: the last one started before the first one finished.
    assert max(h[2] for h in handles) < min(h[2] + r.seconds for h, r in zip(handles, runs))
    computed = Counter(unit_log(log))
    assert computed and max(computed.values()) == 1, [u for u, n in computed.items() if n > 1]
    assert len(computed) == workload.total_units
    built = Counter(n["key"] for i in range(builders) for n in report_nodes(tmp_path / f"r{i}.json") if n["status"] == "built")
    assert built == Counter(workload.ref_keys)
    lost = same_files(tmp_path / "out", workload.ref_out) + corrupt_entries(cache)
    TALLY.add("concurrent builders (processes)", lost=len(lost))
    assert not lost
    assert not list(tmp_path.glob(".out.loadgraph-*"))  # no staging or replaced exports left beside it
