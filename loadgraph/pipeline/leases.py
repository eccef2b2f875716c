"""What a running build holds, so that others (gc, workers, rival builds) can see it.

- A build lease (`leases/<host>.<pid>.<rand>.json`) names every key of the build's graph and is
  touched every HEARTBEAT_S: `cache gc` keeps those keys, and Ray workers stop once their
  driver's lease is gone (same host: the pid is dead; other host: no heartbeat for STALE_S).
- An export claim (`locks/export-<digest>.lock` + `.json`) is held from the start of a build to
  its end for each local export destination: a second build of the same artifact waits for it,
  a build of a different artifact for the same path is refused (it would silently replace it).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from loadgraph.errors import BuildError
from loadgraph.pipeline.fsops import HOST, owned_name, pid_alive

HEARTBEAT_S = 2.0
STALE_S = 15.0


class BuildLease:
    """A heartbeat file naming the keys a running build uses; removed when the build ends."""

    def __init__(self, cache_root: Path, keys: list[str]):
        self.path: Path | None = Path(cache_root) / "leases" / (owned_name("lease") + ".json")
        self._stop = threading.Event()
        try:
            self.path.parent.mkdir(exist_ok=True)
            self.path.write_text(json.dumps({"pid": os.getpid(), "host": HOST, "keys": sorted(keys), "started": time.time()}))
        except OSError:  # read-only cache: nothing can be evicted or built there anyway
            self.path = None
            return
        self._thread = threading.Thread(target=self._beat, name="loadgraph-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "BuildLease":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lease_alive(path: str | Path) -> bool:
    """Whether the build that wrote this lease is still running."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except (OSError, ValueError):
        return False
    if doc.get("host") == HOST:
        return pid_alive(int(doc.get("pid", -1)))
    return age < STALE_S


def leased_keys(cache_root: Path) -> set[str]:
    keys: set[str] = set()
    for lease in (Path(cache_root) / "leases").glob("*.json"):
        if lease_alive(lease):
            try:
                keys.update(json.loads(lease.read_text()).get("keys", []))
            except (OSError, ValueError):
                continue
        else:
            lease.unlink(missing_ok=True)  # a killed build's: nothing else removes it
    return keys


def _claim_paths(cache_root: Path, dest: str) -> tuple[Path, Path]:
    digest = hashlib.sha256(str(Path(dest).absolute()).encode()).hexdigest()[:16]
    base = Path(cache_root) / "locks" / f"export-{digest}"
    return base.with_suffix(".lock"), base.with_suffix(".json")


def _holder(info: Path) -> dict:
    try:
        doc = json.loads(info.read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _claim(cache_root: Path, dest: str, key: str, patience_s: float = 10.0) -> FileLock | None:
    lock_path, info = _claim_paths(cache_root, dest)
    lock = FileLock(str(lock_path))
    deadline = time.monotonic() + patience_s
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except Timeout:
            holder = _holder(info)
            live = holder and (holder.get("host") != HOST or pid_alive(int(holder.get("pid", -1))))
            if live and holder.get("key") == key:
                lock.acquire()  # the same artifact: it will be up-to-date once the other build ends
                break
            if live:
                raise BuildError(
                    f"export.path: {dest} is being exported by another running build (pid {holder.get('pid')} on {holder.get('host')}) "
                    "of a different artifact; wait for it to finish or choose another export.path"
                ) from None
            if time.monotonic() > deadline:
                raise BuildError(f"export.path: {dest} is locked by another build ({lock_path}); wait for it or choose another export.path") from None
            time.sleep(0.1)  # the holder has not written who it is yet
        except OSError:  # read-only cache: no rival can publish through it either
            return None
    try:
        info.write_text(json.dumps({"key": key, "pid": os.getpid(), "host": HOST, "dest": dest}))
    except OSError:
        pass
    return lock


@contextmanager
def claim_exports(cache_root: Path, exports: dict[str, str]) -> Iterator[None]:
    """Hold every local export destination (path -> final key) for the duration of a build."""
    with ExitStack() as stack:
        for dest in sorted(exports):  # one order everywhere: two builds never deadlock
            lock = _claim(cache_root, dest, exports[dest])
            if lock is not None:
                stack.callback(lock.release)
        yield


def export_claimed(cache_root: Path, dest: str) -> bool:
    """Whether a running build holds `dest` (gc then leaves its leftovers alone)."""
    lock = FileLock(str(_claim_paths(cache_root, dest)[0]))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False
