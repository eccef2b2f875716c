"""Content digests of source files, memoised by (path, size, mtime, inode).

A source's key is the digest of its content, never its path; hashing 100 GB on every `plan`
would be unusable, so a file whose stat is unchanged reuses its recorded digest. Digests are
BLAKE3 (formats/digest.py: a tensor tree for safetensors, with each tensor's digest, so units
can check exactly the bytes they read). A file of a hub snapshot is a link to a blob named by
its LFS sha256: that names its content without reading it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

from filelock import FileLock

from loadgraph.formats import digest

STORE = "statcache.json"
_HUB_BLOB = re.compile(r"^[0-9a-f]{64}$")
# Where files of at least offload.REMOTE_MIN bytes are hashed when set (pipeline/offload.py: Ray
# tasks, so that a plan on the driver reads no weights).
_REMOTE: ContextVar[Callable[[list[str]], list[dict]] | None] = ContextVar("loadgraph_remote_hashing", default=None)


@contextmanager
def hashed_by(remote: Callable[[list[str]], list[dict]] | None) -> Iterator[None]:
    """Within the block, file_records hands big misses to `remote` (paths -> records, in order)."""
    token = _REMOTE.set(remote)
    try:
        yield
    finally:
        _REMOTE.reset(token)


def hash_path(path: str) -> dict:
    """One file's record, by path: what a remote hasher runs where the file is."""
    return _record(Path(path))


def hash_paths(paths: list) -> list[dict]:
    """Records of several files here, in order: a big file is hashed by parallel runs inside its
    one call (formats/digest.py), small ones side by side (the GIL is released while they hash)."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda path: _record(Path(path)), paths))


def _stat_id(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def hub_sha256(path: Path) -> str | None:
    """The LFS sha256 of a hub-cache snapshot file (a link to blobs/<sha256>), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target.name if target.parent.name == "blobs" and _HUB_BLOB.match(target.name) else None


def _record(path: Path) -> dict:
    """{meta: the manifest's file record, tensors: per-tensor digests} of one file."""
    lfs = hub_sha256(path)
    if lfs is not None:
        return {"meta": {"size": path.stat().st_size, "sha256": lfs}, "tensors": {}}
    meta, tensors = digest.file_record(path)
    return {"meta": meta, "tensors": tensors}


def key_digest(record: dict) -> str:
    meta = record["meta"]
    return meta["blake3"] if "blake3" in meta else f"sha256:{meta['sha256']}"


def file_records(paths: dict[str, Path], cache_root: Path) -> dict[str, dict]:
    """relname -> {meta, tensors} for each file, reusing records of files whose stat is unchanged."""
    store = cache_root / STORE
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
        out: dict[str, dict] = {}
        misses: dict[str, tuple[str, list[int]]] = {}
        for rel, path in paths.items():
            real, stat_id = str(path.resolve()), _stat_id(path)
            hit = memo.get(real)
            if hit and hit.get("stat") == stat_id and "meta" in hit:
                out[rel] = hit
            else:
                misses[rel] = (real, stat_id)
        from loadgraph.pipeline.offload import REMOTE_MIN

        remote = _REMOTE.get()
        far = [rel for rel in misses if remote is not None and hub_sha256(paths[rel]) is None and misses[rel][1][0] >= REMOTE_MIN]
        records = dict(zip(far, remote([misses[rel][0] for rel in far]))) if far else {}
        near = [rel for rel in misses if rel not in records]
        records.update(zip(near, hash_paths([paths[rel] for rel in near])))
        for rel, (real, stat_id) in misses.items():
            out[rel] = memo[real] = {"stat": stat_id, **records[rel]}
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


def hash_files(paths: dict[str, Path], cache_root: Path) -> dict[str, str]:
    """relname -> content digest (what enters a source's key)."""
    return {rel: key_digest(r) for rel, r in file_records(paths, cache_root).items()}


def stat_record(path: Path, expected: str, cache_root: Path) -> dict | None:
    """The memoised record of `path` if it provably still holds the content digested as `expected`."""
    try:
        memo = json.loads((cache_root / STORE).read_text())
    except (OSError, ValueError):
        return None
    hit = memo.get(str(path.resolve()))
    try:
        if hit and "meta" in hit and key_digest(hit) == expected and hit["stat"] == _stat_id(path):
            return hit
    except OSError:
        return None
    return None
