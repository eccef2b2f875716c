"""The derived-plans memo's effect (pipeline/derived.py): cold merge + export builds of bench_fast's
1.2B fixture with the memo off (`LOADGRAPH_DERIVED_MEMO=0`: every process derives its plans, as
before the memo) and on, alternating, in one run. Under Ray the checks run in the driver and the
merge units in worker processes: with the memo, the workers load the plans the checks stored
instead of importing transformers and PEFT and building the meta model themselves.

    python -m benchmarks.bench_memo [--executor ray|local] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks.bench_fast import SHAPES, _spec
from benchmarks.bench_merge import MAKE_ADAPTER, PROJECTIONS
from benchmarks.measure import make_checkpoint, measure, write_results


def _build(work: Path, spec: Path, executor: str, memo: bool) -> dict:
    cache, report = work / "cache-memo", work / "report-memo.json"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(work / "lg-out", ignore_errors=True)
    cmd = [sys.executable, "-m", "loadgraph.cli", "build", str(spec), "--executor", executor, "--cache", str(cache), "--json", str(report)]
    m = measure(cmd, env={"LOADGRAPH_DERIVED_MEMO": "1" if memo else "0"})
    if m.returncode != 0:
        raise SystemExit(f"loadgraph build --executor {executor} failed ({m.returncode})")
    doc = json.loads(report.read_text())
    merge = next(n for n in doc["nodes"] if n["stage"] == "merge")
    return {"memo": memo, "wall": m.seconds, "build": doc["seconds"], "merge_node": merge["seconds"], "unit_wall": merge.get("timings", {}).get("wall", 0)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--executor", choices=("ray", "local"), default="ray")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default="/tmp/loadgraph-bench-fast")
    ap.add_argument("--results", default="benchmarks/results/memo.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    if not (work / "base" / "config.json").exists():
        make_checkpoint(work / "base", **SHAPES["1b"], max_shard_size="5GB")
    if not (work / "adapter" / "adapter_config.json").exists():
        import subprocess

        subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
    spec = _spec(work, "merge", "cpu", False)
    runs = [_build(work, spec, args.executor, memo) for _ in range(args.repeats) for memo in (False, True)]
    shutil.rmtree(work / "cache-memo", ignore_errors=True)
    lines = [f"Derived-plans memo off (`LOADGRAPH_DERIVED_MEMO=0`) and on: cold merge + export builds of the 1.2B Llama-shaped bf16 fixture "
             f"(r=16 LoRA on 7 projections), {args.executor} executor, alternating, one run each, this machine.", "",
             "| memo | process wall s | build s (report) | merge node s | merge units' wall s (summed) |", "|---|---|---|---|---|"]
    lines += [f"| {'on' if r['memo'] else 'off'} | {r['wall']:.1f} | {r['build']:.2f} | {r['merge_node']:.2f} | {r['unit_wall']:.2f} |" for r in runs]
    write_results(Path(args.results), "\n".join(lines) + "\n", runs)


if __name__ == "__main__":
    main(sys.argv[1:])
