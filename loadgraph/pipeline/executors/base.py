"""The executor interface: run a node's units somewhere, report each result as it lands."""

from __future__ import annotations

from typing import Callable, Protocol

from loadgraph.pipeline.stage import Unit

OnResult = Callable[[Unit, dict], None]
OnProgress = Callable[[Unit, float], None]  # (unit, fraction done) while it runs


class Executor(Protocol):
    name: str

    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult, on_progress: OnProgress | None = None) -> None:
        """Run every unit (in any order, possibly in parallel); raise on the first failure.

        `on_progress` hears how far running units have got, in the caller's thread."""

    def close(self) -> None: ...
