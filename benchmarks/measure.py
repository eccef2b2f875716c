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


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Ray's GCS, raylet and workers too)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def measure(cmd: list[str], env: dict | None = None, quiet: bool = True, period: float = 0.05) -> Measurement:
    """Wall time and peak RSS of the whole process tree the command starts (sampled every
    `period` s, and never below the child's own ru_maxrss from wait4)."""
    import threading

    import resource

    out = subprocess.DEVNULL if quiet else None
    subprocess.run(["sync"], check=False)  # earlier runs' dirty pages must not be flushed on this run's clock
    # A forked child's ru_maxrss starts from this process's own high-water mark (Linux copies it with
    # the address space and keeps it across exec): once this process has compared two outputs, every
    # child would report at least that. Then only the sampled peak of the tree counts.
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out, stderr=out)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(period)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    own = usage.ru_maxrss * 1024
    return Measurement(seconds, max(peak[0], own if own > inherited else 0) / 2**30, proc.returncode)


def median(runs: list[Measurement]) -> Measurement:
    ordered = sorted(runs, key=lambda m: m.seconds)
    mid = ordered[len(ordered) // 2]
    return Measurement(mid.seconds, sorted(m.peak_rss_gib for m in runs)[len(runs) // 2], max(m.returncode for m in runs))


def make_checkpoint(out, **kwargs) -> None:
    """loadgraph.testing.make_llama_checkpoint in a child process (keeps the parent small)."""
    code = f"from loadgraph.testing import make_llama_checkpoint as m; m({str(out)!r}, **{kwargs!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    subprocess.run(["sync"], check=False)


def write_results(results, table: str, raw) -> None:
    """The table (quoted in the README) and its raw JSON beside it, then the table on stdout."""
    import json
    from pathlib import Path

    results = Path(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(table)
    results.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    print(table, flush=True)
