"""The libraries a cold build's checks import, imported on a thread while its sources are hashed.

The checks of a merge or quantize node (graph.run_checks) build transformers' model on the meta
device: their imports (torch, transformers' modeling_utils, bitsandbytes for a quantization) are
4-6 s that hold the GIL, and they cannot start before the plan knows what is not cached. The
plan's source hashing is the one thing that runs before them and does not need the GIL when it
runs in a child process (pipeline/hash_process.py), so the imports start with it. They start only
when sources are hashed (a cached rerun's stat memo hits, so it still imports neither torch nor
transformers). PEFT is left to the checks: it is imported with or without bitsandbytes depending
on the graph (peft_import.py), which is not known yet.
"""

from __future__ import annotations

import importlib
import threading

from loadgraph.spec import BuildSpec


def modules_for(targets: list[BuildSpec]) -> list[str]:
    """What the checks of `targets` will import: none for a re-shard or an export alone."""
    if not any(t.adapters or t.quantize or (t.convert and t.convert.base_adapters) for t in targets):
        return []
    quantizes = any(t.quantize for t in targets)
    return ["torch", "transformers.modeling_utils"] + (["bitsandbytes"] if quantizes else [])


class ImportWarmup:
    """`start()` (idempotent) imports `modules` on a thread; `wait()` joins it. The thread is not a
    daemon: an interpreter that exits mid-import (a bad input found after hashing began) waits
    for it instead of tearing down under it."""

    def __init__(self, modules: list[str]):
        self.modules = modules
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.modules and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loadgraph-import-warmup")
            self._thread.start()

    def _run(self) -> None:
        for name in self.modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the checks import it again and report the error there
                return

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
