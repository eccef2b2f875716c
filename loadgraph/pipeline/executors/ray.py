"""Ray executor: every work unit is a Ray task; results are small dicts, bytes stay in the cache.

With an address (or RAY_ADDRESS, as under `ray job submit`) it joins that cluster; otherwise it
starts an embedded local Ray that it shuts down again. Units retry on worker or node death
(`max_retries`), ask for a GPU when they want one and the cluster has one, and for `memory`
from the bytes they read. The cache must be the same directory on every node (a shared
filesystem mounted at one path): the executor checks that up front on every node it can see,
and every unit checks it again before it touches the cache.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

from loadgraph import errors
from loadgraph.errors import BuildError, InputError, LoadgraphError, disk_full_message
from loadgraph.pipeline.executors.base import OnProgress, OnResult
from loadgraph.pipeline.executors.ray_nodes import (
    NodeInfo,
    alive_nodes,
    cache_identity,
    pinned_to,
    probe_cache,
    sees_cache,
    this_node_id,
    unreachable_message,
    where_am_i,
)
from loadgraph.pipeline.stage import Unit
from loadgraph.pipeline.unit_progress import PERIOD_S, file_reporter, read_progress
from loadgraph.pipeline.units import execute_unit, unit_dict

MAX_RETRIES = 3
# A unit holds about one tensor plus a copy buffer; ask Ray for a share of its input size so
# that big shards do not all land on one node at once (floor keeps tiny units schedulable).
MEMORY_PER_INPUT_BYTE = 0.25
MIN_MEMORY = 64 * 2**20
# auto: GPU units ask for a GPU when the cluster has one when the build starts.
# require: always ask (an autoscaler then adds GPU nodes; without one they wait forever).
# never: GPU units run on CPUs.
GPU_POLICY_ENV = "LOADGRAPH_RAY_GPU"
GPU_POLICIES = ("auto", "require", "never")
DRIVER_CHECK_S = 1.0
CANCEL_GRACE_S = 10.0


def _inject_fault(unit_id: str) -> None:
    """`LOADGRAPH_FAULT=slow-units:S` delays every unit by S seconds and, with LOADGRAPH_FAULT_LOG
    set, appends where it started: the node-loss test needs units in flight on the node it kills."""
    spec = os.environ.get("LOADGRAPH_FAULT", "")
    if not spec.startswith("slow-units:"):
        return
    log = os.environ.get("LOADGRAPH_FAULT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{where_am_i()['node_id']} {unit_id} {os.getpid()}\n")
    time.sleep(float(spec.split(":", 1)[1]))


def _use_assigned_cpus() -> None:
    """Torch in a reused worker keeps the thread count of its first task: match this task's CPUs."""
    import sys

    import ray

    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    if "torch" in sys.modules or cpus > 1:
        import torch

        torch.set_num_threads(max(1, cpus))


def _remote_execute(cache_root: str, identity: str, desc: dict, unit: dict) -> dict:
    here = where_am_i()
    if identity and not sees_cache(cache_root, identity):
        # Checked before execute_unit, whose Cache() would create an empty local cache here.
        return {"error": unreachable_message(cache_root, [f"{here['node_id'][:12]} ({here['host']})"]), "error_class": "BuildError"}
    stop = _watch_driver(desc)
    try:
        _inject_fault(unit["id"])
        _use_assigned_cpus()
        result = execute_unit(cache_root, desc, unit, file_reporter(cache_root, desc["key"], unit["id"]))
    except LoadgraphError as exc:
        # Deterministic, user-facing failures: returned, not raised, so Ray does not retry them
        # and the CLI keeps the class (exit code) and the one-line message.
        return {"error": str(exc), "error_class": type(exc).__name__}
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):  # retrying cannot free space: say so, once
            return {"error": disk_full_message(cache_root, f"{desc['stage']} {desc['key'][:12]}"), "error_class": "BuildError"}
        raise
    finally:
        stop.set()
    return {**result, "ran_on": here}


def _watch_driver(desc: dict) -> threading.Event:
    """Ray keeps a dead driver's tasks running for a while: end this worker once the driver's
    lease is gone (checked every DRIVER_CHECK_S, twice in a row, so one bad read is forgiven).
    The unit's staging dir is left for gc, which sees its owner is dead."""
    from loadgraph.pipeline.leases import lease_alive

    stop = threading.Event()
    lease = desc.get("lease")
    if not lease:
        return stop

    leases_dir = Path(lease).parent

    def watch() -> None:
        misses = 0
        while not stop.wait(DRIVER_CHECK_S):
            # A node that cannot see the cache's leases/ at all proves nothing about the driver.
            misses = 0 if lease_alive(lease) or not leases_dir.is_dir() else misses + 1
            if misses >= 2:
                os._exit(1)

    threading.Thread(target=watch, name="loadgraph-driver-watch", daemon=True).start()
    return stop


def reads_driver_paths(desc: dict, cache_root: str) -> bool:
    """A node whose runtime names local paths outside the cache (a source checkpoint, a hub
    snapshot) reads files that only the driver's machine is known to have."""
    root = Path(cache_root)
    for value in desc.get("runtime", {}).values():
        if isinstance(value, str) and value.startswith("/"):
            path = Path(value)
            if root != path and root not in path.parents:
                return True
    return False


def _first_line(x: object) -> str:
    text = str(x).strip()
    return text.splitlines()[0] if text else ""


def _failure(desc: dict, unit: Unit, exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:  # RayTaskError: the unit itself raised (not retried, see retry_exceptions)
        what = f"{type(cause).__name__}: {_first_line(cause)}"
    else:  # worker or node death, out of memory...: Ray has retried it already
        what = f"{type(exc).__name__} (after {MAX_RETRIES} retries): {_first_line(exc)}"
    return f"{desc['stage']} unit {unit.id} ({desc['key'][:12]}) failed on Ray: {what}"


class RayExecutor:
    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        max_in_flight: int | None = None,
        init_kwargs: dict[str, Any] | None = None,
        runtime_env: dict | None = None,
        gpu_policy: str | None = None,
    ):
        import ray

        self.gpu_policy = gpu_policy or os.environ.get(GPU_POLICY_ENV, "auto")
        if self.gpu_policy not in GPU_POLICIES:  # checked before Ray starts, so nothing leaks
            raise InputError(f"{GPU_POLICY_ENV}: {self.gpu_policy!r} is not one of {', '.join(GPU_POLICIES)}")
        self.ray = ray
        self._owns_connection = False
        self.embedded = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False, **(init_kwargs or {})}
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local" forces a new instance: a bare ray.init() would join whichever cluster
                # `ray start` last recorded in /tmp/ray on this machine, maybe someone else's.
                kwargs.setdefault("num_cpus", os.cpu_count())
                ray.init(address="local", **kwargs)
                self.embedded = True
            self._owns_connection = True
        self.nodes: list[NodeInfo] = alive_nodes()
        self.has_gpus = any(n.gpus for n in self.nodes)
        self.max_node_memory = max((n.memory for n in self.nodes), default=0.0)
        self.driver_node = this_node_id()
        cpus = int(sum(n.resources.get("CPU", 0) for n in self.nodes))
        self.total_cpus = cpus
        self.max_node_cpus = int(max((n.resources.get("CPU", 0) for n in self.nodes), default=1)) or 1
        self._cpus_per_unit = 1
        self.max_in_flight = max_in_flight or max(2, 2 * (cpus + int(sum(n.gpus for n in self.nodes))))
        self.runtime_env = runtime_env
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[OSError])(_remote_execute)
        self._checked_roots: dict[str, str] = {}

    # -- placement -------------------------------------------------------------
    def _wants_gpu(self, unit: Unit) -> bool:
        if not unit.gpu or self.gpu_policy == "never":
            return False
        return self.gpu_policy == "require" or self.has_gpus

    def _memory(self, unit: Unit) -> int:
        want = max(MIN_MEMORY, int(unit.nbytes * MEMORY_PER_INPUT_BYTE))
        # Never ask for more than the biggest node has: such a task would wait forever.
        return int(min(want, self.max_node_memory)) if self.max_node_memory else want

    def options_for(self, desc: dict, unit: Unit, cache_root: str) -> dict:
        if len(self.nodes) > 1 and self.driver_node and reads_driver_paths(desc, cache_root):
            # I/O only, and it must run where the files are. Zero CPUs: a Kubernetes head
            # usually has num-cpus=0, and a unit asking for one there would never start.
            opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": pinned_to(self.driver_node)}
        else:
            opts = {"num_cpus": self._cpus_per_unit, "memory": self._memory(unit)}
            if self._wants_gpu(unit):
                opts["num_gpus"] = 1
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        return opts

    def _check_cache(self, cache_root: str) -> str:
        """The cache's id; on a joined multi-node cluster, fail now if some node cannot see it."""
        if cache_root not in self._checked_roots:
            from loadgraph.pipeline.objstore import url_of

            if url_of(cache_root):  # a remote tier: every node has its own local dir and reaches the tier by URL
                self._checked_roots[cache_root] = ""
                return ""
            identity = cache_identity(Path(cache_root))
            if not self.embedded and len(self.nodes) > 1:
                bad = probe_cache(cache_root, identity, self.nodes)
                if bad:
                    raise BuildError(unreachable_message(cache_root, [f"{n.node_id[:12]} ({n.ip})" for n in bad]))
            self._checked_roots[cache_root] = identity
        return self._checked_roots[cache_root]

    # -- running ---------------------------------------------------------------
    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult, on_progress: OnProgress | None = None) -> None:
        ray = self.ray
        identity = self._check_cache(cache_root)
        # Few big units (5 GB shards) would each get one core of a many-core node: give each a
        # fair share, so torch's merge/cast/quantize kernels run multi-threaded inside it.
        self._cpus_per_unit = max(1, min(self.max_node_cpus, self.total_cpus // max(1, len(units))))
        queue = sorted(units, key=lambda u: -u.nbytes)  # biggest first: the slowest unit does not start last
        pending: dict[Any, Unit] = {}
        try:
            while queue or pending:
                while queue and len(pending) < self.max_in_flight:
                    unit = queue.pop(0)
                    ref = self._task.options(**self.options_for(desc, unit, cache_root)).remote(cache_root, identity, desc, unit_dict(unit))
                    pending[ref] = unit
                # Wake up every PERIOD_S to relay the progress running units write to the cache.
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=PERIOD_S if on_progress else None)
                if on_progress:
                    for ref, unit in pending.items():
                        if ref not in ready and (fraction := read_progress(cache_root, desc["key"], unit.id)) is not None:
                            on_progress(unit, fraction)
                for ref in ready:
                    unit = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise BuildError(_failure(desc, unit, exc)) from exc
                    if "error" in result:
                        raise getattr(errors, result["error_class"], BuildError)(result["error"])
                    on_result(unit, result)
        finally:
            self._cancel(list(pending))

    def run_io(self, fn, items: list) -> list:
        """I/O jobs (an export's uploads) as zero-CPU tasks spread over the nodes; results in order."""
        task = self.ray.remote(num_cpus=0, max_retries=MAX_RETRIES, retry_exceptions=[OSError], scheduling_strategy="SPREAD")(fn)
        opts = {"runtime_env": self.runtime_env} if self.runtime_env else {}
        refs = [task.options(**opts).remote(item) for item in items]
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            self._cancel(refs)
            cause = getattr(exc, "cause", None) or exc
            raise BuildError(f"export upload failed on Ray: {type(cause).__name__}: {_first_line(cause)}") from None

    def _cancel(self, refs: list) -> None:
        """Stop units still in flight after a failure. A plain cancel interrupts the task in Python,
        so the unit removes its own staging dir; wait briefly for that, then kill what is left."""
        if not refs:
            return
        ray = self.ray
        for ref in refs:
            ray.cancel(ref, force=False)
        _, stuck = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_GRACE_S)
        for ref in stuck:
            ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._owns_connection:
            self.ray.shutdown()
            self._owns_connection = False
