"""Byte-level safetensors: a validating header reader and a streaming shard writer.

The reader trusts nothing in the file (the header is attacker-controlled JSON) and never
reads past the file's end or allocates more than the file's size. The writer produces the
exact bytes `safetensors.torch.save_file` would (same tensor order, header layout and
padding) but takes one tensor at a time, so a shard of any size costs one tensor of memory.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Mapping

from loadgraph import faults
from loadgraph.formats.digest import TreeHasher, digest_bytes, hasher, is_safetensors, tree_digest
from loadgraph.errors import InputError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (bytes per element, torch dtype name). Ordered as the Rust enum is,
# because the writer sorts tensors by this rank (descending) exactly like safetensors does.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "C64": (8, "complex64"),
    "F64": (8, "float64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
}
_DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPES)}
TORCH_TO_ST = {torch_name: st for st, (_, torch_name) in DTYPES.items()}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# safetensors itself refuses headers above 100 MB; so do we, before allocating anything.
MAX_HEADER_BYTES = 100 * 1024 * 1024
COPY_CHUNK = 16 * 1024 * 1024
# Atomic rename already protects against crashes of the process; fsync adds protection
# against power loss at a large cost on slow disks, so it is opt-in.
FSYNC = os.environ.get("LOADGRAPH_FSYNC") == "1"
PARALLEL_HASH_MIN = 1 << 20
MAX_PENDING = 2


@functools.lru_cache(maxsize=1)
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="digest")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; `begin`/`end` are absolute file offsets."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    file_size: int
    data_offset: int
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def _bad(path: Path, what: str) -> InputError:
    return InputError(f"{path}: {what}; re-download or re-export this file")


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header without touching the tensor data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"truncated safetensors file ({file_size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > file_size - 8:
                raise _bad(path, f"header length {header_len} is larger than the file ({file_size} bytes): truncated or not safetensors")
            if header_len > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a .safetensors file") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not valid JSON ({exc.__class__.__name__})") from None
    except RecursionError:  # a nesting bomb: no real header nests more than two levels
        raise _bad(path, "header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(path, "header is not a JSON object")
    data_offset = 8 + header_len
    data_size = file_size - data_offset
    # Only an absent key means "no metadata": [] or 0 or false is a malformed header (unloadable).
    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors = {name: _parse_entry(path, name, entry, data_offset, data_size) for name, entry in doc.items()}
    _check_layout(path, tensors, data_offset, data_size)
    return Header(path, file_size, data_offset, metadata, tensors)


def _parse_entry(path: Path, name: str, entry: object, data_offset: int, data_size: int) -> TensorEntry:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets!r} must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} are negative or reversed")
    if end > data_size:
        raise _bad(path, f"tensor {name!r}: data_offsets {offsets} lie outside the {data_size}-byte data section (truncated file?)")
    expected = math.prod(shape) * DTYPES[dtype][0]
    if expected != end - begin:
        raise _bad(path, f"tensor {name!r}: shape {shape} of {dtype} needs {expected} bytes but data_offsets span {end - begin}")
    return TensorEntry(dtype, tuple(shape), data_offset + begin, data_offset + end)


def _check_layout(path: Path, tensors: Mapping[str, TensorEntry], data_offset: int, data_size: int) -> None:
    """Tensors must tile the data section: no overlap (aliasing), no gap, nothing trailing."""
    cursor = data_offset
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin < cursor:
            raise _bad(path, f"tensor {name!r} overlaps the tensor before it")
        if entry.begin > cursor:
            raise _bad(path, f"unreferenced bytes before tensor {name!r}")
        cursor = entry.end
    if cursor != data_offset + data_size:
        raise _bad(path, f"{data_offset + data_size - cursor} trailing bytes after the last tensor")


def read_tensor(path: str | os.PathLike, entry: TensorEntry, into: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Read one tensor with pread (no mmap: peak RSS stays one tensor, not the file).

    `into`: a uint8 tensor of at least `entry.nbytes` to read into (e.g. a reused pinned staging
    buffer for host-to-device copies); the result is then a view of it.
    """
    import torch

    buf = bytearray(entry.nbytes) if into is None else into.numpy()[: entry.nbytes]
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buf)
        pos, off = 0, entry.begin
        while pos < entry.nbytes:
            got = os.preadv(f.fileno(), [view[pos:]], off + pos)
            if got <= 0:
                raise _bad(Path(path), f"unexpected end of file reading a {entry.dtype}{list(entry.shape)} tensor")
            pos += got
    dtype = getattr(torch, DTYPES[entry.dtype][1])
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=dtype)
    if into is not None:
        return into[: entry.nbytes].view(dtype).reshape(entry.shape)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)


def st_dtype(tensor: "torch.Tensor") -> str:
    return TORCH_TO_ST[str(tensor.dtype).removeprefix("torch.")]


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """A tensor's raw little-endian bytes without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(__import__("torch").uint8).numpy())


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0]


def safetensors_order(tensors: Iterable[PlannedTensor]) -> list[PlannedTensor]:
    """The order safetensors lays tensors out in: larger alignment first, then by name."""
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))


def encode_header(tensors: list[PlannedTensor], metadata: Mapping[str, str] | None, pad_to: int = 0) -> bytes:
    """The length prefix and the header JSON, padded with spaces (as safetensors pads it) to a
    multiple of 8, or to `pad_to` bytes of JSON: a header rewritten in place keeps its length."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for t in tensors:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    if pad_to:
        if len(raw) > pad_to:
            raise ValueError(f"safetensors header of {len(raw)} bytes does not fit the {pad_to} reserved for it")
        raw += b" " * (pad_to - len(raw))
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file tensor by tensor, hashing each tensor as it goes (formats/digest.py).

    The full tensor list is known up front (from source headers), so the header is written
    first and each tensor's bytes stream after it in safetensors order.
    """

    def __init__(self, path: Path, tensors: Iterable[PlannedTensor], metadata: Mapping[str, str] | None = None,
                 on_progress: Callable[[float], None] | None = None):
        self.path = path
        self.order = safetensors_order(tensors)
        # Fraction of the tensor bytes handed over so far, for a live progress line.
        self._on_progress = on_progress
        self._total = sum(p.nbytes for p in self.order) or 1
        self._handed = 0
        self._next = 0
        self.tensor_digests: dict[str, str] = {}
        self._file: BinaryIO = open(path, "wb")
        self.size = 0
        # Computed tensors are written on a background thread so that the caller computes the
        # next tensor meanwhile; at most MAX_PENDING wait, bounding memory.
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: list = []
        self._sources: dict[str, BinaryIO] = {}  # files copied from, opened once, closed with the shard
        self._buf: bytearray | None = None
        header = encode_header(self.order, metadata)
        self._head = digest_bytes(header)
        self._emit(header)

    @property
    def pending(self) -> list[PlannedTensor]:
        return self.order[self._next :]

    def _emit(self, data: bytes | memoryview, h=None) -> None:
        """Write `data`, feeding hasher `h` on a second thread meanwhile (both release the GIL on
        big buffers); wait before returning because the caller reuses `data`'s buffer."""
        faults.wrote(len(data))
        if h is not None and len(data) >= PARALLEL_HASH_MIN:
            pending = _hash_pool().submit(h.update, data)
            self._file.write(data)
            pending.result()
        else:
            if h is not None:
                h.update(data)
            self._file.write(data)
        self.size += len(data)

    def _expect(self, name: str, nbytes: int) -> None:
        want = self.order[self._next]
        if want.name != name or want.nbytes != nbytes:
            raise RuntimeError(f"{self.path}: wrote {name} ({nbytes} B) where {want.name} ({want.nbytes} B) belongs")
        self._next += 1

    def _progress(self, nbytes: int) -> None:
        self._handed += nbytes
        if self._on_progress is not None:
            self._on_progress(self._handed / self._total)

    def write_tensor(self, name: str, tensor: "torch.Tensor") -> None:
        data = tensor_bytes(tensor)  # a view: keeps the tensor alive until written
        self._expect(name, len(data))
        while len(self._pending) >= MAX_PENDING:
            self._pending.pop(0).result()
        self._pending.append(self._io.submit(self._emit_tensor, name, data))
        self._progress(len(data))

    def _emit_tensor(self, name: str, data: memoryview) -> None:
        h = hasher(len(data))
        self._emit(data, h)
        self.tensor_digests[name] = h.hexdigest()

    def _drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def copy_from(self, name: str, path: str | os.PathLike, begin: int, nbytes: int) -> str:
        """Copy a tensor's bytes verbatim from `path` (absolute offsets) through one fixed buffer;
        returns their digest (what a reader checks against the source's manifest)."""
        self._drain()
        self._expect(name, nbytes)
        src = self._sources.get(str(path))
        if src is None:
            src = self._sources[str(path)] = open(path, "rb", buffering=0)
        if self._buf is None:
            self._buf = bytearray(COPY_CHUNK)
        buf = self._buf
        view = memoryview(buf)
        src.seek(begin)
        left = nbytes
        h = hasher(nbytes)
        while left:
            got = src.readinto(view[: min(left, len(buf))])
            if not got:
                raise InputError(f"{getattr(src, 'name', 'source')}: unexpected end of file copying {name!r}")
            self._emit(view[:got], h)
            self._progress(got)
            left -= got
        self.tensor_digests[name] = h.hexdigest()
        return self.tensor_digests[name]

    def close(self) -> str:
        """Finish the file and return its tensor tree digest."""
        self._drain()
        self._io.shutdown()
        if self._next != len(self.order):
            raise RuntimeError(f"{self.path}: {len(self.order) - self._next} tensors never written")
        self._file.flush()
        if FSYNC:
            os.fsync(self._file.fileno())
        self._file.close()
        self._close_sources()
        return tree_digest(self._head, (self.tensor_digests[p.name] for p in self.order))

    def _close_sources(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()

    def abort(self) -> None:
        for pending in self._pending:
            pending.cancel()
        self._io.shutdown(wait=True)
        self._file.close()
        self._close_sources()


def copy_and_hash(src: str | os.PathLike, dst: str | os.PathLike, chunk: int = COPY_CHUNK) -> tuple[str, dict[str, str]]:
    """Copy a file in one pass, returning the digest of what was written (the tensor tree digest
    for safetensors, with the tensors' digests) as formats/digest.py records it."""
    tree = TreeHasher.for_header(read_header(src)) if is_safetensors(src) else None
    with open(src, "rb", buffering=0) as fi, open(dst, "wb") as fo:
        h = tree or hasher(os.fstat(fi.fileno()).st_size)
        buf = bytearray(chunk)
        view = memoryview(buf)
        while got := fi.readinto(buf):
            faults.wrote(got)
            pending = _hash_pool().submit(h.update, view[:got])
            fo.write(view[:got])
            pending.result()
        fo.flush()
        if FSYNC:
            os.fsync(fo.fileno())
    return tree.finish() if tree else (h.hexdigest(), {})
