"""What a build will do, decided before it does anything: each node's status and its work.

A build needs only what it reads: every sink of the DAG (exports' final artifacts, verify
reports) and each target's final artifact, plus, going upstream, the inputs of the nodes that
must be built. An evicted upstream entry whose consumers are all cached is "not needed": it is
not rebuilt, and no executor (Ray) is started for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadgraph.pipeline.cache import UNIT_RECORD, Cache
from loadgraph.pipeline.graph import Graph, Node
from loadgraph.pipeline.stage import get_stage
from loadgraph.pipeline.units import node_context

CACHED, TO_BUILD, PARTIAL, NOT_NEEDED = "cached", "to build", "partial", "not needed"


@dataclass
class PlanRow:
    node: Node
    status: str  # cached | to build | partial | not needed
    units_done: int = 0
    units_total: int | None = None  # None: not knowable until the node's inputs are built
    nbytes: int | None = None  # bytes the units will read, when knowable


def needed_keys(graph: Graph, cached: set[str]) -> set[str]:
    """Keys the build must have: the roots (sinks and target finals) and, upstream, the inputs
    of every needed node that is not cached."""
    consumed = {k for n in graph.nodes.values() for k in n.inputs.values()}
    stack = [k for k in graph.nodes if k not in consumed] + [t.final for t in graph.targets]
    needed: set[str] = set()
    while stack:
        key = stack.pop()
        if key in needed:
            continue
        needed.add(key)
        if key not in cached:
            stack.extend(graph.nodes[key].inputs.values())
    return needed


def cached_keys(graph: Graph, cache: Cache) -> set[str]:
    # lookup: a tier's entries by their manifests, none downloaded here (whoever reads one, verifies it)
    return {k for k in graph.nodes if cache.lookup(k) is not None}


def node_status(graph: Graph, node: Node, cache: Cache) -> tuple[str, int, int | None]:
    """(cached | partial | to build, finished units, total units if knowable without building)."""
    row = _row(node, cache, cache.get(node.key) is not None, needed=True)
    return row.status, row.units_done, (0 if row.status == CACHED else row.units_total)


def _row(node: Node, cache: Cache, is_cached: bool, needed: bool) -> PlanRow:
    if is_cached:
        return PlanRow(node, CACHED)
    if not needed:
        return PlanRow(node, NOT_NEEDED)
    unit_root = cache.root / "units" / node.key
    done = sum(1 for _ in unit_root.glob(f"*/{UNIT_RECORD}")) if unit_root.exists() else 0
    status = PARTIAL if done else TO_BUILD
    if not all(cache.lookup(k) is not None for k in node.inputs.values()):
        return PlanRow(node, status, done)
    if cache.node_local and not all(cache.is_here(k) for k in node.inputs.values()):
        return PlanRow(node, status, done)  # units known once a worker has the inputs: none downloaded here
    units = get_stage(node.stage).units(node_context(cache, node.describe()))
    return PlanRow(node, status, done, len(units), sum(u.nbytes for u in units))


def plan_rows(graph: Graph, cache: Cache) -> list[PlanRow]:
    """One row per node, in build (topological) order."""
    cached = cached_keys(graph, cache)
    needed = needed_keys(graph, cached)
    return [_row(n, cache, n.key in cached, n.key in needed) for n in graph.nodes.values()]


def keys_to_build(rows: list[PlanRow]) -> set[str]:
    """The nodes a build of `rows` computes (neither cached nor unneeded): the ones checked first."""
    return {r.node.key for r in rows if r.status not in ("cached", NOT_NEEDED)}
