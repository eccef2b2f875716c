"""Whole-file sha256 checks of what is published, exported or loaded, without rehashing every time.

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

from loadgraph.formats.safetensors import sha256_file

MEMO = "verified.json"


def _ident(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Verifier:
    """sha256 of files against the digests a manifest records, memoised by inode change time."""

    def __init__(self, cache_root: Path):
        self.store = Path(cache_root) / MEMO
        try:
            memo = json.loads(self.store.read_text())
            self.memo: dict[str, dict] = memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            self.memo = {}
        self.dirty = False

    def matches(self, path: Path, sha256: str) -> bool:
        """True if `path` holds bytes with this sha256 (hashes it unless provably unchanged)."""
        try:
            ident = _ident(path.stat())
        except OSError:
            return False
        hit = self.memo.get(str(path))
        if hit and hit.get("ident") == ident and hit.get("sha256") == sha256:
            return True
        try:
            actual = sha256_file(path)
        except OSError:
            return False
        if actual != sha256:
            self.memo.pop(str(path), None)
            self.dirty = True
            return False
        self._remember(path, ident, sha256)
        return True

    def record(self, path: Path, sha256: str) -> None:
        """`path` was just written (or linked) by us from bytes known to hash to `sha256`."""
        try:
            self._remember(path, _ident(path.stat()), sha256)
        except OSError:
            pass

    def _remember(self, path: Path, ident: list[int], sha256: str) -> None:
        self.memo[str(path)] = {"ident": ident, "sha256": sha256}
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


def damaged_files(verifier: Verifier, root: Path, files: dict[str, dict]) -> list[str]:
    """Relative names of the files under `root` whose bytes differ from the recorded sha256."""
    return [rel for rel, meta in sorted(files.items()) if not verifier.matches(root / rel, meta["sha256"])]


def record_files(verifier: Verifier, root: Path, files: dict[str, dict]) -> None:
    for rel, meta in files.items():
        verifier.record(root / rel, meta["sha256"])
