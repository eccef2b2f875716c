"""How far a running unit has got, from the unit to whoever drives the build.

A stage reports the fraction of its unit done as it writes (`NodeContext.progress`). In-process
that goes straight to the reporter. In a Ray worker it is written, at most every PERIOD_S, to a
small file beside the node's finished units in the cache (which every node reaches); the driver
reads those files while it waits for results. No actor and no object-store traffic: a progress
channel must not be one more thing that can fail a build.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Callable

from loadgraph import faults

PERIOD_S = 0.25
ProgressFn = Callable[[float], None]


def ignore(fraction: float) -> None:
    """The default for stages run without anyone watching (tests, the loader)."""


class Throttled:
    """Passes on at most one report per `period` seconds, and always the last one (1.0)."""

    def __init__(self, emit: ProgressFn, period: float = PERIOD_S):
        self.emit = emit
        self.period = period
        self.last = 0.0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if fraction >= 1.0 or now - self.last >= self.period:
            self.last = now
            self.emit(min(max(fraction, 0.0), 1.0))
        faults.progress_reported()


def progress_file(cache_root: str | os.PathLike, key: str, unit_id: str) -> Path:
    # Under units/<key>/, so the node's drop_units() removes it with the finished units.
    from loadgraph.pipeline.objstore import local_root

    return local_root(cache_root) / "units" / key / f".progress-{unit_id}"


def file_reporter(cache_root: str, key: str, unit_id: str) -> ProgressFn:
    path = progress_file(cache_root, key, unit_id)

    def write(fraction: float) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(f"{fraction:.4f}")
            os.replace(tmp, path)  # the driver reads a whole number or none
        except OSError:
            pass  # progress is a nicety: a full or read-only disk must not fail the unit here

    return Throttled(write)


def read_progress(cache_root: str, key: str, unit_id: str) -> float | None:
    try:
        return float(progress_file(cache_root, key, unit_id).read_text())
    except (OSError, ValueError):
        return None
