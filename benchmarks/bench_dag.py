"""A 3-target matrix on a 3-node Ray cluster (1 CPU each): does the build take its longest chain?

Every unit sleeps `--unit-s` seconds (LOADGRAPH_FAULT=slow-units, set in the nodes' environment),
so the figure is mostly the schedule's, not this machine's speed. Same run, cold cache each time,
after one unmeasured warm-up build (Ray's first job on a fresh cluster starts slower):
- one target built alone (the three are alike);
- the matrix with one node at a time (LOADGRAPH_RAY_NODES=1, how builds ran before): its node
  times, each measured with nothing else running, give the longest chain through the DAG;
- the matrix with nodes run as soon as their inputs are built (the default).
The target: the matrix within 1.2x its longest chain.

    python -m benchmarks.bench_dag [--unit-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.measure import write_results

CLUSTER = Path(__file__).resolve().parents[1] / "clusters" / "local" / "cluster.py"


def _fixtures(work: Path) -> tuple[Path, list[Path]]:
    from loadgraph.testing import make_lora_adapter, make_tiny_model

    base = make_tiny_model("llama", work / "base", dtype="bfloat16")
    return base, [make_lora_adapter(base, work / f"lora-{i}", r=4, seed=i) for i in range(3)]


def _spec(path: Path, base: Path, adapters: list[Path], out: Path) -> Path:
    doc = {"matrix": {"source": {"model": str(base)}, "adapters": [{"path": str(a)} for a in adapters],
                      "export": {"path": str(out / "{name}")}}}
    path.write_text(json.dumps(doc))  # YAML is a superset of JSON
    return path


def _build(spec: Path, work: Path, env: dict, tag: str) -> dict:
    cache, out, report = work / f"cache-{tag}", work / f"out-{tag}", work / f"{tag}.json"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "loadgraph.cli", "build", str(spec), "--executor", "ray", "--cache", str(cache),
                           "--json", str(report)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: loadgraph build failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    doc = json.loads(report.read_text())
    built = [n for n in doc["nodes"] if n["status"] == "built"]
    return {"wall_s": round(wall, 2), "build_s": round(doc["seconds"], 2), "nodes_built": len(built),
            "node_seconds_sum": round(sum(n["seconds"] for n in built), 2), "units": sum(n["units_total"] for n in built),
            "node_span_s": round(max(n["ended"] for n in built) - min(n["started"] for n in built), 2),
            "timeline": [{"stage": n["stage"], "labels": n["labels"], "start": round(n["started"], 3), "end": round(n["ended"], 3)} for n in built]}


def _longest_chain(report: Path) -> float:
    """The DAG's longest path, weighted by each node's time in a one-node-at-a-time build."""
    doc = json.loads(report.read_text())
    seconds = {n["key"]: n["seconds"] for n in doc["nodes"]}
    inputs = {n["key"]: n.get("inputs", []) for n in doc["nodes"]}
    finish: dict[str, float] = {}
    for key in seconds:  # the report lists nodes in topological order
        finish[key] = seconds[key] + max((finish[k] for k in inputs[key] if k in finish), default=0.0)
    return max(finish.values())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-dag")
    ap.add_argument("--unit-s", type=float, default=5.0)
    ap.add_argument("--results", default="benchmarks/results/dag.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from benchmarks.bench_fast import _cache_bytecode

    bytecode = _cache_bytecode(work)  # before the cluster starts: its workers inherit it
    base, adapters = _fixtures(work)
    matrix = _spec(work / "matrix.yaml", base, adapters, work / "out")
    alone = [_spec(work / f"alone-{i}.yaml", base, [a], work / "out") for i, a in enumerate(adapters)]
    node_env = {**os.environ, "LOADGRAPH_FAULT": f"slow-units:{args.unit_s}", "RAY_AUTH_MODE": "disabled"}
    cluster_dir = work / "cluster"
    up = subprocess.run([sys.executable, str(CLUSTER), "up", "--dir", str(cluster_dir), "--workers", "2", "--cpus-per-node", "1"],
                        env=node_env, capture_output=True, text=True)
    if up.returncode != 0:
        raise SystemExit(f"cluster up failed: {up.stderr.strip()[-500:]}")
    address = next(line.split("=", 1)[1] for line in up.stdout.splitlines() if line.startswith("export RAY_ADDRESS="))
    env = {**os.environ, "RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled"}
    try:
        _build(alone[1], work, env, "warm-up")
        runs = {"target 0 alone": _build(alone[0], work, env, "alone0")}
        runs["matrix, one node at a time"] = _build(matrix, work, {**env, "LOADGRAPH_RAY_NODES": "1"}, "serial")
        runs["matrix, concurrent nodes"] = _build(matrix, work, env, "concurrent")
    finally:
        subprocess.run([sys.executable, str(CLUSTER), "down", "--dir", str(cluster_dir)], capture_output=True)
    chain = _longest_chain(work / "serial.json")
    lines = [
        f"3-target matrix (tiny Llama bf16, 3 LoRA adapters merged, verify on, export) on a 3-node Ray cluster of 1 CPU each "
        f"(clusters/local/cluster.py), every unit sleeping {args.unit_s:g} s; cold cache each run. Longest chain through the DAG, from the "
        f"one-node-at-a-time build's node times: {chain:.1f} s.",
        "",
        "| build | build s | x target alone | first node start to last node end, s | x longest chain | nodes built | units | sum of node s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    alone_s = runs["target 0 alone"]["build_s"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['build_s']:.1f} | {r['build_s'] / alone_s:.2f} | {r['node_span_s']:.1f} | {r['node_span_s'] / chain:.2f} | "
                     f"{r['nodes_built']} | {r['units']} | {r['node_seconds_sum']:.1f} |")
    lines += ["", "Target: the matrix within 1.2x its longest chain. build s is the report's (checks, Ray connect and publishing included); "
              f"{os.cpu_count()} cores on the machine{bytecode}.", ""]
    table = "\n".join(lines)
    write_results(args.results, table, {"unit_s": args.unit_s, "longest_chain_s": chain, "runs": runs})
    shutil.rmtree(work, ignore_errors=True)
    return runs


if __name__ == "__main__":
    main()
