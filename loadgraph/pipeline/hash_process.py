"""Plan-time hashing of a local build's sources in a child process (hashing.hashed_by).

A cold build hashes its sources (1 s for a 7B on 16 cores) and then imports torch and
transformers for its checks (4-6 s, holding the GIL). Hashing threads in this process would wait
for the GIL between every buffer while an import runs beside them, so the overlap came to nothing
on 2 cores; a child process has its own interpreter, so the command imports on a thread
(`while_hashing`) for as long as the child hashes. Small files, and sources hashed in under a
fraction of a second, stay here: a child costs about 0.2 s to start.

    python -m loadgraph.pipeline.hash_process < paths.json > records.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

# Below this many bytes a child's start costs more than the overlap it buys.
PROCESS_MIN = 256 << 20
PROCESS_MIN_ENV = "LOADGRAPH_HASH_PROCESS_MIN"


def _records(paths: list[str]) -> list[dict]:
    from loadgraph.pipeline.hashing import hash_path

    # As hashing.file_records does here: big files are hashed by parallel runs inside one call.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(hash_path, paths))


def process_hasher(while_hashing: Callable[[], None]) -> Callable[[list[str]], list[dict]]:
    """For hashing.hashed_by: big sources hashed by a child process; `while_hashing()` is called
    first (it starts what this process does meanwhile) whenever a child is started."""

    def hash_paths(paths: list[str]) -> list[dict]:
        least = int(os.environ.get(PROCESS_MIN_ENV) or PROCESS_MIN)
        if sum(Path(p).stat().st_size for p in paths) < least:
            return _records(paths)
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
        return _records(paths)

    return hash_paths


if __name__ == "__main__":
    json.dump(_records(json.load(sys.stdin)), sys.stdout)
