"""Content digests of source files, memoised by (path, size, mtime, inode).

A source's key is the digest of its content, never its path; hashing 100 GB on every
`plan` would be unusable, so a file whose stat is unchanged reuses its recorded sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

from loadgraph.formats.safetensors import sha256_file


def _stat_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def hash_files(paths: dict[str, Path], cache_root: Path) -> dict[str, str]:
    """relname -> sha256 for each file, reusing digests of files whose stat is unchanged."""
    store = cache_root / "statcache.json"
    with FileLock(str(cache_root / "locks" / "statcache.lock")):
        try:
            memo: dict[str, dict] = json.loads(store.read_text())
        except (OSError, ValueError):
            memo = {}
        out: dict[str, str] = {}
        dirty = False
        for rel, path in paths.items():
            real = str(path.resolve())
            stat_id = _stat_id(path)
            hit = memo.get(real)
            if hit and hit["stat"] == stat_id:
                out[rel] = hit["sha256"]
                continue
            out[rel] = sha256_file(path)
            memo[real] = {"stat": stat_id, "sha256": out[rel]}
            dirty = True
        if dirty:
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, store)
    return out

