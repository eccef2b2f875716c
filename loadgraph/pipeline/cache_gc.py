"""`cache gc`: drop staging leftovers, invalid entries and unit dirs, then unpinned entries
least-recently-used first, never touching what a running build holds.

Apart from the store (pipeline/cache.py) because it is the one operation that deletes what
others may be reading; it only goes through the cache's own get/entries/evict, so a tier
(remote_tier.TieredCache) that overrides those is collected the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from loadgraph.errors import InputError

if TYPE_CHECKING:
    from loadgraph.pipeline.cache import Cache


def collect_garbage(cache: Cache, budget_bytes: int, *, min_tmp_age_s: float = 3600.0) -> dict:
    """Drop leftovers, invalid entries, then unpinned entries LRU-first until under budget.

    Never touches what a running build holds: keys in a live lease (its inputs and outputs),
    keys whose build lock is held, and staging dirs whose owner is alive. One gc at a time.
    """
    from loadgraph.pipeline.fsops import owner_gone, remove
    from loadgraph.pipeline.leases import leased_keys

    try:
        gc_lock = FileLock(str(cache.root / "locks" / "gc.lock"))
        gc_lock.acquire(timeout=0)
    except Timeout:
        raise InputError(f"cache gc: another `cache gc` is running on {cache.root}; wait for it") from None
    except OSError as exc:
        raise InputError(f"cache gc: the cache {cache.root} is not writable here ({os.strerror(exc.errno or 0)}); run gc as a user who may write it") from None
    try:
        held = leased_keys(cache.root)
        removed_tmp = 0
        now = time.time()
        for leftover in (cache.root / "tmp").iterdir():
            if owner_gone(leftover.name, leftover) or now - leftover.lstat().st_mtime >= min_tmp_age_s:
                remove(leftover)
                removed_tmp += 1
        removed_tmp += _gc_units(cache, held)
        removed_tmp += _gc_export_leftovers(cache)
        entries = cache.entries()
        evicted = []
        for e in entries:
            if not e["valid"] and e["key"] not in held and _evict_unlocked(cache, e["key"]):
                evicted.append(e["key"])
        live = [e for e in entries if e["valid"]]
        total = sum(e["size"] for e in live)
        for e in sorted((e for e in live if not e["pinned"] and e["key"] not in held), key=lambda e: e["last_used"]):
            if total <= budget_bytes:
                break
            if _evict_unlocked(cache, e["key"]):
                evicted.append(e["key"])
                total -= e["size"]
    finally:
        gc_lock.release()
    return {"evicted": evicted, "removed_tmp": removed_tmp, "size_after": total}


def _try_lock(cache: Cache, key: str) -> FileLock | None:
    lock = FileLock(str(cache.root / "locks" / f"{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _evict_unlocked(cache: Cache, key: str) -> bool:
    """Evict unless a builder holds the key's lock (it may be publishing or reading it)."""
    lock = _try_lock(cache, key)
    if lock is None:
        return False
    try:
        cache.evict(key)
    except FileNotFoundError:
        return False
    finally:
        lock.release()
    return True


def _gc_units(cache: Cache, held: set[str]) -> int:
    """Finished units of a key already published are dead weight (a kill during clean-up)."""
    removed = 0
    for unit_root in (cache.root / "units").iterdir():
        key = unit_root.name
        if key in held or cache.get(key) is None:
            continue  # a resume point, or in use
        lock = _try_lock(cache, key)
        if lock is None:
            continue
        try:
            shutil.rmtree(unit_root, ignore_errors=True)
            removed += 1
        finally:
            lock.release()
    return removed


def _gc_export_leftovers(cache: Cache) -> int:
    """Staging dirs and moved-aside exports beside each pinned export path, whose builder ended."""
    from loadgraph.pipeline.fsops import remove
    from loadgraph.pipeline.leases import export_claimed
    from loadgraph.pipeline.publish import is_remote, leftovers

    removed = 0
    for pin in (cache.root / "pins").glob("*.json"):
        try:
            dest = json.loads(pin.read_text()).get("dest")
        except (OSError, ValueError):
            continue
        if not dest or is_remote(dest) or export_claimed(cache.root, dest):
            continue
        for stale in leftovers(Path(dest)):
            remove(stale)
            removed += 1
    return removed
