"""Re-shard/export of a ~1.2B Llama-shaped bf16 checkpoint: loadgraph vs transformers.

Baseline: from_pretrained(src) + save_pretrained(out, max_shard_size). loadgraph: `loadgraph
build` (cold cache: hashes, fetches, inspects, exports), then the same build fully cached.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from benchmarks.compare import SHAPE, loadgraph_cmd, run_pair, write_table
from benchmarks.measure import make_checkpoint

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], max_shard_size=sys.argv[3])
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-reshard")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--results", default="benchmarks/results/reshard.md")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    make_checkpoint(work / "src", **SHAPE, max_shard_size="1GB")
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {work / 'src'}}}\nverify: false\nexport: {{path: {work / 'lg-out'}, max_shard_size: 5GB}}\n")
    baseline = [sys.executable, "-c", BASELINE, str(work / "src"), str(work / "hf-out"), "5GB"]
    base, cold, warm = run_pair(baseline, loadgraph_cmd(spec, work / "cache"), [work / "hf-out", work / "cache", work / "lg-out"], args.repeats)
    size = sum(f.stat().st_size for f in (work / "src").glob("*.safetensors")) / 1e9
    write_table(Path(args.results), f"Re-shard 1GB -> 5GB shards, Llama-shaped bf16 (hidden 2048, 16 layers, vocab 128256, {size:.2f} GB)",
                "transformers from_pretrained + save_pretrained", base, cold, warm, args.repeats)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
