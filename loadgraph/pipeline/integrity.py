"""Whole-file digest checks of what is published, exported or loaded, without rehashing every time.

`Cache.get` only stats shards (a fully cached build must stay instant), and a byte flip that
keeps size and mtime passes a stat. It cannot keep the inode's change time: every write, utime,
chmod or link count change sets ctime to now, and no user-space call sets it back. So a file is
re-hashed when its (device, inode, size, mtime, ctime) differs from the last time it was hashed
or written by us, and trusted otherwise; `cache verify` always re-hashes.

The memo lives in the cache (`verified.json`); losing an update to a concurrent writer, or
being unable to write it (read-only cache), only costs a re-hash next time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from loadgraph.formats import digest
from loadgraph.pipeline import offload

MEMO = "verified.json"


def _ident(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Verifier:
    """Files against the digests a manifest records (formats/digest.py), memoised by inode change time."""

    def __init__(self, cache_root: Path):
        self.store = Path(cache_root) / MEMO
        try:
            memo = json.loads(self.store.read_text())
            self.memo: dict[str, dict] = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            self.memo = {}
        self._loaded = dict(self.memo)
        self.dirty = False

    def made(self) -> dict[str, dict]:
        """The entries this process made or changed since it loaded the memo: what a job hands back."""
        return {p: v for p, v in self.memo.items() if self._loaded.get(p) != v}

    def adopt(self, entries: dict[str, dict]) -> None:
        """Entries another process made (a job, hashing or writing where the files are): trusted here too."""
        self.memo.update(entries)
        self.dirty = self.dirty or bool(entries)

    def matches(self, path: Path, meta: dict) -> bool:
        """True if `path` holds the bytes `meta` records (hashes it unless provably unchanged)."""
        ident = self.unchanged(path, meta)
        if ident is None or ident is True:
            return ident is True
        return self.judged(path, meta, ident, digest.matches(path, meta))

    def unchanged(self, path: Path, meta: dict) -> list[int] | bool | None:
        """True if `path` provably still holds `meta`'s bytes, None if it is gone, else its
        identity now (to pass to judged() once its digest has been checked)."""
        try:
            ident = _ident(path.stat())
        except OSError:
            return None
        hit = self.memo.get(str(path))
        return True if hit and hit.get("ident") == ident and hit.get("digest") == digest.recorded(meta) else ident

    def judged(self, path: Path, meta: dict, ident: list[int], ok: bool) -> bool:
        """Record the outcome of checking `path` (as it was at `ident`) against `meta`."""
        if ok:
            self._remember(path, ident, digest.recorded(meta))
        elif self.memo.pop(str(path), None) is not None:
            self.dirty = True
        return ok

    def record(self, path: Path, meta: dict) -> None:
        """`path` was just written (or linked) by us from bytes known to have `meta`'s digest."""
        try:
            self._remember(path, _ident(path.stat()), digest.recorded(meta))
        except OSError:
            pass

    def _remember(self, path: Path, ident: list[int], value: str) -> None:
        self.memo[str(path)] = {"ident": ident, "digest": value}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        # Forget files that no longer exist (evicted entries, replaced exports): the memo stays small.
        memo = {p: v for p, v in self.memo.items() if os.path.exists(p)}
        tmp = self.store.with_name(f".{MEMO}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, self.store)
        except OSError:  # read-only or full cache: the next check re-hashes
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        self.dirty = False


CheckRemote = Callable[[list[tuple[str, dict]]], list[bool]]  # [(path, meta)] -> matches, in order


def file_matches(item: tuple[str, dict]) -> bool:
    """One digest check by (path, meta): what a remote checker runs where the file is."""
    return digest.matches(*item)


def damaged_files(verifier: Verifier, root: Path, files: dict[str, dict], remote: CheckRemote | None = None) -> list[str]:
    """Relative names of the files under `root` whose bytes differ from the recorded digest.
    With `remote`, files that must be re-hashed (offload.REMOTE_MIN bytes or more) are hashed there."""
    far: dict[str, list[int]] = {}
    if remote is not None:
        for rel, meta in files.items():
            ident = verifier.unchanged(root / rel, meta)
            if isinstance(ident, list) and ident[2] >= offload.REMOTE_MIN:
                far[rel] = ident
    verdicts = dict(zip(far, remote([(str(root / rel), files[rel]) for rel in far]))) if far else {}
    for rel, ok in verdicts.items():
        verifier.judged(root / rel, files[rel], far[rel], ok)
    return [rel for rel, meta in sorted(files.items()) if not (verdicts[rel] if rel in verdicts else verifier.matches(root / rel, meta))]


def record_files(verifier: Verifier, root: Path, files: dict[str, dict]) -> None:
    for rel, meta in files.items():
        verifier.record(root / rel, meta)
