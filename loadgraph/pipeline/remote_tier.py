"""The cache's object-store tier: a per-node local cache in front of one bucket prefix every node shares.

`--cache s3://bucket/prefix` (or LOADGRAPH_CACHE) makes `Cache(...)` a TieredCache. Each node
keeps an ordinary local cache (LOADGRAPH_LOCAL_CACHE, else under the user cache dir) and:
  - get(key) that misses locally downloads the entry from the tier, checks every file against
    the digest its manifest names, and installs it locally (a mismatch drops the remote entry,
    which is then rebuilt, never used);
  - publish/publish_unit upload content objects first and the manifest (unit record) last, so
    an object store, which cannot rename, still never shows a partial entry;
  - lock(key) adds a lease object written with S3 conditional writes, so one node builds a key.

Layout under the prefix:
  blobs/<alg>/<digest>        file contents, named by their digest (immutable, shared by entries)
  objects/<key>.json          an entry's manifest: written last, names every file's digest
  units/<key>/<unit>.json     a finished unit's record, written after its files' blobs
  leases/<key>.json           who builds <key>, until when (If-None-Match create, If-Match renew)
"""

from __future__ import annotations

import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from loadgraph import faults
from loadgraph.errors import BuildError
from loadgraph.formats import digest
from loadgraph.pipeline.cache import MANIFEST_FORMAT, Artifact, Cache
from loadgraph.pipeline.objstore import (
    CHUNK,
    check_reachable,
    download_verified,
    file_digest,
    local_dir_for,
    open_store,
    parallel,
    put_file,
    put_json,
    read_json,
    url_of,
)
from loadgraph.pipeline.remote_lease import RemoteLease

# Per-file fields that describe one node's copy, not the content: never shared through the tier.
LOCAL_FIELDS = ("mtime_ns", "shared")


class RemoteTierWarning(UserWarning):
    """A remote entry that failed verification (shown on the screen; the build goes on)."""


def portable(files: dict[str, dict]) -> dict[str, dict]:
    return {rel: {k: v for k, v in meta.items() if k not in LOCAL_FIELDS} for rel, meta in files.items()}


STAGED = "staged"  # in a unit record: its tensors were written into the node's staging files


def _placed(result: dict) -> dict[str, dict]:
    """The tensors a unit of a stage with a layout wrote into the node's staging files: what
    another node needs to fill its own copy of those files."""
    return result.get("tensors", {}) if result.get(STAGED) else {}


class TieredCache(Cache):
    node_local = True

    def __init__(self, root: str | os.PathLike | None = None):
        self.url = url_of(root if root is not None else os.environ.get("LOADGRAPH_CACHE"))
        self.fs, self.base = open_store(self.url, "--cache")
        self._on_remote: set[str] = set()  # keys known to be in the tier (one HEAD per process)
        self._local_only = False
        # blob -> ETag of bytes this process verified (downloaded and hashed, or uploaded from a
        # verified file): what an export may copy server-side without downloading it again.
        self.verified_etags: dict[str, str] = {}
        super().__init__(local_dir_for(self.url))

    @property
    def location(self) -> str:
        return self.url  # what units get: each node maps it to its own local dir

    def check(self) -> None:
        check_reachable(self.fs, self.base, "--cache", self.url)

    def blob_path(self, meta: dict) -> str:
        """Where the tier keeps a file's content: named by its digest."""
        alg, digest = file_digest(meta)
        return f"{self.base}/blobs/{alg}/{digest}"

    def _manifest_path(self, key: str) -> str:
        return f"{self.base}/objects/{key}.json"

    def _unit_path(self, key: str, unit_id: str) -> str:
        return f"{self.base}/units/{key}/{unit_id}.json"

    # -- published artifacts -------------------------------------------------
    def get(self, key: str) -> Artifact | None:
        art = super().get(key)
        if self._local_only:
            return art
        if art is not None:
            self._ensure_remote(art)
            return art
        return self._fetch(key)

    def lookup(self, key: str) -> Artifact | None:
        """This node's copy, else the tier's manifest alone: an Artifact whose files are not here
        (what a driver reports, checks through a job, exports through a job)."""
        art = super().get(key)
        if art is not None or self._local_only:
            return art
        doc = read_json(self.fs, self._manifest_path(key))
        if not isinstance(doc, dict) or doc.get("key") != key or doc.get("format") != MANIFEST_FORMAT:
            return None
        return Artifact(key, self.object_dir(key), doc)

    def is_here(self, key: str) -> bool:
        return super().get(key) is not None  # this node's copy; the tier is not asked

    def publish(self, key: str, staged: Path, manifest: dict) -> Artifact:
        art = super().publish(key, staged, manifest)
        self._upload(art.path, art.files)
        self._put_record(self._manifest_path(key), art.manifest)
        self._on_remote.add(key)
        return art

    def _fetch(self, key: str) -> Artifact | None:
        doc = read_json(self.fs, self._manifest_path(key))
        if not isinstance(doc, dict) or doc.get("key") != key or doc.get("format") != MANIFEST_FORMAT:
            return None
        # One download per node: a second process here waits and then finds it installed.
        with FileLock(str(self.root / "locks" / f"fetch-{key}.lock")):
            art = super().get(key)
            if art is not None:
                return art
            staged = self.new_tmp_dir(f"fetch-{key[:12]}")
            try:
                bad = self._download(doc.get("files", {}), staged)
                if bad:
                    self._drop(key, self._manifest_path(key), bad)
                    shutil.rmtree(staged, ignore_errors=True)
                    return None
                self._on_remote.add(key)
                return super().publish(key, staged, doc)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise

    def _ensure_remote(self, art: Artifact) -> None:
        """A local entry the tier lacks (its upload was killed, or it was dropped there) is pushed
        again, from files re-hashed first: other nodes may need it as an input."""
        if art.key in self._on_remote:
            return
        if not self.fs.exists(self._manifest_path(art.key)):
            if not all(digest.matches(art.path / rel, m) for rel, m in art.files.items()):
                return  # damaged here: the runner's input check evicts and rebuilds it
            try:
                self._upload(art.path, art.files)
                self._put_record(self._manifest_path(art.key), art.manifest)
            except PermissionError:
                return  # a read-only tier: this node still serves its own copy
        self._on_remote.add(art.key)

    # -- work units ----------------------------------------------------------
    def unit_result(self, key: str, unit_id: str) -> dict | None:
        result = super().unit_result(key, unit_id)
        if self._local_only:
            return result
        if result is not None:
            if not self.fs.exists(self._unit_path(key, unit_id)):  # finished here earlier, dropped there
                self._upload_unit(key, unit_id, self.unit_dir(key, unit_id), result)
            return result
        record = read_json(self.fs, self._unit_path(key, unit_id))
        if not isinstance(record, dict):
            return None
        placed = _placed(record)
        if placed and not all((self.unit_dir(key, "files") / t["file"]).exists() for t in placed.values()):
            return record  # done elsewhere; only the node that assembles (it prepared the files) fetches the bytes
        staged = self.new_tmp_dir(f"fetch-unit-{key[:12]}-{unit_id}")
        try:
            bad = self._download(record.get("files", {}), staged) + self._download_placed(key, placed)
            if bad:
                self._drop(key, self._unit_path(key, unit_id), bad)
                shutil.rmtree(staged, ignore_errors=True)
                return None
            super().publish_unit(key, unit_id, staged, record)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return record

    def unit_record(self, key: str, unit_id: str) -> dict | None:
        local = super().unit_result(key, unit_id)
        if local is not None or self._local_only:
            return local
        record = read_json(self.fs, self._unit_path(key, unit_id))
        return record if isinstance(record, dict) else None  # its files: fetched by the node that assembles

    def publish_unit(self, key: str, unit_id: str, staged: Path, result: dict) -> None:
        # Remote record before the local rename: a retry that finds the unit done here can rely on
        # the tier having it too, and a kill before the record leaves only unnamed blobs.
        self._upload_unit(key, unit_id, staged, result)
        super().publish_unit(key, unit_id, staged, result)

    def _upload_unit(self, key: str, unit_id: str, root: Path, result: dict) -> None:
        # A unit of a stage with a layout returns no files: its bytes are ranges of the staging files.
        staged = not result.get("files") and self.unit_dir(key, "files").is_dir()
        record = {**result, STAGED: True} if staged else result
        self._upload(root, result.get("files", {}))
        self._upload_placed(key, _placed(record))
        self._put_record(self._unit_path(key, unit_id), record)

    def prepare_staging(self, ctx, stage) -> None:
        """A stage with a layout writes into the node's prepared files: on this node, its own."""
        local = self.unit_dir(ctx.key, "files")
        if ctx.staging is None:
            return
        # Prepared here even where the path is the driver's: the driver of a tier creates none.
        from loadgraph.formats.layout import prepare_files

        with FileLock(str(self.root / "locks" / f"staging-{ctx.key}.lock")):  # units of one node share the files
            prepare_files(local, stage.layout(ctx))
        ctx.staging = local

    def localize_units(self, key: str, unit_ids: list[str]) -> None:
        """Units that ran on other nodes: their files into this node's cache, verified."""
        for unit_id in unit_ids:
            if self.unit_result(key, unit_id) is None:
                raise BuildError(f"unit {unit_id} of {key[:12]} finished on another node, but {self._unit_path(key, unit_id)} is missing "
                                 f"or fails verification in {self.url}; rerun to recompute it")

    def drop_units(self, key: str) -> None:
        super().drop_units(key)
        try:
            self.fs.rm(f"{self.base}/units/{key}", recursive=True)
        except (FileNotFoundError, PermissionError):
            pass

    # -- locking, maintenance ------------------------------------------------
    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        with super().lock(key, timeout), RemoteLease(self.fs, f"{self.base}/leases/{key}.json").held(timeout):
            yield

    def gc(self, budget_bytes: int, *, min_tmp_age_s: float = 3600.0) -> dict:
        """gc evicts from this node's local cache only; the tier is the copy it falls back on."""
        self._local_only = True
        try:
            return super().gc(budget_bytes, min_tmp_age_s=min_tmp_age_s)
        finally:
            self._local_only = False

    # -- transfers -----------------------------------------------------------
    def _upload(self, root: Path, files: dict[str, dict]) -> None:
        """Every file's content object, unless one of that digest and size is there already."""
        todo = {self.blob_path(meta): (root / rel, meta["size"]) for rel, meta in files.items()}

        def one(item: tuple[str, tuple[Path, int]]) -> None:
            rpath, (lpath, size) = item
            try:
                if self.fs.info(rpath).get("size") == size:
                    return
            except FileNotFoundError:
                pass
            put_file(self.fs, lpath, rpath)
            self.verified_etags[rpath] = self.fs.info(rpath).get("ETag", "")

        parallel(one, todo.items())

    def _tensor_blob(self, t: dict) -> str:
        return f"{self.base}/blobs/blake3/{t['blake3']}"  # the BLAKE3 of the tensor's bytes

    def _upload_placed(self, key: str, tensors: dict[str, dict]) -> None:
        """Tensors a unit wrote at their offsets in this node's staging files: each as an object
        of its bytes, streamed (multipart for big ones), unless one is there already."""
        staging = self.unit_dir(key, "files")

        def one(t: dict) -> None:
            rpath, nbytes = self._tensor_blob(t), t["end"] - t["begin"]
            try:
                if self.fs.info(rpath).get("size") == nbytes:
                    return
            except FileNotFoundError:
                pass
            with open(staging / t["file"], "rb", buffering=0) as fi, self.fs.open(rpath, "wb", block_size=CHUNK) as fo:
                done = 0
                while done < nbytes:
                    chunk = os.pread(fi.fileno(), min(CHUNK, nbytes - done), t["begin"] + done)
                    if not chunk:
                        raise OSError(f"{staging / t['file']}: shorter than its layout")
                    fo.write(chunk)
                    done += len(chunk)
            faults.uploaded()

        parallel(one, tensors.values())

    def _download_placed(self, key: str, tensors: dict[str, dict]) -> list[str]:
        """Each tensor's object into this node's staging files at its offset, checked against its
        digest; the objects that were missing or differed."""
        staging = self.unit_dir(key, "files")

        def one(t: dict) -> str | None:
            rpath, h, offset = self._tensor_blob(t), digest.hasher(t["end"] - t["begin"]), t["begin"]
            try:
                with self.fs.open(rpath, "rb", block_size=CHUNK, cache_type="none") as fi:
                    fd = os.open(staging / t["file"], os.O_WRONLY)
                    try:
                        while (chunk := fi.read(CHUNK)) and offset + len(chunk) <= t["end"]:
                            h.update(chunk)
                            os.pwrite(fd, chunk, offset)
                            offset += len(chunk)
                    finally:
                        os.close(fd)
            except FileNotFoundError:
                return rpath
            return None if offset == t["end"] and h.hexdigest() == t["blake3"] else rpath

        return [b for b in parallel(one, tensors.values()) if b]

    def _download(self, files: dict[str, dict], staged: Path) -> list[str]:
        """Fetch every file into `staged`, verified; the blobs that were missing or differed."""

        def one(item: tuple[str, dict]) -> str | None:
            rel, meta = item
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            etag = download_verified(self.fs, self.blob_path(meta), staged / rel, meta)
            if etag is None:
                return self.blob_path(meta)
            if etag:
                self.verified_etags[self.blob_path(meta)] = etag
            return None

        return [b for b in parallel(one, files.items()) if b]

    def _drop(self, key: str, record: str, bad: list[str]) -> None:
        """A record naming a missing or altered blob: delete both, so the next build recomputes
        and re-uploads them (a blob with the wrong bytes under its digest must not stay)."""
        warnings.warn(f"remote cache {self.url}: {bad[0]} is missing or does not match its digest; "
                      f"entry {key[:12]} dropped from the tier and rebuilt", RemoteTierWarning, stacklevel=2)
        for path in [record, *bad]:
            try:
                self.fs.rm_file(path)
            except (FileNotFoundError, PermissionError):
                pass

    def _put_record(self, path: str, doc: dict) -> None:
        """A manifest or unit record, without what only describes this node's copy."""
        doc = {**doc, "files": portable(doc.get("files", {}))}
        put_json(self.fs, path, doc)
