"""Run a command as a child process and report its wall time and peak RSS (from wait4)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass


@dataclass
class Measurement:
    seconds: float
    peak_rss_gib: float
    returncode: int


def measure(cmd: list[str], env: dict | None = None, quiet: bool = True) -> Measurement:
    """ru_maxrss of the child itself (KiB on Linux): grandchildren such as Ray workers are not
    in it, which is why benchmarks that compare memory use the in-process executor."""
    out = subprocess.DEVNULL if quiet else None
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(seconds, usage.ru_maxrss / 2**20, proc.returncode)


def drop_page_cache_hint() -> str:
    return "page cache warm for both (each run reads files the previous one just wrote)"
