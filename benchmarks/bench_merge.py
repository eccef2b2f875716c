"""LoRA merge + export of a ~1.2B Llama-shaped bf16 base, r=16 on all 7 projections:
loadgraph vs PEFT from_pretrained -> merge_and_unload -> save_pretrained (same files, same run)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.compare import add_shape_args, loadgraph_cmd, run_pair, shape_from, write_table
from benchmarks.measure import make_checkpoint

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASELINE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload()
m.save_pretrained(sys.argv[3])
"""
# A random r=16 adapter written directly from the base's shapes (PEFT's own init on a 1.2B model
# would cost more than the benchmark): the names and config are PEFT's.
MAKE_ADAPTER = """
import json, sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out, r = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(int(sys.argv[5]) if len(sys.argv) > 5 else 0)  # another seed: the adapter retrained
tensors = {}
for f in sorted(base.glob("*.safetensors")):
    with safe_open(str(f), "pt") as h:
        for name in h.keys():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and module.split(".")[-1] in sys.argv[4].split(","):
                o, i = h.get_slice(name).get_shape()
                tensors[f"base_model.model.{module}.lora_A.weight"] = (torch.randn(r, i, generator=g) * 0.01).bfloat16()
                tensors[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(o, r, generator=g) * 0.01).bfloat16()
save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
(out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32,
    "target_modules": sys.argv[4].split(","), "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": str(base)}))
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-merge")
    ap.add_argument("--repeats", type=int, default=1)
    add_shape_args(ap)
    ap.add_argument("--executor", default="local")
    ap.add_argument("--results", default="benchmarks/results/merge.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    shape = shape_from(args)
    make_checkpoint(work / "base", **shape, max_shard_size="5GB")
    subprocess.run([sys.executable, "-c", MAKE_ADAPTER, str(work / "base"), str(work / "adapter"), "16", ",".join(PROJECTIONS)], check=True)
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {work / 'base'}}}\ndtype: bfloat16\nadapters: [{{path: {work / 'adapter'}}}]\n"
                    f"verify: false\nexport: {{path: {work / 'lg-out'}}}\n")
    baseline = [sys.executable, "-c", BASELINE, str(work / "base"), str(work / "adapter"), str(work / "peft-out")]
    base, cold, warm = run_pair(baseline, loadgraph_cmd(spec, work / "cache", args.executor), [work / "peft-out", work / "cache", work / "lg-out"], args.repeats)
    size = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 1e9
    write_table(Path(args.results), f"LoRA r=16 on all 7 projections, merge + export, Llama-shaped bf16 (hidden {args.hidden}, {args.layers} layers, {size:.2f} GB)",
                "PEFT from_pretrained + merge_and_unload + save_pretrained", base, cold, warm, args.repeats, args.executor)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
