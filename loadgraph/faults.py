"""Fault injection for the chaos tests: `LOADGRAPH_FAULT=kill-after-units:N` SIGKILLs the
build process after N freshly computed work units, at a point a real crash could hit."""

from __future__ import annotations

import os
import signal

_count = 0


def unit_finished() -> None:
    global _count
    spec = os.environ.get("LOADGRAPH_FAULT", "")
    if not spec.startswith("kill-after-units:"):
        return
    _count += 1
    if _count >= int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
