"""File and tensor digests: BLAKE3, one pass, multi-threaded for large buffers.

Every safetensors file loadgraph records is identified by a *tensor tree* digest: BLAKE3 over
the header bytes' digest followed by each tensor's digest in file order. Writers that place
tensors at their final offsets from several processes know every tensor's digest without
re-reading the file, and a reader can check exactly the tensor bytes it reads against the
manifest's per-tensor digests. Other files get a plain BLAKE3 of their bytes. Manifests from
before BLAKE3 carry "sha256"; they are still checked (by sha256), never misread.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Mapping

import blake3

from loadgraph.formats.partition import equal_runs

from loadgraph.errors import InputError

TREE = "st-tensors-1"
_TREE_PREFIX = b"loadgraph " + TREE.encode() + b"\n"
CHUNK = 64 * 1024 * 1024
# Below this a single-threaded update is faster than fanning out.
MULTI_THREAD_MIN = 8 * 1024 * 1024
# A safetensors file this large per core is hashed by parallel runs of its tensors, each through a
# buffer of RUN_CHUNK (16 runs of a 7B's three 5 GB shards at once: 192 MB of buffers).
SPLIT_MIN = 256 * 1024 * 1024
RUN_CHUNK = 4 * 1024 * 1024


# Bytes this process set out to hash (every hasher is made for a known length): how the build
# report shows what the driver itself hashed, apart from the units on the workers.
_hashed = [0]
_hashed_lock = threading.Lock()


def _count(nbytes: int) -> None:
    with _hashed_lock:
        _hashed[0] += nbytes


def bytes_hashed() -> int:
    """Bytes hashed in this process so far (a counter: take differences)."""
    return _hashed[0]


def hasher(nbytes_hint: int = 0, threads: bool = True) -> "blake3.blake3":
    """A BLAKE3 hasher for about `nbytes_hint` bytes (counted in bytes_hashed()); with `threads`,
    BLAKE3's own threads for a large input."""
    _count(nbytes_hint)
    return blake3.blake3(max_threads=blake3.blake3.AUTO if threads and nbytes_hint >= MULTI_THREAD_MIN else 1)


def digest_bytes(data) -> str:
    """BLAKE3 of a buffer (bytes, memoryview, numpy array); releases the GIL on large inputs."""
    n = memoryview(data).nbytes
    h = hasher(n)
    h.update(data)
    return h.hexdigest()


def tree_digest(header_digest: str, tensor_digests: Iterable[str]) -> str:
    h = blake3.blake3(_TREE_PREFIX)
    h.update(bytes.fromhex(header_digest))
    for d in tensor_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


class TreeHasher:
    """The tensor tree digest of a safetensors byte stream fed in order (header, then tensors by
    offset), so a file is hashed in the same pass that reads or copies it."""

    def __init__(self, data_offset: int, sizes: list[tuple[str, int]]):
        self._parts: list[tuple[str, int]] = [("", data_offset), *sizes]  # "" = the header bytes
        self._i, self._left = 0, data_offset
        self._h = hasher(data_offset)
        self.digests: dict[str, str] = {}
        self._head = ""
        self._skip_empty()

    @classmethod
    def for_header(cls, header) -> "TreeHasher":
        order = sorted(header.tensors.items(), key=lambda kv: kv[1].begin)
        return cls(header.data_offset, [(name, e.nbytes) for name, e in order])

    def _close_part(self) -> None:
        name = self._parts[self._i][0]
        if self._i == 0:
            self._head = self._h.hexdigest()
        else:
            self.digests[name] = self._h.hexdigest()
        self._i += 1
        if self._i < len(self._parts):
            self._left = self._parts[self._i][1]
            self._h = hasher(self._left)

    def _skip_empty(self) -> None:
        while self._i < len(self._parts) and self._left == 0:
            self._close_part()

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            if self._i >= len(self._parts):
                raise ValueError("more bytes than the safetensors header describes")
            take = min(self._left, len(view))
            self._h.update(view[:take])
            self._left -= take
            view = view[take:]
            self._skip_empty()

    def finish(self) -> tuple[str, dict[str, str]]:
        if self._i < len(self._parts):
            raise ValueError("fewer bytes than the safetensors header describes")
        return tree_digest(self._head, self.digests.values()), self.digests


def _stream(f, begin: int, nbytes: int, buf: memoryview):
    """Chunks of `f` from `begin`, `nbytes` long, through one reused buffer (pread: no seek state)."""
    pos = 0
    while pos < nbytes:
        want = min(len(buf), nbytes - pos)
        got = os.preadv(f.fileno(), [buf[:want]], begin + pos)
        if got <= 0:
            raise OSError(f"{getattr(f, 'name', 'file')}: unexpected end of file")
        yield buf[:got]
        pos += got


def blake3_file(path: str | os.PathLike) -> str:
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        h = hasher(size)
        for chunk in _stream(f, 0, size, memoryview(bytearray(max(1, min(CHUNK, size))))):
            h.update(chunk)
    return h.hexdigest()


def safetensors_digests(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(tree digest of the file, {tensor name: digest}) in one read. A large file is read and
    hashed by several threads, each a contiguous run of its parts: one stream's pread and hash
    alternate, while runs overlap them (both release the GIL) and keep every core busy."""
    from loadgraph.formats.safetensors import read_header

    header = read_header(path)  # its tensors tile the data section: the parts cover the file
    order = sorted(header.tensors.items(), key=lambda kv: kv[1].begin)
    parts = [("", 0, header.data_offset), *((name, e.begin, e.nbytes) for name, e in order)]  # "" = the header bytes
    runs = equal_runs(parts, lambda part: part[2], max(1, min(len(os.sched_getaffinity(0)), header.file_size // SPLIT_MIN)))
    if len(runs) == 1:
        digests = _hash_parts(path, parts, CHUNK, threads=True)
    else:
        with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="digest-run") as pool:
            digests = [d for run in pool.map(lambda run: _hash_parts(path, run, RUN_CHUNK, threads=False), runs) for d in run]
    return tree_digest(digests[0][1], (d for _, d in digests[1:])), dict(digests[1:])


def _hash_parts(path: str | os.PathLike, parts: list[tuple[str, int, int]], chunk: int, threads: bool) -> list[tuple[str, str]]:
    """[(name, digest)] of contiguous (name, begin, nbytes) parts of a file, in order; `threads`:
    BLAKE3's own threads for large parts (a run among several keeps to its one thread)."""
    out = []
    with open(path, "rb", buffering=0) as f:
        buf = memoryview(bytearray(max(1, min(chunk, sum(n for _, _, n in parts)))))
        for name, begin, nbytes in parts:
            h = hasher(nbytes, threads)
            for data in _stream(f, begin, nbytes, buf):
                h.update(data)
            out.append((name, h.hexdigest()))
    return out


def is_safetensors(path: str | os.PathLike) -> bool:
    return str(path).endswith(".safetensors")


def file_record(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """The manifest record of a file ({size, blake3[, tree]}) and, for safetensors, its tensor digests."""
    path = Path(path)
    size = path.stat().st_size
    if is_safetensors(path):
        digest, tensors = safetensors_digests(path)
        return {"size": size, "blake3": digest, "tree": TREE}, tensors
    return {"size": size, "blake3": blake3_file(path)}, {}


def tree_record(size: int, digest: str) -> dict:
    return {"size": size, "blake3": digest, "tree": TREE}


def recorded(meta: Mapping) -> str:
    """The digest a manifest records for a file, whichever algorithm it used ('' if none)."""
    return meta.get("blake3") or meta.get("sha256") or ""


def actual(path: str | os.PathLike, meta: Mapping) -> str:
    """The file's digest computed the way `meta` recorded it (tree, plain BLAKE3 or legacy sha256)."""
    if "blake3" not in meta and "sha256" in meta:
        h = hashlib.sha256()
        _count(os.path.getsize(path))
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()
    if meta.get("tree") == TREE:
        return safetensors_digests(path)[0]
    return blake3_file(path)


def matches(path: str | os.PathLike, meta: Mapping) -> bool:
    try:
        return actual(path, meta) == recorded(meta)
    except (OSError, ValueError, InputError):  # a damaged header is a mismatch, not a crash
        return False


def same_digest(meta: Mapping, other: Mapping) -> bool:
    return bool(recorded(meta)) and recorded(meta) == recorded(other)
