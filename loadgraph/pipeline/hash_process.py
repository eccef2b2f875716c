"""Plan-time hashing of a local build's sources in a child process (hashing.hashed_by).

A cold build hashes its sources (1 s for a 7B on 16 cores) and then imports torch and
transformers for its checks (4-6 s, holding the GIL). Hashing threads in this process would wait
for the GIL between every buffer while an import runs beside them; a child process has its own
interpreter, so the command imports on a thread (`while_hashing`) for as long as the child hashes:
7B builds on 16 cores ended 2 s sooner (benchmarks/results/device/fast-7b-cuda-overlap.md); on 2
cores, where the cores themselves are the limit, the gain was within the machine's noise. Small
sources (hashed in a fraction of a second) stay here: a child costs about 0.2 s to start.

    python -m loadgraph.pipeline.hash_process < paths.json > records.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from loadgraph.pipeline.hashing import hash_paths

# Below this many bytes a child's start costs more than the overlap it buys.
PROCESS_MIN = 256 << 20
PROCESS_MIN_ENV = "LOADGRAPH_HASH_PROCESS_MIN"


def worth_a_child(nbytes: int) -> bool:
    """Whether work on `nbytes` of sources lasts long enough to pay a child's start (and the imports beside it)."""
    return nbytes >= int(os.environ.get(PROCESS_MIN_ENV) or PROCESS_MIN)


def process_hasher(while_hashing: Callable[[], None]) -> Callable[[list[str]], list[dict]]:
    """For hashing.hashed_by: big sources hashed by a child process; `while_hashing()` is called
    first (it starts what this process does meanwhile) whenever a child is started."""

    def hash_in_child(paths: list[str]) -> list[dict]:
        if not worth_a_child(sum(Path(p).stat().st_size for p in paths)):
            return hash_paths(paths)
        while_hashing()
        try:
            child = subprocess.run([sys.executable, "-m", __name__], input=json.dumps(paths), capture_output=True, text=True, check=False)
            if child.returncode == 0:
                records = json.loads(child.stdout)
                if isinstance(records, list) and len(records) == len(paths):
                    return records
        except (OSError, ValueError):
            pass
        # A file the child could not read fails here, with the error a plan in one process gives.
        return hash_paths(paths)

    return hash_in_child


if __name__ == "__main__":
    json.dump(hash_paths(json.load(sys.stdin)), sys.stdout)
