"""A build needs only what it reads: evicted upstream entries whose consumers are cached are
"not needed", are not rebuilt, and no executor (Ray) is started for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.executors.local import LocalExecutor
from loadgraph.pipeline.graph import Graph, Node, Target, compile_specs
from loadgraph.pipeline.plan import needed_keys, plan_rows
from loadgraph.pipeline.runner import build
from loadgraph.spec import parse_spec


def _graph() -> Graph:
    """fetch -> inspect -> export, and verify reading export and inspect (the real shape)."""
    g = Graph()
    for key, stage, inputs in (("f", "fetch", {}), ("i", "inspect", {"model": "f"}), ("e", "export", {"model": "i"}), ("v", "verify", {"model": "e", "reference": "i"})):
        g.nodes[key] = Node(key, stage, {}, inputs)
    g.targets.append(Target("t", None, "e", "/out"))  # type: ignore[arg-type] - the spec is not read here
    return g


@pytest.mark.parametrize(
    "cached,needed",
    [
        (set(), {"f", "i", "e", "v"}),
        ({"e", "v"}, {"e", "v"}),  # fetch and inspect evicted: nothing reads them
        ({"v"}, {"f", "i", "e", "v"}),  # the export (a target) must be rebuilt, so its inputs are needed
        ({"f", "e"}, {"f", "i", "e", "v"}),  # verify reads inspect, which reads fetch (cached: it is read, not built)
        ({"f", "i", "e", "v"}, {"e", "v"}),
    ],
)
def test_needed_keys(cached, needed):
    assert needed_keys(_graph(), cached) == needed


def _compile(base: Path, tmp: Path, cache: Cache):
    spec = parse_spec({"source": {"model": str(base)}, "export": {"path": str(tmp / "out"), "max_shard_size": "100KB"}}, "test")
    return compile_specs(spec, cache)


def _no_executor():
    raise AssertionError("an executor was started for a build that needs nothing")


def test_evicted_upstream_is_not_rebuilt_and_no_executor_starts(models, tmp_path):
    cache = Cache(tmp_path / "cache")
    graph = _compile(models("llama"), tmp_path, cache)
    build(graph, cache, LocalExecutor)
    by_stage = {n.stage: n.key for n in graph.nodes.values()}
    for stage in ("fetch", "inspect"):  # what `cache gc` evicted in the issue
        cache.evict(by_stage[stage])
    graph = _compile(models("llama"), tmp_path, cache)
    assert {r.node.stage: r.status for r in plan_rows(graph, cache)} == {"fetch": "not needed", "inspect": "not needed", "export": "cached", "verify": "cached"}
    report = build(graph, cache, _no_executor)
    assert report.ok and report.executor == ""
    assert {n.stage: n.status for n in report.nodes} == {"fetch": "not needed", "inspect": "not needed", "export": "cached", "verify": "cached"}
    assert cache.get(by_stage["fetch"]) is None and report.targets[0]["export_status"] == "up-to-date"


def test_evicted_target_rebuilds_exactly_its_chain(models, tmp_path):
    cache = Cache(tmp_path / "cache")
    graph = _compile(models("llama"), tmp_path, cache)
    build(graph, cache, LocalExecutor)
    by_stage = {n.stage: n.key for n in graph.nodes.values()}
    for stage in ("inspect", "export"):
        cache.evict(by_stage[stage])
    report = build(_compile(models("llama"), tmp_path, cache), cache, LocalExecutor)
    assert {n.stage: n.status for n in report.nodes} == {"fetch": "cached", "inspect": "built", "export": "built", "verify": "cached"}
