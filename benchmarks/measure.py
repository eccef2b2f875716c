"""Run a command as a child process and report its wall time and peak RSS (from wait4)."""

from __future__ import annotations

import os
import subprocess
import sys
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
    subprocess.run(["sync"], check=False)  # earlier runs' dirty pages must not be flushed on this run's clock
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Measurement(seconds, usage.ru_maxrss / 2**20, proc.returncode)


def median(runs: list[Measurement]) -> Measurement:
    ordered = sorted(runs, key=lambda m: m.seconds)
    mid = ordered[len(ordered) // 2]
    return Measurement(mid.seconds, sorted(m.peak_rss_gib for m in runs)[len(runs) // 2], max(m.returncode for m in runs))


def make_checkpoint(out, **kwargs) -> None:
    """loadgraph.testing.make_llama_checkpoint in a child process (keeps the parent small)."""
    code = f"from loadgraph.testing import make_llama_checkpoint as m; m({str(out)!r}, **{kwargs!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run(["sync"], check=False)
