"""verify's cost beside the build it checks: LoRA merge + nf4 (double quant) + export of a
Llama-shaped bf16 base, r=16 on all 7 projections, verify on (per-tensor checks + smoke).

The build runs once with verify on; the table gives the whole build's wall time, the verify
node's seconds (from the build's own JSON report), their ratio, and each check's figures.
`--hidden 4096 --layers 32 --intermediate 11008` is the 7B shape the verify issue names.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_merge import MAKE_ADAPTER, PROJECTIONS
from benchmarks.compare import add_shape_args, loadgraph_cmd, shape_from
from benchmarks.measure import make_checkpoint, measure, write_results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-verify")
    add_shape_args(ap)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--results", default="benchmarks/results/verify.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    make_checkpoint(work / "base", **shape_from(args), max_shard_size="5GB")
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {work / 'base'}}}\nadapters: [{{path: {work / 'adapter'}}}]\n"
                    f"quantize: {{method: bnb-nf4, double_quant: true}}\nexport: {{path: {work / 'out'}}}\n")
    report_path = work / "report.json"
    run = measure(loadgraph_cmd(spec, work / "cache", args.executor) + ["--json", str(report_path)])
    if run.returncode != 0:
        raise SystemExit(f"build failed: {run}")
    report = json.loads(report_path.read_text())
    seconds = {n["stage"]: n["seconds"] for n in report["nodes"]}
    verify = next(n for n in report["nodes"] if n["stage"] == "verify")["details"]["verify"]
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e9
    lines = [
        f"verify of a merge + nf4 (double quant) + export build, Llama-shaped bf16 (hidden {args.hidden}, {args.layers} layers, "
        f"{size:.2f} GB), r=16 LoRA on 7 projections, {args.executor} executor, {os.cpu_count()} cores, default spec (verify on).",
        "",
        "| build wall s | verify s | verify / build | " + " | ".join(f"{k} s" for k in seconds if k != "verify") + " |",
        "|---|---|---|" + "---|" * (len(seconds) - 1),
        f"| {run.seconds:.1f} | {seconds['verify']:.1f} | {seconds['verify'] / run.seconds:.1%} | "
        + " | ".join(f"{v:.1f}" for k, v in seconds.items() if k != "verify") + " |",
        "",
        *[f"- {line}" for line in verify["summary"]],
        "",
    ]
    table = "\n".join(lines)
    write_results(args.results, table, {"build": run.__dict__, "node_seconds": seconds, "verify": verify})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
