"""Fine-grained FP8 (transformers' `quant_method: "fp8"`), one tensor at a time.

transformers only quantizes to FP8 on load with a GPU, but its quantize op (`Fp8Quantize`) is
plain torch: this module calls that op on CPU, so a tensor gets the bytes transformers' own
quantizer gives it (`weight` float8_e4m3fn + `weight_scale_inv` float32, one scale per block).
transformers loads such a checkpoint on CPU by dequantizing it (to the load dtype).

Checked on an H100 against transformers 5.23's own quantize-on-load + save_pretrained: a dense
model's files are byte-identical (quantized here on CPU or on CUDA). For MoE experts transformers
quantizes the fused `experts.gate_up_proj` / `down_proj` and writes per-expert fp8 weights (the
same bytes as ours) but *fused* scales (`...experts.gate_up_proj_scale_inv`, shape (E, rows/b,
cols/b)); a per-shard writer cannot fuse across experts, so ours are per expert
(`...experts.N.w1.weight_scale_inv`, the same values). transformers loads both into the same
parameters, bit for bit (seen on GPU, and on CPU through dequantization).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from .quant_config import quantization_config
from .quant_settings import QuantizeError, QuantSettings


def _fp8_op(block_size: tuple[int, int], kind: str):
    """transformers' Fp8Quantize / Fp8Dequantize, which only read the quantizer's config."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    fake_quantizer = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=list(block_size)))
    return (Fp8Quantize if kind == "quantize" else Fp8Dequantize)(fake_quantizer)


def quantize_tensor_fp8(
    name: str, weight: torch.Tensor, block_size: tuple[int, int] = (128, 128)
) -> dict[str, torch.Tensor]:
    """`<module>.weight` -> `{<module>.weight: float8_e4m3fn, <module>.weight_scale_inv: float32}`.

    The weight must already be in the load dtype (transformers casts before quantizing).
    Shapes that the block does not divide are refused: transformers would leave them unquantized,
    which an FP8 model cannot load on GPU.
    """
    if weight.ndim < 2 or weight.shape[-2] % block_size[0] or weight.shape[-1] % block_size[1]:
        raise QuantizeError(
            f"{name}: shape {list(weight.shape)} is not a multiple of the FP8 block {list(block_size)}; "
            "skip its module or choose a block size that divides it"
        )
    return _fp8_op(tuple(block_size), "quantize")._quantize_one(name, weight.contiguous())


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Float weight back (transformers' own dequantize, the one its CPU load runs)."""
    return _fp8_op((1, 1), "dequantize")._dequantize_one(weight, scale_inv, output_dtype=dtype)


def fp8_quantization_config(
    block_size: tuple[int, int] = (128, 128), skip_modules: tuple[str, ...] = ()
) -> dict[str, Any]:
    """config.json["quantization_config"] that transformers writes for FP8 with these options."""
    return quantization_config(QuantSettings("fp8", fp8_block_size=tuple(block_size), skip_modules=tuple(skip_modules)))
