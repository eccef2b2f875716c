"""Chaos report: runs the tests/chaos suite (the faults and hostile inputs it injects are the
measurement) and writes the table the README quotes to benchmarks/results/chaos.md (+ .json).

    .venv/bin/python -m benchmarks.bench_chaos

Each test records what it injected through chaoslib.TALLY (LOADGRAPH_CHAOS_TALLY); a failing
test fails this script. Columns: faults injected; runs (loadgraph processes or builds); failed
runs (non-zero exit: the expected effect of a kill, ENOSPC or a refused input); artifacts lost
(an export differing from the uninterrupted build's bytes, or a cache entry failing
`cache verify`: must be 0); bad inputs tried; crashes (anything but loadgraph's own error, exit
1/2, or the injected SIGKILL: must be 0).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = [
    "kill -9 (local executor)",
    "kill -9 while replacing an export",
    "Ray worker killed mid-unit",
    "Ray driver killed / disk full under Ray",
    "concurrent builders (processes)",
    "two specs, one export path",
    "gc beside running builds",
    "cache tampering",
    "final artifact / export tampered (size+mtime kept)",
    "disk full (ENOSPC)",
    "user's files (mode, links, overlap)",
    "read-only and group-shared cache",
    "hostile input",
    "fuzz: header + index parser",
]
COLUMNS = ["faults", "runs", "failed_runs", "lost", "bad_inputs", "crashes"]
HEADERS = ["faults injected", "runs", "failed runs (expected)", "artifacts lost", "bad inputs tried", "crashes"]
COMMAND = "HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled .venv/bin/python -m pytest -q tests/chaos"


def run_suite(extra: list[str]) -> tuple[int, float, dict[str, dict], str]:
    with tempfile.TemporaryDirectory() as tmp:
        tally = Path(tmp) / "tally.jsonl"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
               "RAY_USAGE_STATS_ENABLED": "0", "LOADGRAPH_CHAOS_TALLY": str(tally)}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/chaos", *extra],
                              cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        rows: dict[str, dict] = {}
        if tally.exists():
            for line in tally.read_text().splitlines():
                rec = json.loads(line)
                row = rows.setdefault(rec.pop("row"), dict.fromkeys(COLUMNS, 0))
                for k, v in rec.items():
                    row[k] += v
    summary = next((line for line in reversed(proc.stdout.splitlines()) if " in " in line and ("passed" in line or "failed" in line)), "")
    return proc.returncode, seconds, rows, summary or proc.stdout[-2000:]


def render(rows: dict[str, dict], seconds: float, summary: str) -> str:
    names = [r for r in ORDER if r in rows] + sorted(set(rows) - set(ORDER))
    total = {c: sum(rows[n][c] for n in names) for c in COLUMNS}
    lines = [
        f"Chaos suite (tests/chaos), {platform.machine()} {os.cpu_count()}-core CPU machine, local executor unless named; "
        f"{summary.strip()}, {seconds:.0f} s wall.",
        "",
        "| fault class | " + " | ".join(HEADERS) + " |",
        "|---|" + "---|" * len(HEADERS),
    ]
    for n in names + ["total"]:
        row = total if n == "total" else rows[n]
        label = f"**{n}**" if n == "total" else n
        lines.append(f"| {label} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    lines += [
        "",
        "Artifacts lost: an export that differs from an uninterrupted build's bytes, or a cache entry failing "
        "`cache verify`. Crashes: any exit but 0, loadgraph's own error (1 or 2) or the injected SIGKILL, or a traceback. "
        "A node removed mid-build under Ray is covered by tests/test_ray_cluster.py (not counted here).",
        "",
        f"Command: `.venv/bin/python -m benchmarks.bench_chaos` (runs `{COMMAND}` and tallies what it injected).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    rc, seconds, rows, summary = run_suite(list(argv or []))
    text = render(rows, seconds, summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.md").write_text(text)
    (RESULTS / "chaos.json").write_text(json.dumps({"seconds": seconds, "summary": summary, "rows": rows, "exit_code": rc}, indent=2))
    print(text)
    lost = sum(r["lost"] for r in rows.values())
    crashes = sum(r["crashes"] for r in rows.values())
    if rc != 0 or lost or crashes:
        raise SystemExit(f"chaos suite failed (pytest exit {rc}, {lost} artifacts lost, {crashes} crashes)")


if __name__ == "__main__":
    main(sys.argv[1:])
