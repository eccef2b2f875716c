"""The content-addressed artifact store.

Layout under the cache root:
  objects/<key>/        a published artifact; it exists only if manifest.json is valid
  units/<key>/<unit>/   finished work units of a node not yet published (resume point)
  tmp/                  staging dirs; renamed into place, so readers never see partial files
  locks/<key>.lock      one builder per key across processes and nodes
  used/<key>            mtime = last use, for least-recently-used eviction
  pins/<name>.json      roots gc keeps (exports, user pins)
  statcache.json        (path, size, mtime, inode) -> digest of source files, so plans don't rehash
  checks/<digest>       preflight checks passed (node key + library versions), so plans don't redo them
  derived/<kind>/<key>  merge and quantization plans by what they derive from (pipeline/derived.py)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from loadgraph.errors import InputError
from loadgraph.pipeline.cache_gc import collect_garbage

MANIFEST = "manifest.json"
UNIT_RECORD = "unit.json"
MANIFEST_FORMAT = "loadgraph-artifact/1"
# get() re-hashes the small files that are not shards (configs, index) on every lookup: cheap,
# and a damaged config is as fatal as a damaged shard. Shards and bigger files are checked by
# size and mtime there, and checked tensor by tensor by the units that read them (stages/tensor_io.py).
SMALL_FILE = 1 << 20


SUBDIRS = ("objects", "units", "tmp", "locks", "used", "pins", "leases")


def default_cache_root() -> Path:
    return Path(os.environ.get("LOADGRAPH_CACHE") or Path.home() / ".cache" / "loadgraph")


def write_json_atomic(path: Path, doc: object) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Artifact:
    """A published cache entry: a checkpoint directory plus its manifest."""

    key: str
    path: Path
    manifest: dict

    @property
    def tensors(self) -> dict[str, dict]:
        return self.manifest.get("tensors", {})

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest.get("files", {})


class Cache:
    def __new__(cls, root: str | os.PathLike | None = None):
        # An object-store URL (s3://, gs://) is a per-node local cache in front of a shared tier.
        if cls is Cache:
            from loadgraph.pipeline.objstore import url_of

            if url_of(root if root is not None else os.environ.get("LOADGRAPH_CACHE")):
                from loadgraph.pipeline.remote_tier import TieredCache

                cls = TieredCache
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_cache_root()
        self.root = self.root.expanduser().absolute()
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"--cache: {self.root} is a file, not a directory; give a directory for the cache (or remove the file)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--cache: cannot create the cache directory {self.root} ({os.strerror(exc.errno or 0)}); give a writable directory") from None
        for sub in SUBDIRS:
            try:
                (self.root / sub).mkdir(exist_ok=True)
            except OSError:
                pass  # a read-only cache still serves what it holds; writes there fail with one line

    # True where every node keeps its own copy (the object-store tier): the driver then plans and
    # assembles nodes in jobs, and holds manifests only. A shared directory is one copy for all.
    node_local = False

    @property
    def location(self) -> str:
        """What work units are given to open this cache on their node (a tier's URL, or the path)."""
        return str(self.root)

    def check(self) -> None:
        """Plan-time reachability of what the cache needs beyond its directory (the remote tier)."""

    def localize_units(self, key: str, unit_ids: list[str]) -> None:
        """Make units that finished elsewhere readable here (the remote tier downloads them)."""

    def prepare_staging(self, ctx, stage) -> None:
        """Point a unit at the node's prepared output files on this machine (the remote tier
        gives each node its own; a shared cache has the driver's)."""

    # -- published artifacts -------------------------------------------------
    def object_dir(self, key: str) -> Path:
        return self.root / "objects" / key

    def get(self, key: str) -> Artifact | None:
        """The artifact under `key`, or None if absent or visibly damaged.

        Damaged: a file missing, resized, written since publication (its mtime differs from the
        one the manifest recorded; published files are read-only, so any write is damage), or a
        small file whose digest differs. Stat-only for shards keeps a fully cached build instant.
        """
        from loadgraph.formats import digest

        path = self.object_dir(key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("format") != MANIFEST_FORMAT:
            return None
        for rel, meta in manifest.get("files", {}).items():
            try:
                st = (path / rel).stat()
                if st.st_size != meta["size"] or meta.get("mtime_ns", st.st_mtime_ns) != st.st_mtime_ns:
                    return None
                if st.st_size <= SMALL_FILE and not rel.endswith(".safetensors") and not digest.matches(path / rel, meta):
                    return None
            except (OSError, KeyError, TypeError):
                return None
        return Artifact(key, path, manifest)

    def lookup(self, key: str) -> Artifact | None:
        """The entry as its manifest describes it, without fetching its files here (the tier's
        driver reads manifests only); for a shared directory, the same as get()."""
        return self.get(key)

    def is_here(self, key: str) -> bool:
        """This process can read the entry's files where it is, without fetching anything."""
        return self.get(key) is not None

    def touch(self, key: str) -> None:
        """Record a use (for LRU eviction). Another member's marker in a group-shared cache may not
        be ours to utime: a fresh one replaces it. A read-only cache records nothing."""
        marker = self.root / "used" / key
        try:
            marker.touch()
            os.utime(marker)
        except PermissionError:
            try:
                fresh = marker.with_name(f".{key}.{os.getpid()}")
                fresh.touch()
                os.replace(fresh, marker)
            except OSError:
                pass
        except OSError:
            pass

    def new_tmp_dir(self, label: str) -> Path:
        from loadgraph.pipeline.fsops import owned_name

        path = self.root / "tmp" / owned_name(label)  # the owner's host and pid: gc can tell it is dead
        path.mkdir(parents=True)
        return path

    def publish(self, key: str, staged: Path, manifest: dict) -> Artifact:
        """Write the manifest last, then rename the staged dir into place atomically."""
        files = {}
        for rel, meta in manifest.get("files", {}).items():
            # Published files are read-only (exports hardlink them), except files linked from a
            # user's source directory, whose permissions are not ours to change.
            if not meta.get("shared"):
                try:
                    (staged / rel).chmod(0o444)
                except PermissionError:
                    pass  # not our inode (a shared cache): exports then copy it instead of linking
            # The mtime at publication: get() treats a later write as damage (a stat, no hashing).
            files[rel] = {**meta, "mtime_ns": (staged / rel).stat().st_mtime_ns}
        manifest = {**manifest, "files": files, "key": key, "format": MANIFEST_FORMAT}
        write_json_atomic(staged / MANIFEST, manifest)
        dest = self.object_dir(key)
        if dest.exists():
            # A stale or damaged entry (get() returned None): move it aside before replacing it.
            trash = self.root / "tmp" / f"stale-{key[:16]}-{uuid.uuid4().hex[:8]}"
            os.rename(dest, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(staged, dest)
        self.touch(key)
        return Artifact(key, dest, manifest)

    # -- work units ----------------------------------------------------------
    def unit_dir(self, key: str, unit_id: str) -> Path:
        return self.root / "units" / key / unit_id

    def unit_result(self, key: str, unit_id: str) -> dict | None:
        record = self.unit_dir(key, unit_id) / UNIT_RECORD
        try:
            result = json.loads(record.read_text())
        except (OSError, ValueError):
            return None
        for rel, meta in result.get("files", {}).items():
            try:
                if (record.parent / rel).stat().st_size != meta["size"]:
                    return None
            except OSError:
                return None
        return result

    def unit_record(self, key: str, unit_id: str) -> dict | None:
        """A finished unit's record, without fetching its files here (see lookup())."""
        return self.unit_result(key, unit_id)

    def publish_unit(self, key: str, unit_id: str, staged: Path, result: dict) -> None:
        write_json_atomic(staged / UNIT_RECORD, result)
        dest = self.unit_dir(key, unit_id)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(staged, dest)

    def drop_units(self, key: str) -> None:
        shutil.rmtree(self.root / "units" / key, ignore_errors=True)

    # -- locking -------------------------------------------------------------
    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        with FileLock(str(self.root / "locks" / f"{key}.lock"), timeout=timeout):
            yield

    # -- listing, verification, eviction --------------------------------------
    def entries(self) -> list[dict]:
        out = []
        for path in sorted((self.root / "objects").iterdir()):
            art = self.get(path.name)
            used = self.root / "used" / path.name
            out.append(
                {
                    "key": path.name,
                    "valid": art is not None,
                    "stage": art.manifest.get("stage") if art else None,
                    "size": dir_size(path),
                    "last_used": used.stat().st_mtime if used.exists() else path.stat().st_mtime,
                    "pinned": path.name in self.pinned_keys(),
                }
            )
        return out

    def pin(self, name: str, key: str, **info: str) -> None:
        write_json_atomic(self.root / "pins" / f"{name}.json", {"key": key, **info})

    def pinned_keys(self) -> set[str]:
        keys = set()
        for pin in (self.root / "pins").glob("*.json"):
            try:
                keys.add(json.loads(pin.read_text())["key"])
            except (OSError, ValueError, KeyError):
                continue
        return keys

    def verify(self, key: str) -> list[str]:
        """Re-hash every file of an entry; returns the problems found (empty = intact)."""
        from loadgraph.formats import digest

        path = self.object_dir(key)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return [f"{key[:12]}: manifest missing or unreadable"]
        problems = []
        for rel, meta in manifest.get("files", {}).items():
            f = path / rel
            if not f.exists():
                problems.append(f"{key[:12]}/{rel}: missing")
            elif f.stat().st_size != meta["size"]:
                problems.append(f"{key[:12]}/{rel}: size {f.stat().st_size} != {meta['size']}")
            elif not digest.matches(f, meta):
                problems.append(f"{key[:12]}/{rel}: digest mismatch")
        return problems

    def evict(self, key: str) -> None:
        path = self.object_dir(key)
        trash = self.root / "tmp" / f"evict-{key[:16]}-{uuid.uuid4().hex[:8]}"
        os.rename(path, trash)  # atomic: readers see it present or absent, never half-deleted
        shutil.rmtree(trash, ignore_errors=True)
        (self.root / "used" / key).unlink(missing_ok=True)

    def gc(self, budget_bytes: int, *, min_tmp_age_s: float = 3600.0) -> dict:
        """Drop leftovers, invalid entries, then unpinned entries LRU-first until under budget
        (pipeline/cache_gc.py); never what a running build holds. One gc at a time."""
        return collect_garbage(self, budget_bytes, min_tmp_age_s=min_tmp_age_s)

    def unit_dirs_size(self) -> tuple[int, int]:
        """(unit dirs, bytes): resume points and orphans, which `cache ls` reports apart."""
        try:
            dirs = [p for p in (self.root / "units").iterdir() if p.is_dir()]
        except OSError:
            return 0, 0
        return len(dirs), sum(dir_size(p) for p in dirs)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_cache_outside(cache: Cache, dest: Path, field: str) -> None:
    """A cache inside an export destination (or vice versa) would be overwritten by a publish."""
    c, d = cache.root.resolve(), dest.expanduser().absolute().resolve()
    if c == d or d in c.parents or c in d.parents:
        raise InputError(f"{field}: {d} overlaps the cache at {c}; export somewhere outside the cache")
