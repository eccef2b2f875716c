"""Publishing an export to object storage (s3://, gs://), which has no rename and no directories.

The prefix is ours only if it is empty or already a loadgraph export (else exit 2 unless
--overwrite). A publish uploads the files whose bytes differ from what is there (in parallel:
from the Ray workers when there are any, multipart for big files, or as server-side copies of
the cache tier's content objects), then `manifest.json`, the commit marker readers look for, then
`.loadgraph-export.json`, which records each object's digest (from the manifest) and the ETag the
store gave the verified upload; objects the new export does not name (shards of an older shard
count) are deleted last. "up-to-date" means: the manifest names this key and every file's
object has the size and ETag recorded for its digest; any object deleted, replaced or resized
in the bucket since then is uploaded again.
"""

from __future__ import annotations

import json
from pathlib import Path

from loadgraph.errors import InputError
from loadgraph.pipeline.cache import MANIFEST, MANIFEST_FORMAT, Artifact, Cache
from loadgraph.formats.digest import digest_bytes
from loadgraph.pipeline.objstore import check_reachable, file_digest, open_store, parallel, put_file, put_json, read_json, url_of
from loadgraph.pipeline.remote_lease import RemoteLease

MARKER = ".loadgraph-export.json"
MARKER_FORMAT = "loadgraph-export/1"
LEASE = ".loadgraph-export.lease"  # one publisher per prefix at a time (never listed as content)


def _listing(fs, root: str) -> dict[str, dict]:
    """rel path -> object info for every object under the prefix (one paginated LIST)."""
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    out = {}
    for name, info in found.items():
        if info.get("type") == "file" and name.startswith(root + "/") and name != f"{root}/{LEASE}":
            out[name[len(root) + 1:]] = info
    return out


def _read(fs, path: str) -> dict:
    doc = read_json(fs, path)
    return doc if isinstance(doc, dict) else {}


def _owned(fs, root: str, listing: dict[str, dict]) -> bool:
    if MARKER in listing and _read(fs, f"{root}/{MARKER}").get("format") == MARKER_FORMAT:
        return True
    return MANIFEST in listing and _read(fs, f"{root}/{MANIFEST}").get("format") == MANIFEST_FORMAT


def check_remote_destination(dest: str, cache: Cache, overwrite: bool) -> None:
    """Before any work: a backend that is installed, a bucket we reach, a prefix we may publish into."""
    fs, root = open_store(dest, "export.path")
    check_reachable(fs, root, "export.path", dest)
    tier = url_of(cache.location)
    if tier:
        a, b = tier.rstrip("/") + "/", dest.rstrip("/") + "/"
        if a.startswith(b) or b.startswith(a):
            raise InputError(f"export.path: {dest} overlaps the cache tier {tier}; export to a prefix outside the cache")
    listing = _listing(fs, root)
    if listing and not overwrite and not _owned(fs, root, listing):
        raise InputError(f"export.path: {dest} holds {len(listing)} object(s) that are not a loadgraph export "
                         f"(e.g. {sorted(listing)[0]}); choose an empty prefix or pass --overwrite")


def _manifest_bytes(art: Artifact, cache: Cache) -> bytes:
    """The export's manifest.json. A tier's entry: its manifest without what describes one node's
    copy (mtimes), so that whichever node publishes it writes the same bytes (and a rerun from
    another node finds the export up to date)."""
    if cache.node_local:
        from loadgraph.pipeline.remote_tier import portable

        return json.dumps({**art.manifest, "files": portable(art.files)}, indent=1, sort_keys=True).encode()
    return (art.path / MANIFEST).read_bytes()


def _wanted(art: Artifact, manifest: bytes) -> dict[str, dict]:
    """rel -> {"digest": "alg:hex", "size"} for every file of the export, the manifest included."""
    files = {rel: {"digest": "%s:%s" % file_digest(meta), "size": meta["size"]} for rel, meta in art.files.items()}
    files[MANIFEST] = {"digest": "blake3:" + digest_bytes(manifest), "size": len(manifest)}
    return files


def _kept(wanted: dict[str, dict], marker: dict, listing: dict[str, dict]) -> dict[str, dict]:
    """Files already there with the wanted bytes: same digest recorded, same size and ETag now."""
    recorded = marker.get("files", {}) if marker.get("format") == MARKER_FORMAT else {}
    kept = {}
    for rel, want in wanted.items():
        rec, now = recorded.get(rel), listing.get(rel)
        if rec and now and rec.get("digest") == want["digest"] and now.get("size") == want["size"] and rec.get("etag") and now.get("ETag") == rec["etag"]:
            kept[rel] = rec
    return kept


def publish_remote(art: Artifact, dest: str, cache: Cache, executor=None) -> str:
    fs, root = open_store(dest, "export.path")
    # Two builds publishing here at once take turns: the second finds it up-to-date (same
    # artifact) or replaces it whole (another), never a mix of both.
    with RemoteLease(fs, f"{root}/{LEASE}").held():
        return _publish(art, fs, root, cache, executor)


def publish_remote_job(item: tuple[str, str, str, dict]) -> str:
    """publish_remote where the job runs (a worker of a tier's cluster): (cache location, key,
    destination, blob -> ETag the build verified) -> the status. The entry is this node's copy, or
    downloaded here, verified; objects the build verified are copied within the store."""
    from loadgraph.errors import BuildError

    location, key, dest, etags = item
    cache = Cache(location)
    getattr(cache, "verified_etags", {}).update(etags)
    art = cache.get(key)
    if art is None:
        raise BuildError(f"{cache.object_dir(key)}: gone before it could be exported to {dest}; rerun the build")
    return publish_remote(art, dest, cache)


def _publish(art: Artifact, fs, root: str, cache: Cache, executor) -> str:
    listing = _listing(fs, root)
    marker = _read(fs, f"{root}/{MARKER}")
    manifest = _manifest_bytes(art, cache)
    wanted = _wanted(art, manifest)
    kept = _kept(wanted, marker, listing)
    stale = sorted(set(listing) - set(wanted) - {MARKER})
    if len(kept) == len(wanted) and marker.get("key") == art.key:
        _remove(fs, root, stale)
        return "up-to-date"
    # Ours from now on, and no longer complete: a kill from here leaves a prefix the next build
    # recognises as its own and finishes, never a manifest beside shards it does not describe.
    put_json(fs, f"{root}/{MARKER}", {"format": MARKER_FORMAT, "key": art.key, "complete": False, "files": kept})
    if MANIFEST in listing:
        fs.rm_file(f"{root}/{MANIFEST}")
    todo = sorted(rel for rel in wanted if rel not in kept and rel != MANIFEST)
    etags = dict(zip(todo, _transfer(art, fs, root, todo, cache, executor)))
    fs.pipe_file(f"{root}/{MANIFEST}", manifest)  # the commit marker, last
    etags[MANIFEST] = fs.info(f"{root}/{MANIFEST}")["ETag"]
    files = {**kept, **{rel: {**wanted[rel], "etag": etag} for rel, etag in etags.items()}}
    put_json(fs, f"{root}/{MARKER}", {"format": MARKER_FORMAT, "key": art.key, "complete": True, "files": files})
    _remove(fs, root, stale)
    return "published"


def _transfer(art: Artifact, fs, root: str, rels: list[str], cache: Cache, executor) -> list[str]:
    """Put each file at root/rel; returns their ETags, in order."""
    tier = getattr(cache, "fs", None)
    if tier is not None and type(tier) is type(fs) and tier.storage_options == fs.storage_options:
        # The cache tier is on the same store: server-side copies of its content objects.
        return parallel(lambda rel: _copy_one(cache, art, rel, fs, f"{root}/{rel}"), rels)
    jobs = [(str(art.path / rel), f"{root}/{rel}") for rel in rels]
    run_io = getattr(executor, "run_io", None)
    if run_io is not None and not url_of(cache.location):
        # The cache is one shared path on every node: the workers upload, not the driver.
        return run_io(_upload_job, [(src, dst, fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol, fs.storage_options) for src, dst in jobs])
    return parallel(lambda job: _upload_one(job[0], job[1], fs), jobs)


def _copy_one(cache, art: Artifact, rel: str, fs, rpath: str) -> str:
    """A server-side copy of the tier's object, only if it still has the ETag of bytes this process
    verified; otherwise (not in the tier, never seen, or changed since) this node's verified copy."""
    blob = cache.blob_path(art.files[rel])
    known = cache.verified_etags.get(blob)
    try:
        if known and fs.info(blob).get("ETag") == known:
            fs.copy(blob, rpath)
            return fs.info(rpath)["ETag"]
    except FileNotFoundError:
        pass
    return _upload_one(str(art.path / rel), rpath, fs)


def _upload_one(src: str, rpath: str, fs) -> str:
    put_file(fs, Path(src), rpath)
    return fs.info(rpath)["ETag"]


def _upload_job(job: tuple[str, str, str, dict]) -> str:
    """In a Ray worker: the same upload, through this worker's own filesystem instance."""
    import fsspec

    src, rpath, protocol, options = job
    return _upload_one(src, rpath, fsspec.filesystem(protocol, **options))


def _remove(fs, root: str, rels: list[str]) -> None:
    for rel in rels:
        try:
            fs.rm_file(f"{root}/{rel}")
        except FileNotFoundError:
            pass
