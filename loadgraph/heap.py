"""glibc's malloc told to keep large freed blocks for reuse instead of unmapping them.

glibc serves an allocation above its mmap threshold (at most 32 MB by its own adjustment) with a
fresh mmap and returns it with munmap on free, so every such tensor costs its page faults again
(a 90 MB read into a new buffer ran at 0.9 GB/s, into a reused one at 5: stages/tensor_io.py).
bitsandbytes' CPU nf4 allocates five float32 temporaries of a weight's size per weight: with the
thresholds raised, a 8192x2048 weight quantized in 0.20 s instead of 0.26 on 2 cores. A freed
block serves a later request it can hold (alignment padding can keep out one of the same size),
so the reuse is partial; that gain is what it gives. Freed blocks stay mapped for the next
tensor, so a process's peak RSS can be higher (the 2-core nf4 build: 0.96 GiB, against 0.76 in
the previous stop's table).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LIMIT = 1 << 30  # above any tensor a unit holds


def reuse_large_blocks() -> bool:
    """For this process (idempotent); False where the C library is not glibc or the user opted
    out with LOADGRAPH_MALLOC_TUNING=0."""
    if os.environ.get("LOADGRAPH_MALLOC_TUNING") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LIMIT))
    except (OSError, AttributeError):
        return False
