"""~1.2B Llama-shaped bf16 to bnb nf4: loadgraph vs transformers from_pretrained(BitsAndBytesConfig)
+ save_pretrained, on the CPU (bitsandbytes 0.50 quantizes on CPU), same files, same run."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from benchmarks.compare import add_shape_args, loadgraph_cmd, run_pair, shape_from, write_table
from benchmarks.measure import make_checkpoint

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=q, device_map=sys.argv[3], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2])
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-quantize")
    ap.add_argument("--repeats", type=int, default=1)
    add_shape_args(ap)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the backend of both sides)")
    ap.add_argument("--executor", default="local")
    ap.add_argument("--results", default="benchmarks/results/quantize.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    shape = shape_from(args)
    make_checkpoint(work / "base", **shape, max_shard_size="2GB")
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {work / 'base'}}}\ndtype: bfloat16\nquantize: {{method: bnb-nf4, double_quant: true, backend: {args.device}}}\n"
                    f"verify: false\nexport: {{path: {work / 'lg-out'}}}\n")
    baseline = [sys.executable, "-c", BASELINE, str(work / "base"), str(work / "hf-out"), args.device]
    base, cold, warm = run_pair(baseline, loadgraph_cmd(spec, work / "cache", args.executor), [work / "hf-out", work / "cache", work / "lg-out"], args.repeats)
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors"))
    title = f"bf16 -> nf4 (double quant) on {args.device}, Llama-shaped (hidden {args.hidden}, {args.layers} layers, {size / 1e9:.2f} GB of bf16)"
    write_table(Path(args.results), title, "transformers from_pretrained(BitsAndBytesConfig) + save_pretrained", base, cold, warm, args.repeats, args.executor)
    with open(args.results, "a") as f:
        f.write(f"\nloadgraph throughput: {size / cold.seconds / 1e9:.2f} GB/s of bf16 input (whole build, cold).\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
