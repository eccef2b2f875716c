"""Ray executor overhead: the ~1.2B Llama-shaped LoRA merge + export of bench_merge, built cold
with the local executor and with the Ray executor (embedded local Ray), same files, same run.

The Ray run pays for starting Ray (`ray.init` and worker processes) and for the task round
trips; it gains from running units in parallel (one per core). Peak RSS is the driver's only
(Ray's workers are other processes), so it is not compared here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_merge import MAKE_ADAPTER, PROJECTIONS
from benchmarks.compare import SHAPE
from benchmarks.compare import loadgraph_cmd
from benchmarks.measure import make_checkpoint, measure, write_results


def _run(spec: Path, cache: Path, out: Path, executor: str, report: Path) -> dict:
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    m = measure([*loadgraph_cmd(spec, cache, executor), "--json", str(report)])
    if m.returncode != 0:
        raise SystemExit(f"loadgraph build --executor {executor} failed ({m.returncode})")
    doc = json.loads(report.read_text())
    nodes = {n["stage"]: n for n in doc["nodes"]}
    return {"wall_s": m.seconds, "build_s": doc["seconds"], "merge_s": nodes["merge"]["seconds"], "export_s": nodes["export"]["seconds"],
            "merge_units": nodes["merge"]["units_total"], "export_units": nodes["export"]["units_total"]}


def _median(runs: list[dict]) -> dict:
    return {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-ray")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shard", default="1GB", help="source and export shard size: units are per shard")
    ap.add_argument("--results", default="benchmarks/results/ray.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    make_checkpoint(work / "base", **SHAPE, max_shard_size=args.shard)
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {work / 'base'}}}\ndtype: bfloat16\nadapters: [{{path: {work / 'adapter'}}}]\n"
                    f"verify: false\nexport: {{path: {work / 'out'}, max_shard_size: {args.shard}}}\n")
    runs: dict[str, list[dict]] = {"local": [], "ray": []}
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits both alike
        for executor in runs:
            runs[executor].append(_run(spec, work / "cache", work / "out", executor, work / f"{executor}.json"))
    local, ray_ = _median(runs["local"]), _median(runs["ray"])
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e9
    lines = [
        f"LoRA r=16 merge + export, Llama-shaped bf16 ({size:.2f} GB, {local['merge_units']} merge units, {local['export_units']} export units), "
        f"cold cache, local vs Ray executor (embedded Ray), 2-core CPU machine, median of {args.repeats} alternating runs.",
        "",
        "| executor | wall s (process) | build s (report) | merge node s | export node s | wall ratio |",
        "|---|---|---|---|---|---|",
        f"| local | {local['wall_s']:.1f} | {local['build_s']:.1f} | {local['merge_s']:.1f} | {local['export_s']:.1f} | 1.00 |",
        f"| ray | {ray_['wall_s']:.1f} | {ray_['build_s']:.1f} | {ray_['merge_s']:.1f} | {ray_['export_s']:.1f} | {ray_['wall_s'] / local['wall_s']:.2f} |",
        "",
        "build s includes starting the executor (ray.init for Ray); node s is the node's own time.",
        "",
    ]
    table = "\n".join(lines)
    write_results(args.results, table, {"local": runs["local"], "ray": runs["ray"]})
    shutil.rmtree(work, ignore_errors=True)
    return {"local": local, "ray": ray_}


if __name__ == "__main__":
    main(sys.argv[1:])
