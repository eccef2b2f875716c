"""Content digests of source files, memoised by (path, size, mtime, inode).

A source's key is the digest of its content, never its path; hashing 100 GB on every
`plan` would be unusable, so a file whose stat is unchanged reuses its recorded sha256.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from filelock import FileLock

from loadgraph.formats.safetensors import sha256_file


def _stat_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def hash_files(paths: dict[str, Path], cache_root: Path) -> dict[str, str]:
    """relname -> sha256 for each file, reusing digests of files whose stat is unchanged."""
    store = cache_root / "statcache.json"
    lock = FileLock(str(cache_root / "locks" / "statcache.lock"))
    try:
        lock.acquire()
    except OSError:  # a read-only cache (or one we may not write): hash without recording
        lock = None
    try:
        try:
            memo: dict[str, dict] = json.loads(store.read_text())
        except (OSError, ValueError):
            memo = {}
        out: dict[str, str] = {}
        misses: dict[str, tuple[str, list[int]]] = {}
        for rel, path in paths.items():
            real, stat_id = str(path.resolve()), _stat_id(path)
            hit = memo.get(real)
            if hit and hit["stat"] == stat_id:
                out[rel] = hit["sha256"]
            else:
                misses[rel] = (real, stat_id)
        # hashlib releases the GIL on large buffers: one thread per core hashes in parallel.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            digests = dict(zip(misses, pool.map(lambda rel: sha256_file(paths[rel]), misses)))
        for rel, (real, stat_id) in misses.items():
            out[rel] = digests[rel]
            memo[real] = {"stat": stat_id, "sha256": digests[rel]}
        if misses and lock is not None:
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(memo))
                os.replace(tmp, store)
            except OSError:
                pass  # full or read-only: the next plan hashes again
    finally:
        if lock is not None:
            lock.release()
    return out



def stat_matches(path: Path, sha256: str, cache_root: Path) -> bool:
    """True if `path` is provably the file that hashed to `sha256` (stat unchanged since)."""
    try:
        memo = json.loads((cache_root / "statcache.json").read_text())
    except (OSError, ValueError):
        return False
    hit = memo.get(str(path.resolve()))
    return bool(hit) and hit["sha256"] == sha256 and hit["stat"] == _stat_id(path)
