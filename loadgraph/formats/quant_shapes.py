"""The tensors a quantized weight becomes (names, dtypes, shapes), known before any weight is read.

The quantize stage lays its output out in the export's final shard files before a unit runs
(formats/layout.py), so it must know every output tensor's size from the weight's shape alone.
These are bitsandbytes' and transformers' own shape rules (bitsandbytes' `register_fake` kernels
for `quantize_4bit` / `int8_vectorwise_quant`, transformers' `Fp8Quantize._quantize_one`);
tests/test_quant_shapes.py holds them against what the real kernels produce.

One output is not fixed: the 4-bit packed quant state (`*.quant_state.bitsandbytes__nf4`) is
JSON, and with double quant it holds a float computed from the data (`nested_offset`). It is a
variable-length output: an estimate (for packing shards) and a maximum (for header room).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from .quant_settings import QuantSettings

# bitsandbytes' 4-bit code books: 16 values (nf4/fp4); the double-quant absmax uses its 256-value
# dynamic map in blocks of 256 (functional.quantize_4bit: quantize_blockwise(..., blocksize=256)).
_4BIT_CODE = 16
_NESTED_CODE = 256
_NESTED_BLOCK = 256
# repr() of a finite non-negative double is at most 23 characters ("1.2345678901234567e-308");
# 24 covers a sign and nan/inf ("NaN", "Infinity").
_OFFSET_MAX_CHARS = 24
_OFFSET_TYPICAL = 0.1234567890123456  # 18 characters, as a float32 mean's repr usually is


@dataclass(frozen=True)
class QuantOutput:
    """One tensor a quantize function emits for a weight (its in-memory name, as convert returns it).

    `max_bytes` > 0: packed JSON, placed as a tail once written (its length is exact without
    double quant, but bitsandbytes owns that format); `shape` is then an estimate, `max_bytes`
    the most it can be."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    max_bytes: int = 0


def _st(dtype: torch.dtype) -> str:
    from .safetensors import TORCH_TO_ST

    return TORCH_TO_ST[str(dtype).removeprefix("torch.")]


def quantized_outputs(name: str, shape: tuple[int, ...], dtype: torch.dtype, settings: QuantSettings) -> list[QuantOutput]:
    """What `_quantize(name, weight of `shape` and `dtype`, settings)` returns, in its order."""
    if settings.method == "fp8":
        b0, b1 = settings.fp8_block_size
        scale = (*shape[:-2], shape[-2] // b0, shape[-1] // b1)
        return [QuantOutput(name, "F8_E4M3", tuple(shape)), QuantOutput(name.rsplit(".", 1)[0] + ".weight_scale_inv", "F32", scale)]
    if settings.method == "bnb-int8":
        module = name.removesuffix(".weight")
        return [QuantOutput(name, "I8", tuple(shape)), QuantOutput(f"{module}.SCB", "F32", (math.prod(shape) // shape[-1],)),
                QuantOutput(f"{module}.weight_format", "U8", ())]
    storage = getattr(torch, settings.quant_storage)
    n = math.prod(shape)
    blocks = -(n // -settings.blocksize)
    out = [QuantOutput(name, _st(storage), ((n + 1) // (storage.itemsize * 2), 1))]
    if settings.double_quant:
        out += [QuantOutput(f"{name}.absmax", "U8", (blocks,)), QuantOutput(f"{name}.quant_map", "F32", (_4BIT_CODE,)),
                QuantOutput(f"{name}.nested_absmax", "F32", (-(blocks // -_NESTED_BLOCK),)),
                QuantOutput(f"{name}.nested_quant_map", "F32", (_NESTED_CODE,))]
    else:
        out += [QuantOutput(f"{name}.absmax", "F32", (blocks,)), QuantOutput(f"{name}.quant_map", "F32", (_4BIT_CODE,))]
    typical, most = quant_state_bytes(shape, dtype, settings)
    quant_type = settings.method.removeprefix("bnb-")
    out.append(QuantOutput(f"{name}.quant_state.bitsandbytes__{quant_type}", "U8", (typical,), max_bytes=most))
    return out


def quant_state_bytes(shape: tuple[int, ...], dtype: torch.dtype, settings: QuantSettings) -> tuple[int, int]:
    """(typical, maximum) length of the packed quant-state JSON: exact without double quant.

    The dict is QuantState.as_dict's non-tensor part, in its order, dumped by
    bitsandbytes.utils.pack_dict_to_tensor (json.dumps, utf-8)."""
    doc: dict = {"quant_type": settings.method.removeprefix("bnb-"), "blocksize": settings.blocksize,
                 "dtype": str(dtype).strip("torch."), "shape": list(shape)}
    if not settings.double_quant:
        n = len(json.dumps(doc).encode())
        return n, n
    doc.update({"nested_blocksize": _NESTED_BLOCK, "nested_dtype": "float32", "nested_offset": _OFFSET_TYPICAL})
    typical = len(json.dumps(doc).encode())
    return typical, typical - len(repr(_OFFSET_TYPICAL)) + _OFFSET_MAX_CHARS
