"""Publishing a built artifact at the user's export destination, all or nothing.

Files are staged beside the destination (same filesystem), hardlinked from the cache when
possible, and renamed into place; the manifest marks a directory as a loadgraph export, the
only kind an export may replace without --overwrite.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from loadgraph.errors import InputError
from loadgraph.pipeline.cache import MANIFEST, MANIFEST_FORMAT, Artifact, Cache, check_cache_outside


def is_remote(dest: str) -> bool:
    return "://" in dest


def existing_export_key(dest: Path) -> str | None:
    try:
        doc = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("key") if doc.get("format") == MANIFEST_FORMAT else None


def check_destination(dest: str, cache: Cache, overwrite: bool) -> None:
    """Refuse, before any work, a destination we would clobber or that overlaps the cache."""
    if is_remote(dest):
        return
    path = Path(dest)
    if path.is_symlink():
        # Writing through a link would publish somewhere the spec does not name, and replacing
        # it would silently drop the user's link: neither is ours to decide.
        raise InputError(f"export.path: {path} is a symbolic link (to {os.readlink(path)}); give the real directory or remove the link")
    check_cache_outside(cache, path, "export.path")
    if not path.exists() or overwrite:
        return
    if not path.is_dir():
        raise InputError(f"export.path: {path} exists and is a file; choose another path or pass --overwrite")
    if any(path.iterdir()) and existing_export_key(path) is None:
        raise InputError(f"export.path: {path} exists and is not a loadgraph export; choose another path or pass --overwrite")


def publish_export(art: Artifact, dest: str, cache: Cache) -> str:
    """Place `art` at `dest`; returns "up-to-date" or "published"."""
    pin_name = hashlib.sha256(dest.encode()).hexdigest()[:16]
    if is_remote(dest):
        status = _publish_remote(art, dest)
    else:
        status = _publish_local(art, Path(dest))
    cache.pin(f"export-{pin_name}", art.key, dest=dest)
    return status


def export_intact(art: Artifact, dest: Path) -> bool:
    """`dest` holds `art`: its manifest names the key, and each file is there at its size and,
    for hardlinked shards, is still the cache's file (a rebuilt entry has new inodes)."""
    if not dest.is_dir() or dest.is_symlink() or existing_export_key(dest) != art.key:
        return False
    for rel, meta in art.files.items():
        try:
            st, ours = (dest / rel).stat(), (art.path / rel).stat()
        except OSError:
            return False
        if st.st_size != meta["size"] or (rel.endswith(".safetensors") and st.st_dev == ours.st_dev and st.st_ino != ours.st_ino):
            return False
    return True


def _publish_local(art: Artifact, dest: Path) -> str:
    if export_intact(art, dest):
        return "up-to-date"
    dest.parent.mkdir(parents=True, exist_ok=True)
    staged = dest.parent / f".{dest.name}.loadgraph-tmp-{uuid.uuid4().hex[:8]}"
    staged.mkdir()
    try:
        for rel in sorted(p.relative_to(art.path) for p in art.path.rglob("*") if p.is_file()):
            if str(rel) == MANIFEST:
                continue
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            # Shards are hardlinked (free, read-only); small files are copied so that editing an
            # exported config.json cannot alter the cache entry it came from.
            try:
                if rel.suffix != ".safetensors":
                    raise OSError
                os.link(art.path / rel, staged / rel)
            except OSError:
                shutil.copyfile(art.path / rel, staged / rel)
        shutil.copyfile(art.path / MANIFEST, staged / MANIFEST)  # last: marks the export complete
        _swap_into_place(staged, dest, art)
    except _AlreadyThere:
        shutil.rmtree(staged, ignore_errors=True)
        return "up-to-date"
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return "published"


class _AlreadyThere(Exception):
    pass


def _swap_into_place(staged: Path, dest: Path, art: Artifact, attempts: int = 5) -> None:
    """Rename `staged` to `dest`, replacing what is there. Concurrent builders of one spec race
    here: a rename onto a directory another one just placed fails (ENOTEMPTY/EEXIST); if that
    directory already holds this artifact we are done, else we retry the swap."""
    for _ in range(attempts):
        if dest.is_symlink():
            raise InputError(f"export.path: {dest} became a symbolic link during the build; not replacing it")
        if not dest.exists():
            try:
                os.rename(staged, dest)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        if export_intact(art, dest):
            raise _AlreadyThere
        old = dest.parent / f".{dest.name}.loadgraph-old-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(dest, old)
        except FileNotFoundError:
            continue  # another builder moved it aside first
        try:
            os.rename(staged, dest)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)
        return
    raise OSError(errno.EBUSY, f"{dest}: other builders keep replacing this export; rerun")


def _publish_remote(art: Artifact, dest: str) -> str:
    """Object stores have no rename: upload everything, then the manifest as the commit marker."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(dest)
    try:
        if json.loads(fs.cat_file(f"{root}/{MANIFEST}")).get("key") == art.key:
            return "up-to-date"
    except (FileNotFoundError, ValueError):
        pass
    fs.rm(f"{root}/{MANIFEST}") if fs.exists(f"{root}/{MANIFEST}") else None
    for p in sorted(art.path.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            fs.put_file(str(p), f"{root}/{p.relative_to(art.path)}")
    fs.put_file(str(art.path / MANIFEST), f"{root}/{MANIFEST}")
    return "published"
