"""Object stores (fsspec) as loadgraph uses them: which URLs, which backend, verified transfers,
and the conditional writes that stand in for the rename and the lock an object store lacks.

Used by the cache's remote tier (remote_tier.py) and by exports to object storage
(remote_export.py); it knows URLs and bytes, never artifacts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from loadgraph.errors import InputError

# scheme -> the fsspec backend package (extras: loadgraph[s3], loadgraph[gcs])
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
CHUNK = 8 << 20
TRANSFERS = 8  # files moved at once; s3fs also sends the parts of one big file concurrently
# `Path("s3://b/p")` is "s3:/b/p": typer hands --cache over as a Path, so a URL arrives collapsed.
_URLISH = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")


def url_of(value: str | os.PathLike | None) -> str | None:
    """The URL a --cache or export value names (restoring a collapsed `s3:/`), or None for a path."""
    if value is None:
        return None
    m = _URLISH.match(os.fspath(value))
    return f"{m.group(1).lower()}://{m.group(2)}" if m else None


LOCAL_ENV = "LOADGRAPH_LOCAL_CACHE"


def local_dir_for(url: str) -> Path:
    """This node's local cache in front of the tier at `url`: LOADGRAPH_LOCAL_CACHE (set per
    node), else a directory named after the URL under the user cache dir."""
    configured = os.environ.get(LOCAL_ENV)
    if configured:
        # "{node}": one directory per Ray node, for several nodes on one host (or a simulated cluster).
        if "{node}" in configured:
            configured = configured.replace("{node}", _ray_node() or "driver")
        return Path(configured).expanduser().absolute()
    scheme, rest = url.split("://", 1)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", rest).strip("-")[:80]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "loadgraph-tiers" / f"{scheme}-{slug}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _ray_node() -> str | None:
    import sys

    if "ray" not in sys.modules:
        return None
    import ray

    if not ray.is_initialized():
        return None
    try:
        ctx = ray.get_runtime_context()
        # Only inside a task: a driver keeps one directory before and after it starts Ray.
        return ctx.get_node_id()[:16] if ctx.get_task_id() else None
    except Exception:  # noqa: BLE001 - client mode: no node of our own
        return None


def local_root(cache_root: str | os.PathLike) -> Path:
    """The directory this process uses for a cache location (a path, or a tier's URL)."""
    url = url_of(cache_root)
    return local_dir_for(url) if url else Path(cache_root)


def open_store(url: str, field: str):
    """(fsspec filesystem, root path without the scheme) for `url`; InputError for what cannot work.

    Checked at plan time: an unsupported scheme or a backend that is not installed is one line and
    exit 2 before any work, never a failure after the build."""
    scheme = url.split("://", 1)[0]
    if scheme not in BACKENDS:
        supported = ", ".join(f"{s}://" for s in BACKENDS)
        raise InputError(f"{field}: {url}: unsupported URL scheme {scheme}://; use a local path or one of {supported}")
    package = BACKENDS[scheme]
    import fsspec

    try:
        # No listings cache: other nodes write the same prefixes, a cached listing would be stale.
        fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError:
        raise InputError(f"{field}: {url} needs the {package} package, which is not installed: pip install {package}") from None
    root = root.rstrip("/")
    if not root:
        raise InputError(f"{field}: {url} names no bucket; write {scheme}://BUCKET/PREFIX")
    return fs, root


def check_reachable(fs, root: str, field: str, url: str) -> None:
    """One listing: a missing bucket or refused credentials is one line at plan time."""
    bucket = root.split("/", 1)[0]
    try:
        if not fs.exists(bucket):
            raise InputError(f"{field}: {url}: bucket {bucket} does not exist (or is not visible with these credentials); create it or fix the URL")
    except InputError:
        raise
    except PermissionError as exc:
        raise InputError(f"{field}: {url}: access denied ({exc}); check the credentials (AWS_* / GOOGLE_APPLICATION_CREDENTIALS)") from None
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp raise many kinds; each means unreachable
        raise InputError(f"{field}: {url}: cannot reach the object store ({type(exc).__name__}: {exc}); check the endpoint (AWS_ENDPOINT_URL) and credentials") from None


# -- digests -------------------------------------------------------------------------------------
def file_digest(meta: dict) -> tuple[str, str]:
    """(kind, digest) of a manifest file entry, whichever digest it records (formats/digest.py):
    the kind names how it was computed (a safetensors tensor tree, plain BLAKE3, legacy sha256),
    so that content objects named by it never mix two kinds."""
    from loadgraph.formats.digest import recorded

    value = recorded(meta)
    if not value:
        raise KeyError(f"no digest in {sorted(meta)}")
    kind = (meta.get("tree") or "blake3") if meta.get("blake3") else "sha256"
    return kind, value


def download_verified(fs, rpath: str, lpath: Path, meta: dict) -> str | None:
    """Download an object to `lpath` and check it against the digest `meta` records. Returns the
    ETag of the bytes read ("" if the store gives none), or None (and no file) if they are
    missing or differ."""
    from loadgraph.formats.digest import matches

    try:
        with fs.open(rpath, "rb", block_size=CHUNK, cache_type="none") as fi, open(lpath, "wb") as fo:
            etag = (getattr(fi, "details", None) or {}).get("ETag", "")  # s3fs reads with If-Match on it
            while chunk := fi.read(CHUNK):
                fo.write(chunk)
    except FileNotFoundError:
        lpath.unlink(missing_ok=True)
        return None
    if not matches(lpath, meta):  # a second read, from the page cache
        lpath.unlink(missing_ok=True)
        return None
    return etag


def parallel(fn: Callable, items: Iterable) -> list:
    """fn over items, TRANSFERS at a time (network-bound: threads, s3fs releases the GIL)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(TRANSFERS, len(items))) as pool:
        return list(pool.map(fn, items))


def put_file(fs, lpath: Path, rpath: str) -> None:
    """One upload; s3fs turns a big file into a multipart upload whose parts go concurrently, and
    S3 makes an object visible only when the whole upload completes (never half an object)."""
    from loadgraph import faults

    fs.put_file(str(lpath), rpath)
    faults.uploaded()


# -- conditional writes --------------------------------------------------------------------------
def _etag(fs, path: str, response: object) -> str | None:
    if isinstance(response, dict) and response.get("ETag"):
        return response["ETag"]
    try:
        return fs.info(path).get("ETag")
    except FileNotFoundError:
        return None


def create_exclusive(fs, path: str, data: bytes) -> str | None:
    """Write `path` only if it does not exist (S3 `If-None-Match: *`); its ETag, or None if taken."""
    try:
        return _etag(fs, path, fs.pipe_file(path, data, mode="create")) or ""
    except FileExistsError:
        return None


def replace_if(fs, path: str, data: bytes, etag: str) -> str | None:
    """Overwrite `path` only if it still has `etag` (S3 `If-Match`); the new ETag, or None."""
    try:
        return _etag(fs, path, fs.pipe_file(path, data, IfMatch=etag)) or ""
    except (FileNotFoundError, FileExistsError):
        return None
    except OSError as exc:  # s3fs maps 412 Precondition Failed to EINVAL
        if "condition" in str(exc).lower():
            return None
        raise


def read_json(fs, path: str) -> object:
    """A small JSON object, or None if absent or unreadable (an unreadable record is no record)."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def put_json(fs, path: str, doc: dict) -> None:
    fs.pipe_file(path, json.dumps(doc, indent=1, sort_keys=True).encode())


def read_with_etag(fs, path: str) -> tuple[bytes, str | None]:
    info = fs.info(path)
    return fs.cat_file(path), info.get("ETag")
