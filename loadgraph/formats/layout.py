"""Output layouts decided before any unit runs, and a writer that places tensors at their offsets.

A stage knows every output tensor's name, dtype and shape up front (from the input headers and,
for bitsandbytes, the quantization plan), so the shard files' headers and every tensor's offset
are computable before the first byte is produced. Tensors whose length only the work reveals
(bitsandbytes' JSON quant states: a few hundred bytes each) are "tails": the header is written with
room for each at its maximum, they go after the file's fixed tensors once every unit returned
their bytes, and the header is rewritten then, padded to the same length (finish_files). Units sized by bytes then write their tensors
straight into the final files with pwrite, from any process that sees the files: the layout
never costs a second full write, and parallelism is not bounded by the number of shards.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping

from loadgraph import faults
from loadgraph.formats.digest import digest_bytes, hasher
from loadgraph.formats.partition import equal_runs
from loadgraph.formats.safetensors import COPY_CHUNK, FSYNC, PlannedTensor, encode_header, safetensors_order, tensor_bytes

if TYPE_CHECKING:
    import torch

SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"
SINGLE_NAME = "model.safetensors"  # save_pretrained's name for one shard, written without an index


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [SHARD_NAME.format(i=i, n=n) for i in range(1, n + 1)]


@dataclass(frozen=True)
class Placed:
    """One output tensor: its file and absolute byte range there."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def table(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "file": self.file, "begin": self.begin, "end": self.end}


@dataclass(frozen=True)
class Layout:
    headers: dict[str, bytes]  # file -> its header bytes (length prefix + JSON + padding)
    sizes: dict[str, int]  # file -> total size
    tensors: dict[str, Placed]  # in file order, then offset order
    order: tuple[str, ...] = ()  # the planned (checkpoint) order: the manifest keeps it, exports pack by it
    # file -> its variable-length (U8) tensors, placed after `sizes[file]` by finish_files; until
    # then `headers` describes each at its maximum and `tensors` holds only the fixed ones.
    tails: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    metadata: Mapping[str, str] | None = None


def group_by_bytes(items: Iterable, nbytes: Callable, limit: int) -> list[list]:
    """Consecutive items in groups of at most `limit` bytes (an item bigger than that is a group
    alone): huggingface_hub's greedy shard splitter, and the unit sizing."""
    groups: list[list] = [[]]
    size = 0
    for item in items:
        n = nbytes(item)
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    return [g for g in groups if g] or [[]]


def balanced_groups(items: list, nbytes: Callable, limit: int, multiple: int) -> list[list]:
    """Consecutive items in groups of at most about `limit` bytes whose number is a multiple of
    `multiple` (the workers that run them: equal groups finish in whole waves, where groups of
    `limit` leave the last wave part idle)."""
    count = -(-sum(map(nbytes, items)) // max(limit, 1))
    return equal_runs(items, nbytes, max(1, -(-count // multiple) * multiple))


def pack(tensors: Iterable[PlannedTensor], max_bytes: int) -> list[list[PlannedTensor]]:
    """Shards in checkpoint order, as huggingface_hub's splitter packs them."""
    return group_by_bytes(tensors, lambda t: t.nbytes, max_bytes)


def plan_layout(groups: list[list[PlannedTensor]], names: list[str], metadata: Mapping[str, str] | None,
                variable: Mapping[str, int] | None = None) -> Layout:
    """`variable`: name -> most bytes of each 1-D U8 tensor whose length is known only after the
    units ran (its planned shape is an estimate, used for packing shards, not for placing)."""
    variable = variable or {}
    headers: dict[str, bytes] = {}
    sizes: dict[str, int] = {}
    placed: dict[str, Placed] = {}
    tails: dict[str, tuple[str, ...]] = {}
    for rel, group in zip(names, groups):
        order = safetensors_order([t for t in group if t.name not in variable])
        tail = [t for t in group if t.name in variable]
        if any(t.dtype != "U8" for t in tail):
            raise ValueError(f"{rel}: variable-length tensors must be U8 bytes")
        # Digits only grow with the numbers: a header with every tail at its maximum is at least
        # as long as the final one, so the final header fits the room reserved here.
        header = encode_header(order + [PlannedTensor(t.name, "U8", (variable[t.name],)) for t in tail], metadata)
        headers[rel] = header
        offset = len(header)
        for t in order:
            placed[t.name] = Placed(t.name, t.dtype, t.shape, rel, offset, offset + t.nbytes)
            offset += t.nbytes
        sizes[rel] = offset
        if tail:
            tails[rel] = tuple(t.name for t in tail)
    return Layout(headers, sizes, placed, tuple(t.name for group in groups for t in group), tails, metadata)


def finish_files(root: Path, layout: Layout, tail_bytes: Mapping[str, bytes]) -> tuple[Layout, dict[str, dict]]:
    """Write each file's tails after its fixed tensors and its final header over the reserved one
    (same length: data offsets stay); returns the final layout and the tails' table rows, with
    the digests of the bytes written (nothing is read back)."""
    headers, sizes, tensors = dict(layout.headers), dict(layout.sizes), dict(layout.tensors)
    rows: dict[str, dict] = {}
    for rel, names in layout.tails.items():
        fixed = sorted((p for p in layout.tensors.values() if p.file == rel), key=lambda p: p.begin)
        planned = [PlannedTensor(p.name, p.dtype, p.shape) for p in fixed] + [PlannedTensor(n, "U8", (len(tail_bytes[n]),)) for n in names]
        header = encode_header(planned, layout.metadata, pad_to=len(layout.headers[rel]) - 8)
        offset = layout.sizes[rel]
        fd = os.open(root / rel, os.O_WRONLY)
        try:
            for name in names:
                data = memoryview(tail_bytes[name])
                tensors[name] = Placed(name, "U8", (len(data),), rel, offset, offset + len(data))
                rows[name] = {**tensors[name].table(), "blake3": digest_bytes(data)}
                while len(data):
                    n = os.pwrite(fd, data, offset)
                    data, offset = data[n:], offset + n
            os.ftruncate(fd, offset)
            os.pwrite(fd, header, 0)
            if FSYNC:
                os.fsync(fd)
        finally:
            os.close(fd)
        headers[rel], sizes[rel] = header, offset
    return Layout(headers, sizes, tensors, layout.order, {}, layout.metadata), rows


def _finished(fd: int, layout: Layout, rel: str, current: bytes) -> bool:
    """Whether a file is `layout`'s after finish_files (a build killed between finishing and
    publishing): same header length and fixed entries, so every fixed tensor's bytes are in place."""
    header = layout.headers[rel]
    if current[:8] != header[:8] or os.fstat(fd).st_size < layout.sizes[rel]:
        return False
    try:
        doc, want = json.loads(current[8:]), json.loads(header[8:])
    except ValueError:
        return False
    return all(doc.get(name) == entry for name, entry in want.items() if name not in layout.tails[rel])


def unit_groups(layout: Layout, unit_bytes: int, workers: int | None = None) -> list[list[str]]:
    """Consecutive tensors (file order) in groups of about `unit_bytes`, a multiple of `workers`
    of them when given; a big tensor is a group alone."""
    return tensor_groups(list(layout.tensors), lambda n: layout.tensors[n].nbytes, unit_bytes, workers)


def tensor_groups(names: list[str], nbytes: Callable[[str], int], unit_bytes: int, workers: int | None = None) -> list[list[str]]:
    if workers and workers > 1:
        groups = balanced_groups(names, nbytes, unit_bytes, workers)
    else:
        groups = group_by_bytes(names, nbytes, unit_bytes)
    return [g for g in groups if g]


def prepare_files(root: Path, layout: Layout) -> dict[str, str]:
    """Create each file at its final size with its header (idempotent: a resumed build keeps the
    tensors finished units wrote); returns each header's digest."""
    digests = {}
    for rel, header in layout.headers.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            current = os.pread(fd, len(header), 0)
            if rel in layout.tails and current != header and _finished(fd, layout, rel, current):
                # Back to the state the units wrote into: the tails are written again from their results.
                os.ftruncate(fd, layout.sizes[rel])
                os.pwrite(fd, header, 0)
            elif os.fstat(fd).st_size != layout.sizes[rel] or current != header:
                os.ftruncate(fd, 0)
                try:
                    # Allocated up front: pwrite into a sparse file's holes ran at ~150 MB/s on ext4
                    # here, into allocated (unwritten) extents at ~5 GB/s.
                    os.posix_fallocate(fd, 0, layout.sizes[rel])
                except OSError:
                    os.ftruncate(fd, layout.sizes[rel])  # a filesystem without fallocate: sparse
                os.pwrite(fd, header, 0)
        finally:
            os.close(fd)
        digests[rel] = digest_bytes(header)
    return digests


class PlacedWriter:
    """Writes some tensors of prepared files at their planned offsets, hashing each (its digest
    joins the manifest; the file's tree digest is computed from them without reading it back).

    Tensors handed over are written on a background thread while the caller computes the next;
    at most `max_pending` wait, bounding memory."""

    def __init__(self, root: Path, layout: Layout, on_progress: Callable[[float], None] | None = None, total: int = 0,
                 max_pending: int = 2):
        self.root, self.layout = root, layout
        self.digests: dict[str, str] = {}
        self.written = 0
        self.seconds = {"write": 0.0, "hash_out": 0.0}  # pwrite and output hashing, for the report's breakdown
        self._fds: dict[str, int] = {}
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="placed-writer")
        self._pending: list = []
        self.max_pending = max_pending
        self._on_progress, self._total, self._handed = on_progress, total or 1, 0
        self._buf: memoryview | None = None

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            self._fds[rel] = os.open(self.root / rel, os.O_WRONLY)
        return self._fds[rel]

    def _pwrite(self, fd: int, data: memoryview, offset: int) -> None:
        faults.wrote(len(data))
        t0 = time.perf_counter()
        while len(data):
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
            self.written += n
        self.seconds["write"] += time.perf_counter() - t0

    def _progress(self, nbytes: int) -> None:
        self._handed += nbytes
        if self._on_progress is not None:
            self._on_progress(min(1.0, self._handed / self._total))

    def _place(self, name: str, nbytes: int) -> "Placed":
        p = self.layout.tensors[name]
        if p.nbytes != nbytes:
            raise RuntimeError(f"{p.file}: {name} is {nbytes} B where the layout planned {p.nbytes} B")
        return p

    def write_tensor(self, name: str, tensor: "torch.Tensor") -> None:
        data = tensor_bytes(tensor)  # a view: keeps the tensor alive until written
        p = self._place(name, len(data))
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._io.submit(self._write_one, p, data))
        self._progress(len(data))

    def _write_one(self, p: Placed, data: memoryview) -> None:
        t0 = time.perf_counter()
        self.digests[p.name] = digest_bytes(data)
        self.seconds["hash_out"] += time.perf_counter() - t0
        self._pwrite(self._fd(p.file), data, p.begin)

    def copy(self, name: str, chunks: Iterable[memoryview]) -> str:
        """Write a tensor from a stream of byte chunks (a verbatim copy); returns its digest."""
        for _ in self.tee(name, chunks):
            pass
        return self.digests[name]

    def tee(self, name: str, chunks: Iterable[memoryview]) -> Iterator[memoryview]:
        """copy() as a stream: each chunk is passed on once written (to a second writer, fused)."""
        self.drain()
        p = self.layout.tensors[name]
        h, offset = hasher(p.nbytes), p.begin
        for chunk in chunks:
            t0 = time.perf_counter()
            h.update(chunk)
            self.seconds["hash_out"] += time.perf_counter() - t0
            self._pwrite(self._fd(p.file), chunk, offset)
            offset += len(chunk)
            self._progress(len(chunk))
            yield chunk
        if offset != p.end:
            raise RuntimeError(f"{p.file}: {name} copied {offset - p.begin} B where the layout planned {p.nbytes} B")
        self.digests[name] = h.hexdigest()

    def buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = memoryview(bytearray(COPY_CHUNK))
        return self._buf

    def drain(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> dict[str, str]:
        try:
            self.drain()
        finally:
            self._release()
        return self.digests

    def _release(self) -> None:
        self._io.shutdown(wait=True)
        for fd in self._fds.values():
            if FSYNC:
                os.fsync(fd)
            os.close(fd)
        self._fds.clear()

    def abort(self) -> None:
        for pending in self._pending:
            pending.cancel()
        self._pending.clear()
        self._release()
