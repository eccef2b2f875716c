"""`make demo`: make a tiny model offline, build a spec end to end on an embedded local Ray,
then build again to show every node served from the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SPEC = """\
# Written by `make demo`: fetch, inspect and re-export a tiny Llama in bfloat16.
source:
  model: ./model
dtype: bfloat16
export:
  path: ./out/tiny-llama-bf16
  max_shard_size: 100KB
"""


def _run(*args: str) -> None:
    print(f"\n$ loadgraph {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "loadgraph.cli", *args])
    print(f"(exit {code}, {time.perf_counter() - t0:.1f}s)", flush=True)
    if code:
        raise SystemExit(code)


def main() -> None:
    from loadgraph.testing import make_tiny_model

    root = Path(".demo").absolute()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["LOADGRAPH_CACHE"] = str(root / "cache")
    print(f"making a tiny sharded Llama checkpoint in {root / 'model'}", flush=True)
    make_tiny_model("llama", root / "model", dtype="float32")
    spec = root / "spec.yaml"
    spec.write_text(SPEC)
    os.chdir(root)
    _run("plan", "spec.yaml")
    _run("build", "spec.yaml", "--json", "report.json")  # Ray executor, embedded local instance
    _run("build", "spec.yaml")  # every node cached: answers without starting Ray
    _run("inspect", "out/tiny-llama-bf16")
    print(f"\nexported checkpoint: {root / 'out' / 'tiny-llama-bf16'} (loads with AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    main()
