"""bitsandbytes serialization, one tensor at a time.

These produce the tensors transformers' `save_pretrained` writes for a model loaded with a
`BitsAndBytesConfig`, by calling the same bitsandbytes functions its `Params4bit._quantize` /
`Int8Params._quantize` call (bitsandbytes 0.50.2 runs them on CPU). The caller passes the weight
already cast to the model's load dtype (`QuantPlan.convert` does), because transformers casts
before quantizing and the cast changes the bytes. CPU and CUDA kernels give different bytes for
fp4, nested (double-quant) absmax and int8: quantize on the backend the result must match.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from . import bnb_blocks
from .quant_settings import QuantizeError, QuantSettings

_4BIT_STATE_PREFIX = ".quant_state.bitsandbytes__"


def quantize_tensor_4bit(name: str, weight: torch.Tensor, settings: QuantSettings,
                         offset_threads: int | None = None) -> dict[str, torch.Tensor]:
    """`name` (a Linear's weight) -> packed weight plus its quant-state companions.

    Gives `{name, name.absmax, name.quant_map, [name.nested_absmax, name.nested_quant_map],
    name.quant_state.bitsandbytes__<nf4|fp4>}`, as `Linear4bit._save_to_state_dict` writes them.
    bitsandbytes' own function, on the CPU in groups of blocks, its double quant's offset as torch
    rounds it at `offset_threads` threads (bnb_blocks; None: this process's count).
    """
    if not settings.is_4bit:
        raise QuantizeError(f"{name}: quantize_tensor_4bit called with method {settings.method!r}")
    _check_weight(name, weight)
    packed, state = bnb_blocks.quantize_4bit(
        weight.contiguous(),  # Params4bit._quantize quantizes `self.data.contiguous()`
        blocksize=settings.blocksize,
        compress_statistics=settings.double_quant,
        quant_type=settings.method.removeprefix("bnb-"),
        quant_storage=getattr(torch, settings.quant_storage),
        offset_threads=offset_threads,
    )
    out = {name: packed}
    for key, value in state.as_dict(packed=True).items():
        out[f"{name}.{key}"] = value
    return out


def quantize_tensor_int8(name: str, weight: torch.Tensor, settings: QuantSettings) -> dict[str, torch.Tensor]:
    """`name` (a Linear's weight) -> int8 weight, `<module>.SCB` and `<module>.weight_format`.

    Int8Params._quantize casts to float16 first (after transformers' cast to the load dtype: both
    roundings matter) and quantizes row-wise with threshold 0, whatever llm_int8_threshold says
    (the threshold only acts at matmul time).
    """
    import bitsandbytes.functional as bnbf

    if settings.method != "bnb-int8":
        raise QuantizeError(f"{name}: quantize_tensor_int8 called with method {settings.method!r}")
    _check_weight(name, weight)
    int8_weight, row_scales, _ = bnbf.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
    module = name.removesuffix(".weight")
    return {
        name: int8_weight,
        f"{module}.SCB": row_scales,
        # Linear8bitLt writes the layout as a uint8 scalar; 0 means "row", the only one still read.
        f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8, device=int8_weight.device),
    }


def dequantize(name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Float weight back from the tensors a quantize function (or a bnb checkpoint) holds for `name`.

    4-bit: bitsandbytes' own `dequantize_4bit` (result in the dtype recorded in the quant state).
    int8: `int8_vectorwise_dequant` (float32). For verify: compare with the original weight.
    """
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    state_keys = [k for k in tensors if k.startswith(name + _4BIT_STATE_PREFIX)]
    if state_keys:
        stats = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        state = QuantState.from_dict(stats, device=tensors[name].device)
        return bnbf.dequantize_4bit(tensors[name], state)
    scb = tensors.get(name.removesuffix(".weight") + ".SCB")
    if scb is not None:
        return bnbf.int8_vectorwise_dequant(tensors[name], scb)
    raise QuantizeError(f"{name}: no bitsandbytes quant state or SCB among the given tensors")


def _check_weight(name: str, weight: torch.Tensor) -> None:
    if not name.endswith(".weight") or weight.ndim != 2:
        raise QuantizeError(f"{name}: bitsandbytes quantizes 2-D Linear weights only, got shape {list(weight.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise QuantizeError(f"{name}: dtype {weight.dtype} cannot be quantized; cast it to the load dtype first")
