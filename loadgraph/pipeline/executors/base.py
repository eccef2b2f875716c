"""The executor interface: run a node's units somewhere, report each result as it lands."""

from __future__ import annotations

from typing import Callable, Protocol

from loadgraph.pipeline.stage import Unit

OnResult = Callable[[Unit, dict], None]


class Executor(Protocol):
    name: str

    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult) -> None:
        """Run every unit (in any order, possibly in parallel); raise on the first failure."""

    def close(self) -> None: ...
