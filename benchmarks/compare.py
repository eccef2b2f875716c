"""Side-by-side runs: a baseline command and `loadgraph build` on the same inputs, one table."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from benchmarks.measure import Measurement, measure, median, write_results


# ~1.2B Llama-shaped bf16: the shape the 2-core benchmarks of the issues name.
SHAPE = dict(hidden_size=2048, num_layers=16, intermediate_size=8192, vocab_size=128256, num_heads=32, num_kv_heads=8, dtype="bfloat16")


def add_shape_args(ap) -> None:
    ap.add_argument("--layers", type=int, default=SHAPE["num_layers"])
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden_size"])
    ap.add_argument("--intermediate", type=int, default=SHAPE["intermediate_size"])


def shape_from(args) -> dict:
    """The benchmark shape; hidden >= 4096 means a Llama-2-7B-like model (MHA, 32k vocab)."""
    shape = {**SHAPE, "num_layers": args.layers, "hidden_size": args.hidden, "intermediate_size": args.intermediate}
    if args.hidden >= 4096:
        shape.update(num_heads=32, num_kv_heads=32, vocab_size=32000)
    return shape


def loadgraph_cmd(spec: Path, cache: Path, executor: str = "local") -> list[str]:
    return [sys.executable, "-m", "loadgraph.cli", "build", str(spec), "--executor", executor, "--cache", str(cache)]


def run_pair(baseline: list[str], lg: list[str], fresh: list[Path], repeats: int) -> tuple[Measurement, Measurement, Measurement]:
    """Alternate baseline and cold loadgraph `repeats` times (fresh outputs), then one cached rebuild."""
    base_runs, cold_runs = [], []
    for _ in range(repeats):
        for path in fresh:
            shutil.rmtree(path, ignore_errors=True)
        base_runs.append(measure(baseline))
        cold_runs.append(measure(lg))
    warm = measure(lg)
    for m in base_runs + cold_runs + [warm]:
        if m.returncode != 0:
            raise SystemExit(f"benchmark command failed: {m}")
    return median(base_runs), median(cold_runs), warm


def write_table(results: Path, title: str, baseline_label: str, base: Measurement, cold: Measurement, warm: Measurement, repeats: int,
                executor: str = "local") -> str:
    lines = [
        f"{title} ({os.cpu_count()}-core machine, page cache warm, {'median of %d alternating runs' % repeats if repeats > 1 else 'one run each'}).",
        "",
        "| run | wall s | peak RSS GiB | time ratio | RSS ratio |",
        "|---|---|---|---|---|",
        f"| {baseline_label} | {base.seconds:.1f} | {base.peak_rss_gib:.2f} | 1.00 | 1.00 |",
        f"| loadgraph build (cold cache, {executor} executor) | {cold.seconds:.1f} | {cold.peak_rss_gib:.2f} | {cold.seconds / base.seconds:.2f} | {cold.peak_rss_gib / base.peak_rss_gib:.2f} |",
        f"| loadgraph build (fully cached, no Ray) | {warm.seconds:.2f} | {warm.peak_rss_gib:.2f} | {warm.seconds / base.seconds:.3f} | {warm.peak_rss_gib / base.peak_rss_gib:.2f} |",
        "",
    ]
    table = "\n".join(lines)
    write_results(results, table, {"title": title, "baseline": base.__dict__, "loadgraph_cold": cold.__dict__, "loadgraph_cached": warm.__dict__})
    return table
