"""Which nodes of a build run when: each as soon as the nodes it reads are done, several at once.

A matrix of targets shares its fetch and inspect nodes and then splits into chains that are
independent of each other; run one node at a time, such a build takes the sum of all its nodes
instead of its longest chain. The nodes run on driver threads that only wait on the executor
(Ray tasks do the work), so the number in flight is the executor's to say: one for the in-process
executor, whose units already share the process's cores and torch's global thread count.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable, TypeVar

from loadgraph.pipeline.graph import Node

T = TypeVar("T")


def run_when_ready(nodes: list[Node], build: Callable[[Node], T], concurrency: int, abort: Callable[[], None]) -> dict[str, T]:
    """`build(node)` for each of `nodes` (in topological order) once the nodes among them that it
    reads are built; up to `concurrency` at a time. On the first failure nothing new starts,
    `abort()` asks the running ones to stop, and that first error is raised once they have."""
    if concurrency <= 1:
        return {node.key: build(node) for node in nodes}
    todo = {node.key: node for node in nodes}
    waiting_on = {key: {k for k in node.inputs.values() if k in todo} for key, node in todo.items()}
    results: dict[str, T] = {}
    first_error: BaseException | None = None
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="node")
    running: dict[Future, str] = {}
    try:
        while True:
            if first_error is None:
                for key in [k for k, deps in waiting_on.items() if not deps][: concurrency - len(running)]:
                    del waiting_on[key]
                    running[pool.submit(build, todo[key])] = key
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                key = running.pop(future)
                try:
                    results[key] = future.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others stopped
                    if first_error is None:
                        first_error = exc
                        abort()
                    continue
                for deps in waiting_on.values():
                    deps.discard(key)
    except BaseException:  # Ctrl-C while waiting: stop the running nodes too
        abort()
        raise
    finally:
        pool.shutdown(wait=True)
    if first_error is not None:
        raise first_error
    if waiting_on:  # a cycle or an input that is never built: a bug in the graph, never a hang
        raise RuntimeError(f"nodes never became ready: {sorted(waiting_on)[:3]}")
    return results


class SerialReporter:
    """A reporter shared by node threads: one event at a time (rich's live display is not re-entrant)."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        method = getattr(self._inner, name)

        def call(*args, **kwargs):
            with self._lock:
                return method(*args, **kwargs)

        return call
