"""Re-shard/export of a ~1.2B Llama-shaped bf16 checkpoint: loadgraph vs transformers.

Baseline: AutoModelForCausalLM.from_pretrained(src) + save_pretrained(out, max_shard_size).
loadgraph: `loadgraph build` (local executor, cold cache: hashes, fetches, inspects, exports),
then the same build again fully cached. Same machine, same run, same source files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks.measure import make_checkpoint, measure, median

REPEATS = 3

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2], max_shard_size=sys.argv[3])
"""


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/loadgraph-bench-reshard")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--src-shard", default="1GB")
    ap.add_argument("--out-shard", default="5GB")
    ap.add_argument("--results", default="benchmarks/results/reshard.md")
    args = ap.parse_args(argv)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    # In a child process: ru_maxrss survives exec, so a big parent would inflate every child's peak.
    make_checkpoint(src, hidden_size=args.hidden, num_layers=args.layers, intermediate_size=args.intermediate,
                    vocab_size=args.vocab, num_heads=32, num_kv_heads=8, dtype="bfloat16", max_shard_size=args.src_shard)
    size_gb = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9
    spec = work / "spec.yaml"
    spec.write_text(f"source: {{model: {src}}}\nverify: false\nexport: {{path: {work / 'lg-out'}, max_shard_size: {args.out_shard}}}\n")
    cache = work / "cache"

    lg = [sys.executable, "-m", "loadgraph.cli", "build", str(spec), "--executor", "local", "--cache", str(cache)]
    base_runs, cold_runs = [], []
    for _ in range(REPEATS):  # alternate, fresh outputs each time; report the median
        shutil.rmtree(work / "hf-out", ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(work / "lg-out", ignore_errors=True)
        base_runs.append(measure([sys.executable, "-c", BASELINE, str(src), str(work / "hf-out"), args.out_shard]))
        cold_runs.append(measure(lg))
    base, cold = median(base_runs), median(cold_runs)
    warm = measure(lg)
    for m in (base, cold, warm):
        assert m.returncode == 0, m
    rows = {
        "checkpoint": f"Llama-shaped bf16, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {size_gb:.2f} GB, shards {args.src_shard} -> {args.out_shard}",
        "baseline": {"seconds": base.seconds, "peak_rss_gib": base.peak_rss_gib},
        "loadgraph_cold": {"seconds": cold.seconds, "peak_rss_gib": cold.peak_rss_gib},
        "loadgraph_cached": {"seconds": warm.seconds, "peak_rss_gib": warm.peak_rss_gib},
    }
    table = "\n".join([
        f"Re-shard/export, {rows['checkpoint']} (2-core CPU machine, page cache warm, median of {REPEATS} alternating runs).",
        "",
        "| run | wall s | peak RSS GiB | time ratio | RSS ratio |",
        "|---|---|---|---|---|",
        f"| transformers from_pretrained + save_pretrained | {base.seconds:.1f} | {base.peak_rss_gib:.2f} | 1.00 | 1.00 |",
        f"| loadgraph build (cold cache, local executor) | {cold.seconds:.1f} | {cold.peak_rss_gib:.2f} | {cold.seconds / base.seconds:.2f} | {cold.peak_rss_gib / base.peak_rss_gib:.2f} |",
        f"| loadgraph build (fully cached, no Ray) | {warm.seconds:.2f} | {warm.peak_rss_gib:.2f} | {warm.seconds / base.seconds:.2f} | {warm.peak_rss_gib / base.peak_rss_gib:.2f} |",
        "",
    ])
    Path(args.results).write_text(table)
    Path(args.results).with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(table)
    shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
