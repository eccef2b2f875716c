"""Publishing a built artifact at the user's export destination, all or nothing.

Files are staged beside the destination (same filesystem), hardlinked from the cache when the
cache owns them (copied, and hashed in that pass, otherwise), and swapped into place atomically;
the manifest marks a directory as a loadgraph export, the only kind an export may replace
without --overwrite.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from loadgraph import faults
from loadgraph.errors import BuildError, InputError
from loadgraph.formats import digest
from loadgraph.formats.safetensors import copy_and_hash
from loadgraph.pipeline.cache import MANIFEST, MANIFEST_FORMAT, Artifact, Cache, check_cache_outside
from loadgraph.pipeline.fsops import exchange, owned_name, owner_gone, remove
from loadgraph.pipeline.integrity import Verifier, record_files


def is_remote(dest: str) -> bool:
    return "://" in dest


def existing_export_key(dest: Path) -> str | None:
    try:
        doc = json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc.get("key") if doc.get("format") == MANIFEST_FORMAT else None


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().absolute().resolve()


def check_destination(dest: str, cache: Cache, overwrite: bool, inputs: list[str] = ()) -> None:
    """Refuse, before any work, a destination we would clobber or that overlaps the cache or an input.

    Replacing an export deletes what was at its path: a path that is, holds or lies inside an
    input of the build (a source, an adapter, a vision tower) would destroy the user's files,
    so it is refused with or without --overwrite.
    """
    if is_remote(dest):
        from loadgraph.pipeline.remote_export import check_remote_destination

        check_remote_destination(dest, cache, overwrite)
        return
    path = Path(dest)
    if path.is_symlink():
        # Writing through a link would publish somewhere the spec does not name, and replacing
        # it would silently drop the user's link: neither is ours to decide.
        raise InputError(f"export.path: {path} is a symbolic link (to {os.readlink(path)}); give the real directory or remove the link")
    check_cache_outside(cache, path, "export.path")
    real = _real(path)
    for given in inputs:
        src = _real(given)
        if real == src or real in src.parents or src in real.parents:
            raise InputError(f"export.path: {real} overlaps the build input {src} (replacing the export would delete it); export somewhere outside every input")
    if not path.exists() or overwrite:
        return
    if not path.is_dir():
        raise InputError(f"export.path: {path} exists and is a file; choose another path or pass --overwrite")
    if any(path.iterdir()) and existing_export_key(path) is None:
        raise InputError(f"export.path: {path} exists and is not a loadgraph export; choose another path or pass --overwrite")


def publish_export(art: Artifact, dest: str, cache: Cache, verifier: Verifier, executor=None, jobs: Callable[..., list] | None = None) -> str:
    """Place `art` at `dest`; returns "up-to-date" or "published". `art` must be verified.
    `executor`, when the build started one, uploads a remote export from its workers; `jobs`
    (pipeline/offload.py) places a local export that must copy weights there, not in this process."""
    pin_name = hashlib.sha256(dest.encode()).hexdigest()[:16]
    if is_remote(dest) and jobs is not None and cache.node_local and not cache.is_here(art.key):
        from loadgraph.pipeline.remote_export import publish_remote_job

        # A tier's entry this process holds the manifest of only: a worker publishes from its copy,
        # copying the tier's objects server-side where the build verified them (ETags travel along).
        status = jobs(publish_remote_job, [(cache.location, art.key, dest, dict(getattr(cache, "verified_etags", {})))], False)[0]
    elif is_remote(dest):
        from loadgraph.pipeline.remote_export import publish_remote

        status = publish_remote(art, dest, cache, executor)
    elif jobs is not None and copies_weights(art, Path(dest)):
        status = "up-to-date" if export_intact(art, Path(dest), verifier, rehash=False) else None
        if status is None:  # copying, or checking copies whose digests are not memoised: a job's work
            status = _local_job(art, dest, cache, verifier, jobs)
    else:
        try:
            status = _publish_local(art, Path(dest), verifier, copy_weights=jobs is None)
        except _LinksRefused:  # a filesystem without hard links (an S3 FUSE mount): the job copies
            status = _local_job(art, dest, cache, verifier, jobs)
    try:
        cache.pin(f"export-{pin_name}", art.key, dest=dest)
    except OSError:
        pass  # a read-only cache: nothing will evict the entry there anyway
    return status


def _local_job(art: Artifact, dest: str, cache: Cache, verifier: Verifier, jobs: Callable[..., list]) -> str:
    done = jobs(publish_local_job, [(cache.location, art.key, dest)])[0]
    verifier.adopt(done["verified"])  # what the job hashed: not hashed again here
    return done["status"]


class _LinksRefused(Exception):
    """A weight file could not be hard-linked where the caller may not copy it (the driver)."""


def export_intact(art: Artifact, dest: Path, verifier: Verifier, rehash: bool = True) -> bool:
    """`dest` holds `art`: its manifest names the key and every file has the recorded bytes.

    A file that is the cache's own inode is as good as the (already verified) cache entry; any
    other (a copy on another filesystem, a copied config) is checked by its digest, memoised by its
    ctime, so that a copy altered in place, keeping its size and mtime, is replaced. Without
    `rehash`, a weight file whose digest is not memoised counts as not intact (not hashed here).
    """
    if not dest.is_dir() or dest.is_symlink() or existing_export_key(dest) != art.key:
        return False
    for rel, meta in art.files.items():
        try:
            st, ours = (dest / rel).stat(), (art.path / rel).stat()
        except OSError:
            return False
        if st.st_size != meta["size"]:
            return False
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            continue
        if not rehash and rel.endswith(".safetensors") and verifier.unchanged(dest / rel, meta) is not True:
            return False
        if not verifier.matches(dest / rel, meta):
            return False
    return True


def leftovers(dest: Path) -> list[Path]:
    """Staging dirs and moved-aside exports of `dest` whose builder has ended."""
    out = []
    for kind in ("tmp", "old"):
        prefix = f".{dest.name}.loadgraph-{kind}"
        for p in dest.parent.glob(glob.escape(prefix) + "*"):
            if owner_gone(p.name, p):
                out.append(p)
    return out


def _linkable(art: Artifact, rel: Path, meta: dict | None) -> bool:
    """Shards the cache owns (read-only, not a user's file) are hardlinked; everything else is
    copied, so that editing an export can alter neither the cache nor the user's source."""
    if rel.suffix != ".safetensors" or not meta or meta.get("shared"):
        return False
    return (art.path / rel).stat().st_mode & 0o222 == 0


def copies_weights(art: Artifact, dest: Path) -> bool:
    """Placing `art` at `dest` copies (and hashes) weight files instead of hardlinking them: files
    the cache does not own, or a destination on another filesystem than the cache."""
    anchor = dest.parent
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    try:
        other_fs = anchor.stat().st_dev != art.path.stat().st_dev
        return any(rel.endswith(".safetensors") and (other_fs or not _linkable(art, Path(rel), meta)) for rel, meta in art.files.items())
    except OSError:
        return True


def publish_local_job(item: tuple[str, str, str]) -> dict:
    """_publish_local where the job runs (a worker): (cache location, key, destination) ->
    {status, verified: the digest memo entries it made, for the driver's memo}."""
    location, key, dest = item
    cache = Cache(location)
    art = cache.get(key)
    if art is None:
        raise BuildError(f"{cache.object_dir(key)}: gone before it could be exported to {dest}; rerun the build")
    verifier = Verifier(cache.root)
    status = _publish_local(art, Path(dest), verifier)
    return {"status": status, "verified": verifier.made()}


def _publish_local(art: Artifact, dest: Path, verifier: Verifier, copy_weights: bool = True) -> str:
    """Without `copy_weights`, a weight file that cannot be linked raises _LinksRefused (nothing placed)."""
    for stale in leftovers(dest):
        remove(stale)
    if export_intact(art, dest, verifier):
        return "up-to-date"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.parent / owned_name(f".{dest.name}.loadgraph-tmp")
        staged.mkdir()
    except OSError as exc:
        raise _destination_error(dest, exc) from None
    try:
        placed: dict[str, str] = {}
        for rel in sorted(p.relative_to(art.path) for p in art.path.rglob("*") if p.is_file()):
            if str(rel) == MANIFEST:
                continue
            meta = art.files.get(str(rel))
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            if _linkable(art, rel, meta):
                try:
                    os.link(art.path / rel, staged / rel)
                    continue
                except OSError:
                    pass  # another filesystem, or links not permitted: copy
            if not copy_weights and rel.suffix == ".safetensors":
                raise _LinksRefused(str(rel))
            got = copy_and_hash(art.path / rel, staged / rel)[0]
            if meta and not (got == meta["blake3"] if "blake3" in meta else digest.matches(staged / rel, meta)):
                raise BuildError(f"{art.path / rel}: bytes differ from the digest recorded in the manifest while exporting it; "
                                 f"run `loadgraph cache verify --evict` and rebuild")
            if meta:
                placed[str(rel)] = meta
        shutil.copyfile(art.path / MANIFEST, staged / MANIFEST)  # last: marks the export complete
        _swap_into_place(staged, dest, art, verifier)
    except _AlreadyThere:
        remove(staged)
        return "up-to-date"
    except OSError as exc:
        remove(staged)
        raise _destination_error(dest, exc) from None
    except BaseException:
        remove(staged)
        raise
    # Linking changed the cache files' ctime and the copies are new: remember them as verified.
    record_files(verifier, art.path, art.files)
    record_files(verifier, dest, placed)
    return "published"


def _destination_error(dest: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return BuildError(f"export.path: no space left on the device of {dest.parent}: nothing there was replaced; "
                          "free space or choose another export.path and rerun (the artifact stays in the cache)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return InputError(f"export.path: cannot write in {dest.parent} ({os.strerror(exc.errno)}); choose a writable export.path")
    return BuildError(f"export.path: {dest}: {os.strerror(exc.errno) if exc.errno else exc}; nothing there was replaced, rerun")


class _AlreadyThere(Exception):
    pass


def _swap_into_place(staged: Path, dest: Path, art: Artifact, verifier: Verifier, attempts: int = 5) -> None:
    """Put `staged` at `dest` so that at every instant `dest` holds the old or the new export.

    Absent: one rename. Present: an atomic exchange (renameat2), then the old one, now at the
    staged name, is deleted; a kill in between leaves only a leftover that the next build (or
    gc) removes. Where the filesystem cannot exchange, two renames are the fallback.
    """
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
        if export_intact(art, dest, verifier):
            raise _AlreadyThere
        faults.export_step(1)
        try:
            if exchange(staged, dest):
                faults.export_step(2)
                remove(staged)  # now the old export
                return
        except FileNotFoundError:
            continue  # another builder moved it aside first
        old = dest.parent / owned_name(f".{dest.name}.loadgraph-old")
        try:
            os.rename(dest, old)
        except FileNotFoundError:
            continue
        try:
            os.rename(staged, dest)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            remove(old)
        return
    raise OSError(errno.EBUSY, f"{dest}: other builders keep replacing this export; rerun")
