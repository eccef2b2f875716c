"""Ray executor: every work unit is a Ray task; results are small dicts, bytes stay in the cache.

With RAY_ADDRESS set (as under `ray job submit`) it joins that cluster; otherwise it starts
an embedded local Ray. Units retry on worker or node death (`max_retries`), ask for a GPU
when they want one and the cluster has one, and for `memory` from the bytes they read.
"""

from __future__ import annotations

import os
from typing import Any

from loadgraph.errors import BuildError, LoadgraphError
from loadgraph.pipeline.executors.base import OnResult
from loadgraph.pipeline.stage import Unit
from loadgraph.pipeline.units import execute_unit, unit_dict

MAX_RETRIES = 3
# A unit holds about one tensor plus a copy buffer; ask Ray for a share of its input size so
# that big shards do not all land on one node at once (floor keeps tiny units schedulable).
MEMORY_PER_INPUT_BYTE = 0.25
MIN_MEMORY = 64 * 2**20


def _remote_execute(cache_root: str, desc: dict, unit: dict) -> dict:
    try:
        return execute_unit(cache_root, desc, unit)
    except LoadgraphError as exc:
        # Ray wraps exceptions; keep the user-facing class and message intact.
        return {"error": str(exc), "error_class": type(exc).__name__}


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, max_in_flight: int | None = None, init_kwargs: dict[str, Any] | None = None):
        import ray

        self._started_here = False
        if not ray.is_initialized():
            address = address or os.environ.get("RAY_ADDRESS")
            kwargs = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False, **(init_kwargs or {})}
            if address:
                ray.init(address=address, **kwargs)
            else:
                # Embedded local Ray: this process owns it and shuts it down in close().
                # address="local": never attach to some other cluster that happens to run here.
                kwargs.setdefault("num_cpus", os.cpu_count())
                ray.init(address="local", **kwargs)
                self._started_here = True
        self.ray = ray
        resources = ray.cluster_resources()
        self.gpus = resources.get("GPU", 0)
        self.max_in_flight = max_in_flight or max(2, int(resources.get("CPU", 1)) * 2)
        self._task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=[OSError])(_remote_execute)

    def _options(self, unit: Unit) -> dict:
        opts: dict[str, Any] = {"num_cpus": 1, "memory": max(MIN_MEMORY, int(unit.nbytes * MEMORY_PER_INPUT_BYTE))}
        if unit.gpu and self.gpus:
            opts["num_gpus"] = 1
        return opts

    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult) -> None:
        ray = self.ray
        pending: dict[Any, Unit] = {}
        queue = list(units)
        try:
            while queue or pending:
                while queue and len(pending) < self.max_in_flight:
                    unit = queue.pop(0)
                    pending[self._task.options(**self._options(unit)).remote(cache_root, desc, unit_dict(unit))] = unit
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    unit = pending.pop(ref)
                    result = ray.get(ref)
                    if "error" in result:
                        from loadgraph import errors

                        raise getattr(errors, result["error_class"], BuildError)(result["error"])
                    on_result(unit, result)
        except ray.exceptions.RayError as exc:
            raise BuildError(f"{desc['stage']} unit failed on Ray: {str(exc).splitlines()[0]}") from exc
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)

    def close(self) -> None:
        if self._started_here:
            self.ray.shutdown()
