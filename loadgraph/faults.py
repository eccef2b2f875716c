"""Fault injection for the chaos tests (tests/chaos), driven by environment variables.

`LOADGRAPH_FAULT` (one at a time):
  kill-after-units:N   SIGKILL the build process after N freshly computed work units
  kill-in-unit:N       SIGKILL it inside the Nth fresh unit, after its files are written to
                       the staging dir and before they are published (a crash mid-unit)
  enospc-after-bytes:N raise ENOSPC once shard writes in this process pass N bytes
  kill-at-export:N     SIGKILL it at step N of replacing an export (1: staged, before the swap;
                       2: swapped, before the old export is deleted)
  kill-in-upload:N     SIGKILL the process once it has uploaded N objects to an object store
                       (the cache's remote tier or an s3:// export): a crash mid-upload
  kill-checks:1        SIGKILL the checks' child process (pipeline/check_process.py) once its
                       imports are done, before it checks anything
  slow-progress:S      sleep S seconds after every progress report of a unit (so that a test
                       sees a unit's progress arrive while it runs, also from Ray workers)
`LOADGRAPH_UNIT_LOG=FILE` appends "<node key> <unit id> <pid>" for every unit computed (not
reused), so a test can prove that concurrent builders computed each unit once.
"""

from __future__ import annotations

import errno
import os
import signal

_written = 0
_events: dict[str, int] = {}


def _arg(prefix: str) -> int | None:
    spec = os.environ.get("LOADGRAPH_FAULT", "")
    return int(spec.split(":", 1)[1]) if spec.startswith(prefix + ":") else None


def _kill_at(fault: str) -> None:
    """SIGKILL this process at the Nth event of `fault` (LOADGRAPH_FAULT=fault:N)."""
    limit = _arg(fault)
    if limit is None:
        return
    _events[fault] = _events.get(fault, 0) + 1
    if _events[fault] >= limit:
        os.kill(os.getpid(), signal.SIGKILL)


def unit_finished() -> None:
    _kill_at("kill-after-units")


def unit_staged(key: str, unit_id: str) -> None:
    """A unit's files are complete in its staging dir, not yet published."""
    log = os.environ.get("LOADGRAPH_UNIT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:  # O_APPEND: concurrent writers don't interleave lines
            f.write(f"{key} {unit_id} {os.getpid()}\n")
    _kill_at("kill-in-unit")


def wrote(nbytes: int) -> None:
    global _written
    limit = _arg("enospc-after-bytes")
    if limit is None:
        return
    _written += nbytes
    if _written > limit:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def export_step(step: int) -> None:
    """Replacing an export: 1 = the new one is staged, 2 = swapped in, the old one not yet deleted."""
    if _arg("kill-at-export") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def uploaded() -> None:
    _kill_at("kill-in-upload")


def progress_reported() -> None:
    spec = os.environ.get("LOADGRAPH_FAULT", "")
    if spec.startswith("slow-progress:"):
        import time

        time.sleep(float(spec.split(":", 1)[1]))


def checks_child_ready() -> None:
    _kill_at("kill-checks")
