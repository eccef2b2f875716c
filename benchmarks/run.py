"""`make bench`: every benchmark, each comparing loadgraph with its baseline in one run."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ["benchmarks.bench_fast", "benchmarks.bench_memo", "benchmarks.bench_reshard", "benchmarks.bench_merge", "benchmarks.bench_quantize", "benchmarks.bench_ray", "benchmarks.bench_dag", "benchmarks.bench_driver", "benchmarks.bench_chaos"]


def main() -> None:
    only = sys.argv[1:]
    for name in BENCHMARKS:
        if only and not any(o in name for o in only):
            continue
        print(f"== {name}", flush=True)
        importlib.import_module(name).main([])
    importlib.import_module("benchmarks.readme").main()


if __name__ == "__main__":
    main()
