"""How much a unit asks of Ray, from the node types that can run it, and whether any can.

Ray runs a task only where its whole request fits one node. So a GPU unit's CPU and memory ask
comes from the GPU node types, not the cluster's totals (a 4-CPU node beside a 1-CPU + 1-GPU node
must not make GPU units ask 2 CPUs), and a request that no node type can hold, alive or one the
autoscaler may add, is an error now, not a task that waits forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadgraph.pipeline.executors.ray_nodes import NodeInfo

GIB = 2**30


@dataclass(frozen=True)
class NodeType:
    name: str  # "4 alive nodes" or the autoscaler group's name
    cpus: float
    gpus: float
    memory: float  # bytes; 0: not reported
    source: str = "alive"  # alive | autoscaler

    def fits(self, request: dict) -> bool:
        return (self.cpus >= request.get("num_cpus", 0) and self.gpus >= request.get("num_gpus", 0)
                and (not self.memory or self.memory >= request.get("memory", 0)))

    def describe(self) -> str:
        where = f"{self.name} (autoscaler)" if self.source == "autoscaler" else self.name
        return f"{where}: {self.cpus:g} CPU, {self.gpus:g} GPU, {self.memory / GIB:.1f} GiB"


def alive_types(nodes: list[NodeInfo]) -> list[NodeType]:
    """One type per distinct shape among the alive nodes."""
    counts: dict[tuple[float, float, float], int] = {}
    for n in nodes:
        shape = (n.resources.get("CPU", 0.0), n.gpus, n.memory)
        counts[shape] = counts.get(shape, 0) + 1
    return [NodeType(f"{k} alive node{'s' if k > 1 else ''}", *shape) for shape, k in sorted(counts.items())]


def autoscaler_types() -> list[NodeType]:
    """The node groups an autoscaler may add, as it reports them to the GCS (the cluster config
    Ray Train and Ray Data read too); none on a fixed cluster."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - private API, older GCS: treat as a fixed cluster
        return []
    if config is None:
        return []
    return [NodeType(g.name or "node group", float(g.resources.get("CPU", 0)), float(g.resources.get("GPU", 0)),
                     float(g.resources.get("memory", 0)), "autoscaler") for g in config.node_group_configs if g.max_count != 0]


def cpu_share(types: list[NodeType], nodes_cpus: float, units: int, gpu: bool) -> int:
    """CPUs for each of `units` units: a fair share of the CPUs that can run them, no more than
    one node of those types has (every GPU type, for GPU units, so that each GPU node can take them)."""
    candidates = [t for t in types if t.gpus >= 1] if gpu else types
    if not candidates:
        return 1
    ceiling = min(t.cpus for t in candidates) if gpu else max(t.cpus for t in candidates)
    return int(max(0, min(ceiling, max(1, nodes_cpus // max(1, units)))))


def memory_for(types: list[NodeType], want: int, cpus: int, gpu: bool) -> int:
    """`want` bytes, capped to what a node able to run the unit (its CPUs, a GPU) has."""
    fitting = [t for t in types if t.cpus >= cpus and (t.gpus >= 1 or not gpu) and t.memory]
    if not fitting:
        return want
    cap = min(t.memory for t in fitting) if gpu else max(t.memory for t in fitting)
    return int(min(want, cap))


def describe_request(request: dict) -> str:
    parts = [f"CPU: {request.get('num_cpus', 0):g}", f"GPU: {request.get('num_gpus', 0):g}"]
    if request.get("memory"):
        parts.append(f"memory: {request['memory'] / GIB:.1f} GiB")
    return "{" + ", ".join(parts) + "}"


def infeasible_message(what: str, request: dict, types: list[NodeType]) -> str:
    known = "; ".join(t.describe() for t in types) or "none"
    hint = " (or set LOADGRAPH_RAY_GPU=never to run GPU units on CPUs)" if request.get("num_gpus") else ""
    return f"{what}: no node type can run a request of {describe_request(request)}; node types: {known}. Add a node type that can{hint}"
