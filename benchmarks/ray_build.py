"""`python -m benchmarks.ray_build SPEC CACHE NUM_GPUS`: one build on an embedded Ray limited to
NUM_GPUS GPUs (so one machine can measure 1, 2, 4, 8 GPUs); prints the JSON report."""

from __future__ import annotations

import json
import os
import sys

from loadgraph.pipeline.cache import Cache
from loadgraph.pipeline.executors.ray import RayExecutor
from loadgraph.pipeline.graph import compile_specs
from loadgraph.pipeline.runner import build
from loadgraph.spec import load_spec_file


def main() -> None:
    spec, cache_dir, gpus = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = Cache(cache_dir)
    graph = compile_specs(load_spec_file(spec), cache)
    report = build(graph, cache, lambda: RayExecutor(init_kwargs={"num_gpus": gpus, "num_cpus": os.cpu_count()}))
    print(json.dumps(report.to_json()))


if __name__ == "__main__":
    main()
