"""In-process executor: units run one after another in this process (tests, debugging, tiny models)."""

from __future__ import annotations

import os
import socket

from loadgraph.pipeline.executors.base import OnProgress, OnResult
from loadgraph.pipeline.stage import Unit
from loadgraph.pipeline.units import execute_unit, unit_dict


class LocalExecutor:
    name = "local"

    def run_units(self, cache_root: str, desc: dict, units: list[Unit], on_result: OnResult, on_progress: OnProgress | None = None) -> None:
        here = {"node_id": None, "ip": None, "host": socket.gethostname(), "pid": os.getpid()}  # in this process, no Ray node
        for unit in units:
            progress = (lambda fraction, unit=unit: on_progress(unit, fraction)) if on_progress else None
            on_result(unit, {**execute_unit(cache_root, desc, unit_dict(unit), progress), "ran_on": here})

    def close(self) -> None:
        pass
