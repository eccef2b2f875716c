"""Floating-point facts verify's bounds are built from: ulps, ulp distances, unit roundoffs.

Everything is computed in float64, whose rounding error is far below every bound used here.
"""

from __future__ import annotations

import torch

# Explicit mantissa bits and the smallest normal exponent of each stored dtype: an ulp of x in a
# dtype is 2**(max(floor(log2|x|), emin) - mantissa_bits).
_FORMAT = {
    torch.float64: (52, -1022),
    torch.float32: (23, -126),
    torch.bfloat16: (7, -126),
    torch.float16: (10, -14),
    torch.float8_e4m3fn: (3, -6),
}
# float32 unit roundoff: the relative error of one float32 operation (PEFT's merge arithmetic).
U32 = 2.0**-24
# Chunks of this many elements keep float64 temporaries small (memory bounded by the unit, not the tensor).
CHUNK_ELEMENTS = 1 << 22
# On a GPU, bigger chunks: fewer kernel launches, and device memory is not the host's RAM.
GPU_CHUNK_ELEMENTS = 1 << 25


def chunk_elements(device: torch.device) -> int:
    return GPU_CHUNK_ELEMENTS if device.type == "cuda" else CHUNK_ELEMENTS


def ulp(magnitude: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |magnitude| (float64 in, float64 out; subnormal spacing near 0)."""
    mantissa, emin = _FORMAT[dtype]
    _, exponent = torch.frexp(magnitude.abs())
    floor_log2 = torch.where(magnitude == 0, torch.full_like(exponent, emin), exponent - 1).clamp_min(emin)
    return torch.ldexp(torch.ones_like(magnitude), (floor_log2 - mantissa).to(magnitude.dtype))


def rounding_error(value64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest error of rounding `value64` to `dtype` (half an ulp, at the next binade to be safe)."""
    if dtype in (torch.float32, torch.float64):
        return torch.zeros_like(value64)  # PEFT's float32 arithmetic already accounts for it
    return 0.5 * ulp(value64.abs() * (1 + 2.0 ** -_FORMAT[dtype][0]), dtype)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads included: what the file holds, not what compares)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def row_chunks(rows: int, cols: int, elements: int = CHUNK_ELEMENTS):
    """Row ranges of at most `elements` elements each (at least one row)."""
    step = max(1, elements // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def compute_device(requested: str) -> torch.device:
    """Where verify's float64 arithmetic runs: the GPU when asked for ('auto' = if one is visible)."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
