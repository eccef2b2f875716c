"""In-process executor: units run on a pool of threads in this process (tests, one machine).

Units spend their time in pread/pwrite, BLAKE3 and torch kernels, all of which release the GIL,
so threads keep every core busy without Ray's start-up; torch's own intra-op threads are
divided among them so the pool does not oversubscribe the cores.
"""

from __future__ import annotations

import os
import socket
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from loadgraph.pipeline.executors.base import OnProgress, OnResult
from loadgraph.pipeline.stage import Unit
from loadgraph.pipeline.units import execute_unit, prepare_units, unit_dict


def local_workers() -> int:
    return max(1, int(os.environ.get("LOADGRAPH_LOCAL_WORKERS", 0)) or len(os.sched_getaffinity(0)))


def gpu_unit_threads() -> int:
    """How many GPU units run at once. Each holds a page-locked buffer as big as its largest tensor
    (pinned pages are resident), and a few threads keep one GPU fed: on the 16-core H200 host a 7B
    nf4 with 16 at once peaked at 4.05 GiB RSS in 14.1 s, with 8 at 2.56 GiB in 11.9 s; a merge +
    nf4 at 4.49 GiB in 18.0 s with 16, 3.60 in 19.7 with 12, 2.87 in 14.9 with 8
    (benchmarks/results/device/fast-7b-cuda-gpu-threads.md)."""
    return max(1, int(os.environ.get("LOADGRAPH_GPU_UNIT_THREADS", 0)) or 8)


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = workers or local_workers()
        self.unit_workers = self.workers  # units come in whole waves of this many (runner._plan_node)

    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult, on_progress: OnProgress | None = None) -> None:
        workers = min(self.workers, len(units)) if desc.get("threads_ok", True) else 1
        if any(u.gpu for u in units):
            workers = min(workers, gpu_unit_threads())
        cores = len(os.sched_getaffinity(0))
        here = {"node_id": None, "ip": None, "host": socket.gethostname(), "pid": os.getpid()}  # in this process, no Ray node

        def run(unit: Unit) -> dict:
            progress = (lambda fraction: on_progress(unit, fraction)) if on_progress else None
            torch = sys.modules.get("torch")  # imported by the first units of a node, maybe
            set_threads = getattr(torch, "set_num_threads", None)  # None while another thread imports it
            if set_threads is not None and workers > 1:
                set_threads(max(1, cores // workers))
            return {**execute_unit(cache_root, desc, unit_dict(unit), progress), "ran_on": here}

        if workers <= 1:
            for unit in units:
                on_result(unit, run(unit))
            return
        # The node's imports and plan caches are filled before the units start together; where a
        # stage has nothing to prepare, its first unit runs alone to do them (transformers' lazy
        # modules and PEFT's import are not thread-safe).
        alone = not prepare_units(cache_root, desc)
        torch = sys.modules.get("torch")
        threads = torch.get_num_threads() if torch else cores  # torch's own default, if a unit imports it
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="unit")
        pending: dict[Future, Unit] = {}
        try:
            if alone:
                on_result(units[0], run(units[0]))
            queue = list(units[1:] if alone else units)
            while queue or pending:
                while queue and len(pending) < workers:
                    unit = queue.pop(0)
                    pending[pool.submit(run, unit)] = unit
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    unit = pending.pop(future)
                    on_result(unit, future.result())  # the first failure stops submitting and is raised
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True)  # running units finish (or fail) before the error surfaces
            # Back to the thread count the next node's kernels expect: bitsandbytes' CPU bytes
            # depend on it (its reductions), and transformers runs with torch's default.
            torch = sys.modules.get("torch")
            if getattr(torch, "set_num_threads", None) is not None:
                torch.set_num_threads(threads)

    def close(self) -> None:
        pass
