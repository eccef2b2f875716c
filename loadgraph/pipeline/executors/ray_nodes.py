"""What the driver needs to know about a Ray cluster's nodes: which are alive, what they hold,
whether each one sees the cache, and how to pin a task to one of them.

Kept apart from the executor because `loadgraph prefetch` pins tasks to nodes too.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A random id written once into each cache root. A node that reads the same id through the
# same path sees the same filesystem; an empty local directory left at that path does not.
CACHE_ID_FILE = ".loadgraph-cache-id"
PROBE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    hostname: str
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def gpus(self) -> float:
        return self.resources.get("GPU", 0.0)

    @property
    def memory(self) -> float:
        return self.resources.get("memory", 0.0)


def alive_nodes() -> list[NodeInfo]:
    import ray

    return [
        NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), n.get("NodeManagerHostname", "?"), dict(n.get("Resources", {})))
        for n in ray.nodes()
        if n.get("Alive")
    ]


def pinned_to(node_id: str) -> Any:
    """Hard affinity: a unit that can only work on this node must never run elsewhere."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


def this_node_id() -> str | None:
    """The Ray node this driver process runs on (None when it is on no node, e.g. Ray Client)."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - client mode and odd setups: just do not pin
        return None


def where_am_i() -> dict:
    """Inside a task: the node and process it runs in (for reports and fault tests)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid()}


def cache_identity(root: Path) -> str:
    """The cache root's id, creating it atomically on first use (link fails if a racer won)."""
    marker = root / CACHE_ID_FILE
    try:
        return marker.read_text().strip()
    except FileNotFoundError:
        pass
    tmp = root / f".{CACHE_ID_FILE}.{uuid.uuid4().hex}"
    tmp.write_text(uuid.uuid4().hex)
    try:
        os.link(tmp, marker)
    except FileExistsError:
        pass
    except OSError:  # no hard links here (some FUSE/object-store mounts): exclusive create instead
        try:
            with open(marker, "x") as f:
                f.write(tmp.read_text())
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return marker.read_text().strip()


def sees_cache(cache_root: str, identity: str) -> bool:
    """True when this process reads the driver's cache id through `cache_root`."""
    try:
        return (Path(cache_root) / CACHE_ID_FILE).read_text().strip() == identity
    except OSError:
        return False


def unreachable_message(cache_root: str, nodes: list[str]) -> str:
    return (
        f"the cache at {cache_root} is not the same directory on Ray node(s) {', '.join(nodes)}: "
        "mount one shared filesystem (NFS, EFS, FSx, a ReadWriteMany volume) at that same path on every node, "
        "or pass --cache / set LOADGRAPH_CACHE to a path that is shared"
    )


def _probe(cache_root: str, identity: str) -> tuple[str, bool]:
    import ray

    return ray.get_runtime_context().get_node_id(), sees_cache(cache_root, identity)


def probe_cache(cache_root: str, identity: str, nodes: list[NodeInfo], timeout: float = PROBE_TIMEOUT_S) -> list[NodeInfo]:
    """One zero-CPU task pinned to each node; returns the nodes that do not see the cache.

    Zero CPUs so that a head started with num-cpus=0 (usual on Kubernetes) is probed too. A node
    that does not answer within `timeout` is not reported: every unit re-checks before it runs.
    """
    import ray

    probe = ray.remote(num_cpus=0, max_retries=1)(_probe)
    refs = {probe.options(scheduling_strategy=pinned_to(n.node_id)).remote(cache_root, identity): n for n in nodes}
    ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    for ref in not_ready:
        ray.cancel(ref, force=True)
    bad = []
    for ref in ready:
        try:
            _, ok = ray.get(ref)
        except ray.exceptions.RayError:
            continue  # the node died while probing: not a cache problem
        if not ok:
            bad.append(refs[ref])
    return bad
