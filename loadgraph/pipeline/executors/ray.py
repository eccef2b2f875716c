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
import warnings
from pathlib import Path
from typing import Any

from loadgraph import errors
from loadgraph.errors import BuildError, InputError, LoadgraphError, disk_full_message
from loadgraph.pipeline.executors.base import OnProgress, OnResult
from loadgraph.pipeline.executors.ray_sizing import NodeType, alive_types, autoscaler_types, cpu_share, infeasible_message, memory_for
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
# While units wait, the cluster is re-read this often: a request that no node type (alive, or one
# the autoscaler may add) can hold any more fails the build instead of waiting forever.
FEASIBILITY_CHECK_S = 3.0
NODE_LABEL = "ray.io/node-id"
# Nodes of one build in flight at once (driver threads that wait on Ray; the tasks do the work).
NODE_CONCURRENCY_ENV = "LOADGRAPH_RAY_NODES"


def _inject_fault(unit_ids: list[str]) -> None:
    """`LOADGRAPH_FAULT=slow-units:S` delays every unit by S seconds and, with LOADGRAPH_FAULT_LOG
    set, appends where it started: the node-loss test needs units in flight on the node it kills."""
    spec = os.environ.get("LOADGRAPH_FAULT", "")
    if not spec.startswith("slow-units:"):
        return
    log = os.environ.get("LOADGRAPH_FAULT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:  # fused units (pipeline/fusion.py) start with their producer
            f.writelines(f"{where_am_i()['node_id']} {uid} {os.getpid()}\n" for uid in unit_ids)
    time.sleep(float(spec.split(":", 1)[1]))


def _use_assigned_cpus() -> None:
    """Torch in a reused worker keeps the thread count of its first task: match this task's CPUs."""
    import sys

    import ray

    from loadgraph.heap import reuse_large_blocks

    reuse_large_blocks()  # a worker's tensors reuse freed blocks too (heap.py)
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1) or 1)
    if "torch" in sys.modules or cpus > 1:
        import torch

        torch.set_num_threads(max(1, cpus))


def _remote_execute(cache_root: str, identity: str, desc: dict, unit: dict) -> dict:
    here = where_am_i()
    if identity and not sees_cache(cache_root, identity):  # no identity: a remote tier, no shared path to check
        # Checked before execute_unit, whose Cache() would create an empty local cache here. The
        # driver leaves this node out and runs the unit elsewhere (a node that joined after the probe).
        return {"error": unreachable_message(cache_root, [f"{here['node_id'][:12]} ({here['ip']})"]), "error_class": "BuildError",
                "no_cache_on": here}
    stop = _watch_driver(desc)
    try:
        _inject_fault([unit["id"], *(u["id"] for u in unit.get("payload", {}).get("fused", ()))])
        _use_assigned_cpus()
        result = execute_unit(cache_root, desc, unit, file_reporter(cache_root, desc["key"], unit["id"]))
    except LoadgraphError as exc:
        # Deterministic, user-facing failures: returned, not raised, so Ray does not retry them
        # and the CLI keeps the class (exit code) and the one-line message.
        return {"error": str(exc), "error_class": type(exc).__name__, **({"error_key": exc.key} if hasattr(exc, "key") else {})}
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
    snapshot) reads files that only the driver's machine is known to have; one that names a hub
    repo at a commit downloads them wherever it runs (stages/hub.py)."""
    if desc.get("runtime", {}).get("hub"):
        return False
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
        self.bad_nodes: dict[str, str] = {}  # node id -> ip: nodes that do not see the cache, left out
        self.has_gpus = any(n.gpus for n in self.nodes)
        self.driver_node = this_node_id()
        cpus = int(sum(n.resources.get("CPU", 0) for n in self.nodes))
        self.node_concurrency = max(1, int(os.environ.get(NODE_CONCURRENCY_ENV, 0)) or 16)
        # Units of all the nodes now running, by "wants a GPU": concurrent nodes share the CPUs.
        self._demand = {False: 0, True: 0}
        self._demand_lock = threading.Lock()
        self._stop = threading.Event()  # set when another node of the build failed
        self.max_in_flight = max_in_flight or max(2, 2 * (cpus + int(sum(n.gpus for n in self.nodes))))
        self.runtime_env = runtime_env
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[OSError])(_remote_execute)
        self._checked_roots: dict[str, str] = {}

    # -- placement -------------------------------------------------------------
    def _wants_gpu(self, unit: Unit) -> bool:
        if not unit.gpu or self.gpu_policy == "never":
            return False
        return self.gpu_policy == "require" or self.has_gpus

    def usable_nodes(self) -> list[NodeInfo]:
        return [n for n in self.nodes if n.node_id not in self.bad_nodes]

    def node_types(self) -> list[NodeType]:
        """The shapes a unit can land on: alive nodes that see the cache, and autoscaler groups."""
        return alive_types(self.usable_nodes()) + autoscaler_types()

    def _size_units(self, units: list[Unit]) -> dict[bool, int]:
        """Few big units (5 GB shards) would each get one core of a many-core node: give each a
        fair share of the CPUs of the nodes that can run it, so torch's kernels run multi-threaded.
        The share counts the units of every node now running, so concurrent nodes do not each
        ask for the whole cluster and then run one after the other."""
        types = self.node_types()
        sizes = {}
        for gpu in (False, True):
            mine = sum(1 for u in units if self._wants_gpu(u) == gpu) + self._demand[gpu]
            cpus = sum(n.resources.get("CPU", 0) for n in self.usable_nodes() if n.gpus >= 1 or not gpu)
            sizes[gpu] = cpu_share(types, cpus, mine, gpu)
        return sizes

    def _add_demand(self, units: list[Unit], sign: int) -> None:
        with self._demand_lock:
            for unit in units:
                self._demand[self._wants_gpu(unit)] += sign

    def abort(self) -> None:
        """Another node failed: running nodes cancel their units and raise."""
        self._stop.set()

    def resume(self) -> None:
        self._stop.clear()

    def options_for(self, desc: dict, unit: Unit, cache_root: str, types: list[NodeType] | None = None,
                    sizes: dict[bool, int] | None = None) -> dict:
        """Ray options for one unit; `sizes` are its node's CPUs per unit (_size_units), else 1."""
        if len(self.nodes) > 1 and self.driver_node and reads_driver_paths(desc, cache_root):
            # I/O only, and it must run where the files are. Zero CPUs: a Kubernetes head
            # usually has num-cpus=0, and a unit asking for one there would never start.
            opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": pinned_to(self.driver_node)}
        else:
            gpu = self._wants_gpu(unit)
            cpus = sizes[gpu] if sizes else 1
            want = max(MIN_MEMORY, int(unit.nbytes * MEMORY_PER_INPUT_BYTE))
            opts = {"num_cpus": cpus, "memory": memory_for(self.node_types() if types is None else types, want, cpus, gpu)}
            if gpu:
                opts["num_gpus"] = 1
            if self.bad_nodes:
                opts["label_selector"] = {NODE_LABEL: f"!in({', '.join(sorted(self.bad_nodes))})"}
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        return opts

    def check_feasible(self, what: str, opts: dict, types: list[NodeType]) -> None:
        """Fail now when no node type can hold this request (a task that would wait forever)."""
        if "scheduling_strategy" in opts:  # pinned to the driver's node with no CPUs: it fits there
            return
        if not any(t.fits(opts) for t in types):
            raise BuildError(infeasible_message(what, opts, types))

    def _leave_out(self, node_id: str, ip: str, cache_root: str) -> None:
        if node_id in self.bad_nodes:
            return
        self.bad_nodes[node_id] = ip
        if not self.usable_nodes():
            raise BuildError(unreachable_message(cache_root, [f"{n[:12]} ({i})" for n, i in self.bad_nodes.items()]))
        warnings.warn(f"Ray node {node_id[:12]} ({ip}) does not see the cache at {cache_root} (not the same directory there): "
                      "left out of this build; mount the shared cache at that path there to use it", stacklevel=2)

    def _check_cache(self, cache_root: str) -> str:
        """The cache's id; on a joined multi-node cluster, nodes that cannot see it are left out
        (with a warning naming each); the build fails only when no node is left."""
        if cache_root not in self._checked_roots:
            from loadgraph.pipeline.objstore import url_of

            if url_of(cache_root):  # a remote tier: every node has its own local dir and reaches the tier by URL
                self._checked_roots[cache_root] = ""
                return ""
            identity = cache_identity(Path(cache_root))
            if not self.embedded and len(self.nodes) > 1:
                for node in probe_cache(cache_root, identity, self.nodes):
                    self._leave_out(node.node_id, node.ip, cache_root)
            self._checked_roots[cache_root] = identity
        return self._checked_roots[cache_root]

    # -- running ---------------------------------------------------------------
    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult, on_progress: OnProgress | None = None) -> None:
        ray = self.ray
        identity = self._check_cache(cache_root)
        sizes = self._size_units(units)
        queue = sorted(units, key=lambda u: -u.nbytes)  # biggest first: the slowest unit does not start last
        pending: dict[Any, tuple[Unit, dict]] = {}
        next_check = time.monotonic() + FEASIBILITY_CHECK_S
        self._add_demand(units, +1)
        unfinished = list(units)  # their demand is returned as they finish, the rest at the end
        try:
            while queue or pending:
                if self._stop.is_set():
                    raise BuildError(f"{desc['stage']} {desc['key'][:12]}: stopped, another node of this build failed")
                types = self.node_types() if queue else []
                while queue and len(pending) < self.max_in_flight:
                    unit = queue.pop(0)
                    opts = self.options_for(desc, unit, cache_root, types, sizes)
                    self.check_feasible(f"{desc['stage']} unit {unit.id} ({desc['key'][:12]})", opts, types)
                    ref = self._task.options(**opts).remote(cache_root, identity, desc, unit_dict(unit))
                    pending[ref] = (unit, opts)
                # Wake up every PERIOD_S to relay the progress running units write to the cache.
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(PERIOD_S, FEASIBILITY_CHECK_S))
                if on_progress:
                    for ref, (unit, _) in pending.items():
                        if ref not in ready and (fraction := read_progress(cache_root, desc["key"], unit.id)) is not None:
                            on_progress(unit, fraction)
                for ref in ready:
                    unit, _ = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise BuildError(_failure(desc, unit, exc)) from exc
                    if "no_cache_on" in result:  # a node that joined after the probe: leave it out, run the unit elsewhere
                        self._leave_out(result["no_cache_on"]["node_id"], result["no_cache_on"]["ip"], cache_root)
                        queue.insert(0, unit)
                        continue
                    if "error" in result:
                        cls = getattr(errors, result["error_class"], BuildError)
                        raise cls(result["error"], result["error_key"]) if "error_key" in result else cls(result["error"])
                    self._add_demand([unit], -1)
                    unfinished.remove(unit)
                    on_result(unit, result)
                if not ready and pending and time.monotonic() > next_check:
                    self._check_waiting(desc, pending)
                    next_check = time.monotonic() + FEASIBILITY_CHECK_S
        finally:
            self._add_demand(unfinished, -1)
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

    def run_jobs(self, fn, items: list, near_driver: bool = True) -> list:
        """The driver's own heavy work (hashing sources, checking a target, placing an export) as
        tasks, one per item, results in order: the driver process reads no model bytes. Near the
        driver: paths the driver named (a source, an export path) are known to exist on its node, so
        there, as zero-CPU tasks on a multi-node cluster (as fetch units; a head may have no CPUs)."""
        if near_driver and len(self.nodes) > 1 and self.driver_node:
            opts: dict[str, Any] = {"num_cpus": 0, "scheduling_strategy": pinned_to(self.driver_node)}
        else:
            opts = {"num_cpus": 1, "scheduling_strategy": "SPREAD"}
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        task = self.ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[OSError])(fn)
        refs = [task.options(**opts).remote(item) for item in items]
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            self._cancel(refs)
            cause = getattr(exc, "cause", None)
            if isinstance(cause, LoadgraphError):  # bad input found there: same class, same line
                raise cause from None
            raise BuildError(f"{getattr(fn, '__name__', 'job')} failed on Ray: {type(cause or exc).__name__}: {_first_line(cause or exc)}") from None

    def _check_waiting(self, desc: dict, pending: dict) -> None:
        """Nodes come and go: re-read them, and fail if a waiting unit fits none of them any more."""
        self.nodes = alive_nodes()
        types = self.node_types()
        for unit, opts in pending.values():
            self.check_feasible(f"{desc['stage']} unit {unit.id} ({desc['key'][:12]})", opts, types)

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
