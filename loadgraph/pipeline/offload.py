"""The driver's heavy chores handed to the executor: hashing a source's files at plan time,
assembling and publishing a built node (pipeline/assemble.py), re-checking a target's files
before they leave the cache, placing an export by copy.

Under the Ray executor each runs as Ray tasks (RayExecutor.run_jobs), so the driver process of a
build reads no model bytes and its memory stays flat for any model size; under the local
executor, whose units run in the driver anyway, they run here. One executor serves the whole
command (SharedExecutor): plan-time hashing may start it, the runner then reuses it.
"""

from __future__ import annotations

from typing import Any, Callable

# Files smaller than this are hashed where they are (configs, tokenizers): cheaper than a task.
REMOTE_MIN = 1 << 20


class SharedExecutor:
    """An executor factory that makes one executor, on first call, and closes it once."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory = factory
        self.label = getattr(factory, "label", "the executor")
        self.instance: Any = None

    def __call__(self) -> Any:
        if self.instance is None:
            self.instance = self.factory()
        return self.instance

    def close(self) -> None:
        if self.instance is not None:
            self.instance.close()


def run_jobs(executor: Any, fn: Callable, items: list, near_driver: bool = True) -> list:
    """`fn` over `items` as the executor's tasks where it has them (Ray), else here."""
    remote = getattr(executor, "run_jobs", None)
    if remote is None or not items:
        return [fn(item) for item in items]
    return remote(fn, items, near_driver)


def remote_hasher(start: Callable[[], Any]) -> Callable[[list[str]], list[dict]]:
    """For hashing.hashed_by: source files hashed as tasks of the executor `start()` returns."""
    from loadgraph.pipeline.hashing import hash_path

    return lambda paths: run_jobs(start(), hash_path, paths)
