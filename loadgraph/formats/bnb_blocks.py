"""bitsandbytes' 4-bit quantization on the CPU, computed in cache-sized groups of blocks.

bitsandbytes 0.50.2 has no native CPU kernel for `quantize_4bit`: its "default" kernel runs six
whole-tensor torch passes (float cast, abs-max, scale, clamp, bucketize, pack), each through a
float32 temporary of the whole weight, and its `torch.bucketize` (a binary search per element)
takes most of the time. Measured on the 2-core box, one layer of the 1.2B bench model (61 M
elements): bitsandbytes 1.0-1.5 s; in groups of blocks 0.75 s, of which bucketize 0.65 s; with
`_code_index` in its place 0.21-0.24 s.

The bytes are the kernel's own: every step is elementwise or a per-block max (exact), done with
the same torch ops on the same dtypes in the same order, so a group of blocks gives what the whole
tensor gives; the code index is found by a table and one exact comparison (`_code_index`), which
gives what bucketize gives for every finite value.

The double quant then runs as `bitsandbytes.functional.quantize_4bit` runs it, on the whole absmax
vector, except its offset: bitsandbytes takes `absmax.mean()`, whose float32 rounding follows
torch's intra-op thread count (measured: half of the 1.2B model's projections get another offset
at 1 thread than at 2). `torch_mean` gives torch's mean at a stated thread count whatever this
process's count is, so the bytes follow the quantize node's key (stages/quantize.py puts the count
of the machine that plans the build there: transformers' count on that machine), not the worker.
Anything else (another bitsandbytes version, a device, a size that leaves a partial block or an
odd element count) goes to bitsandbytes itself.
"""

from __future__ import annotations

import functools

import torch

# The bitsandbytes versions whose default quantize_4bit kernel this reproduces (read and compared
# against it in tests/test_bnb_blocks.py).
KERNEL_VERSIONS = ("0.50.2",)
# 4096 blocks of 64: 1 MiB of float32 per temporary, inside a core's L2 share.
GROUP_ELEMENTS = 4096 * 64


def reproduces(A: torch.Tensor, blocksize: int, quant_type: str) -> bool:
    """Whether `quantize_4bit` below gives bitsandbytes' bytes for `A` (else bitsandbytes runs, and
    refuses what it refuses)."""
    import bitsandbytes

    n = A.numel()
    return (bitsandbytes.__version__ in KERNEL_VERSIONS and A.device.type == "cpu"
            and A.dtype in (torch.bfloat16, torch.float16, torch.float32) and quant_type in ("nf4", "fp4")
            and blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096)
            and n > 0 and n % blocksize == 0 and n % 2 == 0)


def quantize_4bit(A: torch.Tensor, blocksize: int, compress_statistics: bool, quant_type: str,
                  quant_storage: torch.dtype, offset_threads: int | None = None):
    """What `bitsandbytes.functional.quantize_4bit(A, ...)` returns, (packed, QuantState), in a
    process whose torch runs `offset_threads` intra-op threads (None: this process's count)."""
    import bitsandbytes.functional as bnbf

    if A.device.type != "cpu":  # another device's kernels and reductions: bitsandbytes' own
        return bnbf.quantize_4bit(A, blocksize=blocksize, compress_statistics=compress_statistics,
                                  quant_type=quant_type, quant_storage=quant_storage)
    if reproduces(A, blocksize, quant_type):
        out, absmax = _packed_and_absmax(A, blocksize, quant_type, quant_storage)
    else:
        out, state = bnbf.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, quant_storage=quant_storage)
        absmax = state.absmax
    # From here as bitsandbytes.functional.quantize_4bit does it, the offset at the stated count.
    code = bnbf.get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        offset = torch_mean(absmax, offset_threads or torch.get_num_threads())
        qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
        state = bnbf.QuantState(absmax=qabsmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                                quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = bnbf.QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code,
                                quant_type=quant_type)
    return out, state


# at::internal::GRAIN_SIZE: torch runs a reduction over fewer elements on one thread.
_TORCH_GRAIN = 32768


def torch_mean(x: torch.Tensor, threads: int) -> torch.Tensor:
    """`x.mean()` of a 1-D float32 tensor (a float32 scalar) as torch computes it with `threads`
    intra-op threads (OpenMP): at::parallel_for splits it into min(threads, n / grain) equal
    chunks, each summed on its own thread, the partial sums added in chunk order, then divided
    by n. Each chunk is summed here on one thread; set_num_threads is per OpenMP thread, so
    this thread's count is put back and other threads' are untouched."""
    n = x.numel()
    parts = 1 if n < _TORCH_GRAIN else min(threads, -(-n // _TORCH_GRAIN))
    chunk = -(-n // parts)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sums = [x[begin:begin + chunk].sum() for begin in range(0, n, chunk)]
    finally:
        torch.set_num_threads(before)
    total = sums[0]
    for part in sums[1:]:
        total = total + part
    return total / n


def _packed_and_absmax(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    """The default kernel's (packed, absmax), in groups of blocks."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds, order = _get_4bit_quantize_bounds(quant_type, A.device)
    flat = A.reshape(-1)
    n = flat.numel()
    packed = torch.empty(n // 2, dtype=torch.uint8)
    absmax = torch.empty(n // blocksize, dtype=torch.float32)
    step = max(blocksize, GROUP_ELEMENTS // blocksize * blocksize)
    for begin in range(0, n, step):
        end = min(n, begin + step)
        group = flat[begin:end].float().reshape(-1, blocksize)
        group_absmax = group.abs().max(dim=-1)[0]
        absmax[begin // blocksize:end // blocksize] = group_absmax
        scaled = torch.clamp(group * (1.0 / group_absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        q = _code_index(scaled, bounds, quant_type, bool(torch.isfinite(group_absmax).all()))
        if quant_type != "nf4":
            q = order[q]
        q8 = q.to(torch.uint8)
        torch.bitwise_or(q8[::2] << 4, q8[1::2], out=packed[begin // 2:end // 2])
    out = packed.unsqueeze(1)
    if quant_storage != torch.uint8:
        out = out.squeeze().view(quant_storage).unsqueeze(1)
    return out, absmax


def _code_index(scaled: torch.Tensor, bounds: torch.Tensor, quant_type: str, finite: bool) -> torch.Tensor:
    """`torch.bucketize(scaled, bounds)`: how many of the sorted `bounds` are below each value of
    `scaled` (float32 in [-1, 1]). A value's cell of width 1/cells gives, by table, the count of
    bounds below the cell before it (a lower bound on the answer, however the cell's float
    arithmetic rounds); no two bounds lie within three cells, so at most one more bound is
    below the value, and one exact comparison with it finds the count. Groups holding a NaN or
    an infinity (whose scaled values are NaN) keep bucketize's answer for them."""
    table = _cell_table(quant_type) if finite else None
    if table is None:
        return torch.bucketize(scaled, bounds, out_int32=True)
    cells, below_cell, next_bound = table
    # index_select on int32 indices: 0.43 ms per 256 Ki values on 2 cores, against 2.0-2.9 ms for
    # torch.take or advanced indexing and 2.7 ms for bucketize.
    q = torch.index_select(below_cell, 0, torch.add(scaled, 1.0).mul_(cells).int())
    q += torch.index_select(next_bound, 0, q) < scaled
    return q


@functools.cache
def _cell_table(quant_type: str) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(cells per unit, bounds below each cell's predecessor, each count's next bound), or None
    where the code's bounds are too close for a table of at most 8192 cells per unit."""
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    bounds = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))[0]
    closest = float((bounds[1:].double() - bounds[:-1].double()).min())
    cells = 64
    while 3 / cells >= closest:
        if cells >= 8192:
            return None
        cells *= 2
    # Cell c covers [c/cells - 1, (c+1)/cells - 1); its entry counts the bounds below cell c-1's left edge.
    predecessor_edges = (torch.arange(2 * cells + 1, dtype=torch.float64) - 1) / cells - 1
    below_cell = torch.searchsorted(bounds.double(), predecessor_edges, right=False, out_int32=True)
    next_bound = torch.cat([bounds, torch.tensor([float("inf")])])
    return cells, below_cell, next_bound
