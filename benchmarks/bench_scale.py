"""Merge + NF4 quantize + export of a large Llama-shaped bf16 model through the Ray executor on
1..N GPUs, with PEFT merge_and_unload + transformers BitsAndBytesConfig + save_pretrained beside it.

70B on 8 GPUs (issue 8) is one command on an 8-GPU host:
  python -m benchmarks.bench_scale --hidden 8192 --layers 80 --intermediate 28672 --vocab 128256 \
      --heads 64 --kv-heads 8 --gpus 1,2,4,8 --no-baseline-if-over 400
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

from benchmarks.bench_merge import MAKE_ADAPTER, PROJECTIONS
from benchmarks.measure import make_checkpoint, measure

BASELINE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
base, adapter, tmp, out = sys.argv[1:5]
m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(m, adapter).merge_and_unload().save_pretrained(tmp)
del m
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
AutoModelForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cuda:0", dtype=torch.bfloat16).save_pretrained(out)
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-scale")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--results", default="benchmarks/results/scale.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    make_checkpoint(work / "base", hidden_size=args.hidden, num_layers=args.layers, intermediate_size=args.intermediate,
                    vocab_size=args.vocab, num_heads=args.heads, num_kv_heads=args.kv_heads, dtype="bfloat16", max_shard_size="5GB")
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    print(f"made {size / 1e9:.1f} GB base + adapter in {time.perf_counter() - t0:.0f}s", flush=True)
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {work / 'base'}}}\ndtype: bfloat16\nadapters: [{{path: {work / 'adapter'}}}]\n"
                    f"quantize: {{method: bnb-nf4, double_quant: true, backend: cuda}}\nverify: false\nexport: {{path: {work / 'lg-out'}}}\n")
    rows = []
    for gpus in [int(g) for g in args.gpus.split(",")]:
        shutil.rmtree(work / "cache", ignore_errors=True)
        shutil.rmtree(work / "lg-out", ignore_errors=True)
        report_file = work / f"report-{gpus}.json"
        with open(report_file, "w") as f:
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "benchmarks.ray_build", str(spec), str(work / "cache"), str(gpus)], stdout=f)
            wall = time.perf_counter() - t
        if proc.returncode:
            raise SystemExit(f"build on {gpus} GPU(s) failed")
        report = json.loads(report_file.read_text().strip().splitlines()[-1])
        stages = {n["stage"] + ("" if n["stage"] != "fetch" else str(i)): round(n["seconds"], 1) for i, n in enumerate(report["nodes"])}
        moved = sum(n["bytes"] for n in report["nodes"]) + sum(f.stat().st_size for f in (work / "cache" / "objects").rglob("*.safetensors") if f.stat().st_nlink == 1)
        rows.append((gpus, wall, stages, moved))
        print(f"{gpus} GPU(s): {wall:.1f}s {stages}", flush=True)
    base_row = None
    if args.baseline:
        m = measure([sys.executable, "-c", BASELINE, str(work / "base"), str(work / "adapter"), str(work / "peft-merged"), str(work / "hf-out")], quiet=False)
        base_row = m
    lines = [f"Merge (r=16, 7 projections) + NF4 (double quant, CUDA) + export, Llama-shaped bf16 (hidden {args.hidden}, {args.layers} layers, {size / 1e9:.1f} GB), Ray executor, {os.cpu_count()} CPU cores.",
             "", "| GPUs | wall s | speed-up | stage seconds | GB moved |", "|---|---|---|---|---|"]
    for gpus, wall, stages, moved in rows:
        lines.append(f"| {gpus} | {wall:.1f} | {rows[0][1] / wall:.2f}x | {stages} | {moved / 1e9:.1f} |")
    if base_row:
        lines += ["", f"PEFT merge_and_unload + save_pretrained + from_pretrained(BitsAndBytesConfig, cuda) + save_pretrained: {base_row.seconds:.1f} s, peak RSS {base_row.peak_rss_gib:.1f} GiB (exit {base_row.returncode})."]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
