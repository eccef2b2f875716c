"""Reading an input artifact's tensors inside a unit, checked in the same pass that reads them.

A manifest records each tensor's BLAKE3 (formats/digest.py). A unit checks exactly the bytes it
reads against it, so a cached input is never re-read whole before a node computes; bytes this
build produced itself (its digests computed while writing) are trusted and not hashed again.
An artifact without per-tensor digests (written before them, or linked from a hub snapshot) is
checked file by file, once per process, the first time a unit reads from the file.
"""

from __future__ import annotations

import os
import queue
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from loadgraph.errors import CorruptInput
from loadgraph.formats import digest
from loadgraph.formats.safetensors import COPY_CHUNK, TensorEntry, read_tensor

if TYPE_CHECKING:
    import torch

    from loadgraph.pipeline.cache import Artifact

_FILES_CHECKED: set[tuple[str, str]] = set()  # (path, digest) verified whole in this process


def grow_pinned(buf: "torch.Tensor | None", nbytes: int, least: int = 0) -> "torch.Tensor":
    """A page-locked uint8 buffer of at least `nbytes` (host-to-device copies from pageable memory
    run at ~2 GB/s, from pinned at ~50): `buf` itself while big enough, else a bigger one."""
    import torch

    if buf is None or buf.numel() < nbytes:
        buf = torch.empty(max(nbytes, least, 1), dtype=torch.uint8, pin_memory=True)
    return buf


class PinnedPairs:
    """A few (input, output) pinned buffer pairs shared by a process's unit threads: pinned pages
    count as resident memory, so their number, not the number of threads, bounds it."""

    def __init__(self, pairs: int):
        self._free: queue.Queue = queue.Queue()
        for _ in range(pairs):
            self._free.put([None, None])

    @contextmanager
    def pair(self):
        bufs = self._free.get()
        try:
            yield bufs
        finally:
            self._free.put(bufs)


PINNED = PinnedPairs(int(os.environ.get("LOADGRAPH_PINNED_PAIRS", 4)))


class ScratchRing:
    """A unit's reusable read buffers. A fresh buffer per tensor costs its page faults (measured:
    a 90 MB read at 0.9 GB/s into a new bytearray, 5 GB/s into a reused one). A tensor read into
    one, processed in place and handed to a PlacedWriter keeps it until written: with one more
    buffer than the writer's `max_pending`, a buffer comes round only once its write is done.

    Its writer keeps WRITES_PENDING = 1 write waiting: one tensor is written while the next is read
    and computed, which is all the overlap one writer thread gives, and every buffer grows to the
    largest tensor it held, for each of 16 threaded units (with three buffers each a 7B merge
    peaked at 5.41 GiB of RSS, 3.65 with a fresh buffer per tensor; 4.34 with two, on another host)."""

    WRITES_PENDING = 1

    def __init__(self, slots: int = WRITES_PENDING + 1):
        self._bufs: list = [None] * slots
        self._next = 0

    def take(self, nbytes: int) -> "torch.Tensor":
        import torch

        i, self._next = self._next, (self._next + 1) % len(self._bufs)
        if self._bufs[i] is None or self._bufs[i].numel() < nbytes:
            self._bufs[i] = None  # the old one goes before its replacement is allocated
            self._bufs[i] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return self._bufs[i]


def entry(t: dict) -> TensorEntry:
    return TensorEntry(t["dtype"], tuple(t["shape"]), t["begin"], t["end"])


class ArtifactReader:
    def __init__(self, art: "Artifact", trusted: bool = False):
        self.art = art
        self.trusted = trusted
        self.bytes_read = 0
        self.bytes_hashed = 0
        self.seconds = {"read": 0.0, "hash": 0.0}  # spent reading and checking, for the report's breakdown

    def _corrupt(self, what: str) -> CorruptInput:
        return CorruptInput(f"{what}: bytes differ from the digest in the manifest of cache entry {self.art.key[:12]}; evicting it", self.art.key)

    def path(self, name: str) -> Path:
        return self.art.path / self.art.tensors[name]["file"]

    def _check_file(self, name: str) -> bool:
        """True when the tensor must be hashed itself; checks its whole file first if it has no tensor digests."""
        if self.trusted:
            return False
        t = self.art.tensors[name]
        if t.get("blake3"):
            return True
        self.check_file(t["file"])
        return False

    def check_file(self, rel: str) -> None:
        """The whole file `rel` against the manifest's digest, once per process, unless trusted:
        what a stage that links an input file (reading none of it) must do before passing it on."""
        if self.trusted:
            return
        meta = self.art.files.get(rel, {})
        mark = (str(self.art.path / rel), digest.recorded(meta))
        if mark not in _FILES_CHECKED:
            if not digest.matches(self.art.path / rel, meta):
                raise self._corrupt(str(self.art.path / rel))
            self.bytes_hashed += meta.get("size", 0)
            _FILES_CHECKED.add(mark)

    def read(self, name: str, into: "torch.Tensor | None" = None) -> "torch.Tensor":
        t = self.art.tensors[name]
        check = self._check_file(name)
        t0 = time.perf_counter()
        tensor = read_tensor(self.path(name), entry(t), into=into)
        t1 = time.perf_counter()
        self.seconds["read"] += t1 - t0
        self.bytes_read += t["end"] - t["begin"]
        if check:
            raw = tensor.reshape(-1).view(__import__("torch").uint8).numpy() if tensor.numel() else b""
            if digest.digest_bytes(raw) != t["blake3"]:
                raise self._corrupt(f"{self.path(name)}: tensor {name}")
            self.bytes_hashed += t["end"] - t["begin"]
            self.seconds["hash"] += time.perf_counter() - t1
        return tensor

    def check_copied(self, name: str, got: str) -> None:
        """A writer copied the tensor's bytes itself (ShardWriter.copy_from) and hashed them: check them."""
        t = self.art.tensors[name]
        self.bytes_read += t["end"] - t["begin"]
        if self._check_file(name):
            if got != t["blake3"]:
                raise self._corrupt(f"{self.path(name)}: tensor {name}")
            self.bytes_hashed += t["end"] - t["begin"]

    def chunks(self, name: str, buf: memoryview | None = None, sizes: list[int] | None = None) -> Iterator[memoryview]:
        """The tensor's bytes as chunks of one reused buffer (of `sizes` bytes each, when given),
        checked when the last chunk is out (a consumer that writes them stages its output, so a
        mismatch publishes nothing): iterate to the end, or the check never runs."""
        t = self.art.tensors[name]
        check = self._check_file(name)
        h = digest.hasher(t["end"] - t["begin"]) if check else None
        buf = buf if buf is not None else memoryview(bytearray(COPY_CHUNK))
        with open(self.path(name), "rb", buffering=0) as f:
            pos, end = t["begin"], t["end"]
            pieces = iter(sizes) if sizes is not None else None
            while pos < end:
                size = next(pieces) if pieces is not None else min(len(buf), end - pos)
                t0, got = time.perf_counter(), 0
                while got < size:  # a piece is filled whole: its consumer reads it as rows of a tensor
                    n = os.preadv(f.fileno(), [buf[got:size]], pos + got)
                    if n <= 0:
                        raise self._corrupt(f"{self.path(name)}: tensor {name} (file truncated)")
                    got += n
                t1 = time.perf_counter()
                self.seconds["read"] += t1 - t0
                if h is not None:
                    h.update(buf[:got])
                    self.seconds["hash"] += time.perf_counter() - t1
                yield buf[:got]
                pos += got
        self.bytes_read += t["end"] - t["begin"]
        if h is not None:
            if h.hexdigest() != t["blake3"]:
                raise self._corrupt(f"{self.path(name)}: tensor {name}")
            self.bytes_hashed += t["end"] - t["begin"]
